"""configs/coco/ (our detection configs) and upstream's detectron2-style detection YAML files, translated into our
keys by mdistiller/engine/detectron2_cfg.py and loaded by the same path as tools/train.py --cfg.

tests/data/detectron2_configs/ is a verbatim copy of megvii-research/mdistiller's detection/configs/ (commit
a08d46f1), folder layout kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from yacs.config import CfgNode as CN

from mdistiller.cli import train as train_tool
from mdistiller.cli.sweep_file import load_sweep
from mdistiller.cli.sweep_plan import expand_pattern, expand_runs, glob_configs
from mdistiller.distillers.registry import distiller_dict
from mdistiller.engine import cfg as cfg_module
from mdistiller.engine.cfg import leaf_values
from mdistiller.engine.detectron2_cfg import is_detectron2_config, translate_detectron2_config
from mdistiller.errors import MdistillerError

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "configs" / "coco"
UPSTREAM = Path(__file__).parent / "data" / "detectron2_configs"
BASE = UPSTREAM / "Base-Distillation.yaml"

# upstream file -> (DISTILLER.TYPE, student, teacher, REVIEWKD.LOSS_WEIGHT or None, bundle): detection.md section 2
UPSTREAM_FILES = {
    "DKD/DKD-R18-R101": ("RCNN_DKD", "R18-FPN", "R101-FPN", None, "r18-r101.pth"),
    "DKD/DKD-R50-R101": ("RCNN_DKD", "R50-FPN", "R101-FPN", None, "r50-r101.pth"),
    "DKD/DKD-MV2-R50": ("RCNN_DKD", "MV2-FPN", "R50-FPN", None, "mv2-r50.pth"),
    "DKD/ReviewDKD-R18-R101": ("RCNN_REVIEWDKD", "R18-FPN", "R101-FPN", 1.2, "r18-r101.pth"),
    "DKD/ReviewDKD-R50-R101": ("RCNN_REVIEWDKD", "R50-FPN", "R101-FPN", 1.0, "r50-r101.pth"),
    "DKD/ReviewDKD-MV2-R50": ("RCNN_REVIEWDKD", "MV2-FPN", "R50-FPN", 2.0, "mv2-r50.pth"),
    "ReviewKD/ReviewKD-R18-R101": ("RCNN_REVIEWKD", "R18-FPN", "R101-FPN", 1.2, "r18-r101.pth"),
    "ReviewKD/ReviewKD-R50-R101": ("RCNN_REVIEWKD", "R50-FPN", "R101-FPN", 1.0, "r50-r101.pth"),
    "ReviewKD/ReviewKD-MV2-R50": ("RCNN_REVIEWKD", "MV2-FPN", "R50-FPN", 2.0, "mv2-r50.pth"),
}
MASK_FILES = ["ReviewKD/ReviewKD-R18-R101-Mask", "ReviewKD/ReviewKD-R50-R101-Mask", "ReviewKD/ReviewKD-MV2-R50-Mask"]
BASELINES = {"Baseline-R18": ("R18-FPN", "r18-r101.pth"), "Baseline-R50": ("R50-FPN", "r50-r101.pth"),
             "Baseline-MV2": ("MV2-FPN", "mv2-r50.pth")}
ZOO = {"R101-FPN": "download_ckpts/detectron2/model_final_f6e8b1.pkl",
       "R50-FPN": "download_ckpts/detectron2/model_final_280758.pkl"}
# detection.md section 4 (AP / AP50 / AP75), by student: the rows each config's header quotes
PUBLISHED = {
    "R18-FPN": {"student": "33.26 / 53.61 / 35.26", "RCNN_DKD": "35.05 / 56.60 / 37.54",
                "RCNN_REVIEWKD": "36.75 / 56.72 / 34.00", "RCNN_REVIEWDKD": "37.01 / 57.53 / 39.85"},
    "R50-FPN": {"student": "37.93 / 58.84 / 41.05", "RCNN_DKD": "39.25 / 60.90 / 42.73",
                "RCNN_REVIEWKD": "40.36 / 60.97 / 44.08", "RCNN_REVIEWDKD": "40.65 / 61.51 / 44.44"},
    "MV2-FPN": {"student": "29.47 / 48.87 / 30.90", "RCNN_DKD": "32.34 / 53.77 / 34.01",
                "RCNN_REVIEWKD": "33.71 / 53.15 / 36.13", "RCNN_REVIEWDKD": "34.35 / 54.89 / 36.61"},
}
SOLVER = {"BATCH_SIZE": 8, "LR": 0.01, "MAX_ITER": 180000, "LR_DECAY_ITERS": [120000, 160000], "LR_DECAY_RATE": 0.1,
          "WARMUP_ITERS": 1000, "WARMUP_FACTOR": 0.001, "MOMENTUM": 0.9, "WEIGHT_DECAY": 0.0001,
          "WEIGHT_DECAY_NORM": 0.0, "CHECKPOINT_PERIOD": 5000, "EVAL_PERIOD": 0, "TYPE": "SGD"}


@pytest.fixture(autouse=True)
def rcnn_sections(monkeypatch):
    """The RCNN_DKD / RCNN_REVIEWKD sections (shared decision: ALPHA 1.0, BETA 0.25, T 1.0; LOSS_WEIGHT 1.0) while
    the detection methods that declare them are not registered yet; once they are, their own sections are used."""
    added = []
    for name, values in (("RCNN_DKD", {"ALPHA": 1.0, "BETA": 0.25, "T": 1.0}), ("RCNN_REVIEWKD", {"LOSS_WEIGHT": 1.0})):
        if name not in cfg_module.CFG:
            cfg_module.CFG[name] = CN(values)
            added.append(name)
    yield
    for name in added:
        del cfg_module.CFG[name]


def _load(path) -> CN:
    return train_tool.load_cfg(str(path), [])  # what tools/train.py --cfg does


def _refusal(path) -> str:
    with pytest.raises(MdistillerError) as info:
        _load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- our configs ----

def test_configs_coco_holds_exactly_the_twelve_recipes():
    names = {Path(name).name for name in UPSTREAM_FILES} | set(BASELINES)
    assert {p.stem for p in COCO.glob("*.yaml")} == names and len(names) == 12


def student_weights(student: str, bundle: str) -> str:
    """Our configs' DETECTION.STUDENT_WEIGHTS: the ReviewKD bundle's student part (R18, R50); torchvision's ImageNet
    MobileNetV2 for MV2 (the bundle's MobileNetV2 names have no map)."""
    if student == "MV2-FPN":
        return "download_ckpts/torchvision/mobilenet_v2-b0353104.pth"
    return f"download_ckpts/reviewkd/{bundle}"


@pytest.mark.parametrize("upstream", list(UPSTREAM_FILES))
def test_distillation_config_loads_with_its_recipe_and_header(upstream):
    method, student, teacher, loss_weight, bundle = UPSTREAM_FILES[upstream]
    path = COCO / f"{Path(upstream).name}.yaml"
    cfg = _load(path)
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER) == (method, student, teacher)
    assert cfg.DISTILLER.TEACHER_CKPT == ZOO[teacher]
    assert cfg.DETECTION.STUDENT_WEIGHTS == student_weights(student, bundle)
    assert {key: cfg.SOLVER[key] for key in SOLVER} == SOLVER
    assert cfg.LOG.SAVE_CHECKPOINT_FREQ == 1  # epoch_<n> every CHECKPOINT_PERIOD iterations, as detectron2
    assert (cfg.DATASET.TYPE, cfg.DATASET.ROOT, cfg.DATASET.TEST.BATCH_SIZE) == ("coco", "data/coco", 1)
    assert (cfg.EXPERIMENT.PROJECT, cfg.EXPERIMENT.NAME) == ("coco", path.stem)
    assert cfg.DETECTION.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)
    assert (cfg.DETECTION.TRAIN_SPLIT, cfg.DETECTION.TEST_SPLIT, cfg.DETECTION.MASK_ON) == ("train2017", "val2017",
                                                                                           False)
    if loss_weight is not None:
        assert cfg.RCNN_REVIEWKD.LOSS_WEIGHT == loss_weight
        assert "RCNN_REVIEWKD" in yaml.safe_load(path.read_text())  # set by the file, not left to a default
    if "DKD" in method:
        assert (cfg.RCNN_DKD.ALPHA, cfg.RCNN_DKD.BETA, cfg.RCNN_DKD.T) == (1.0, 0.25, 1.0)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"detection/configs/{upstream}.yaml" in header and (UPSTREAM / f"{upstream}.yaml").is_file()
    assert PUBLISHED[student][method] in header and PUBLISHED[student]["student"] in header
    assert "unconfirmed" in header


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_config_loads_with_the_same_solver_and_no_teacher(name):
    student, bundle = BASELINES[name]
    path = COCO / f"{name}.yaml"
    cfg = _load(path)
    assert (cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER_CKPT) == ("RCNN_NONE", student, "")
    assert {key: cfg.SOLVER[key] for key in SOLVER} == SOLVER
    assert cfg.DETECTION.STUDENT_WEIGHTS == student_weights(student, bundle)
    assert "TEACHER" not in yaml.safe_load(path.read_text())["DISTILLER"]
    header = path.read_text().split("EXPERIMENT:")[0]
    assert PUBLISHED[student]["student"] in header and "unconfirmed" in header


def test_coco_sweep_runs_the_twelve_configs():
    sweep = load_sweep("coco")
    assert sweep.seeds == (0,)
    configs = [config for entry in sweep.entries for pattern in entry.configs
               for expanded in expand_pattern(pattern, {**sweep.matrix, **entry.matrix}, "coco")
               for config in glob_configs(expanded)]
    assert sorted(Path(config).stem for config in configs) == sorted(p.stem for p in COCO.glob("*.yaml"))
    if "RCNN_DKD" not in distiller_dict:
        pytest.skip("the RCNN_* detection methods are not registered yet: the planned runs need them")
    runs, warnings = expand_runs(sweep)
    assert warnings == [] and len(runs) == 12
    assert {run.cfg.DISTILLER.TYPE for run in runs} == {"RCNN_NONE", "RCNN_DKD", "RCNN_REVIEWKD", "RCNN_REVIEWDKD"}


# ---- upstream's files ----

@pytest.mark.parametrize("upstream", list(UPSTREAM_FILES))
def test_upstream_file_gives_the_recipe_of_our_config_of_the_same_name(upstream):
    ours = leaf_values(_load(COCO / f"{Path(upstream).name}.yaml"))
    theirs = leaf_values(_load(UPSTREAM / f"{upstream}.yaml"))
    # the only difference: the teacher file (upstream's bundle vs the zoo .pkl) and the bundle's folder
    bundle = UPSTREAM_FILES[upstream][4]
    assert theirs.pop("DISTILLER.TEACHER_CKPT") == theirs.pop("DETECTION.STUDENT_WEIGHTS") == f"pretrained/{bundle}"
    assert ours.pop("DETECTION.STUDENT_WEIGHTS") == student_weights(UPSTREAM_FILES[upstream][1], bundle)
    ours.pop("DISTILLER.TEACHER_CKPT")
    assert {k: v for k, v in theirs.items() if ours[k] != v} == {}


def test_translation_of_one_file_by_hand():
    assert translate_detectron2_config(str(UPSTREAM / "DKD" / "DKD-R18-R101.yaml")) == {
        "EXPERIMENT": {"PROJECT": "coco", "NAME": "DKD-R18-R101"},
        "LOG": {"SAVE_CHECKPOINT_FREQ": 1},
        "DATASET": {"TYPE": "coco", "ROOT": "data/coco", "TEST": {"BATCH_SIZE": 1}, "NUM_WORKERS": 4},
        "DISTILLER": {"TYPE": "RCNN_DKD", "STUDENT": "R18-FPN", "TEACHER": "R101-FPN",
                      "TEACHER_CKPT": "pretrained/r18-r101.pth"},
        "SOLVER": SOLVER,
        "DETECTION": {"TRAIN_SPLIT": "train2017", "TEST_SPLIT": "val2017",
                      "MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800], "MAX_SIZE_TRAIN": 1333, "MIN_SIZE_TEST": 800,
                      "MAX_SIZE_TEST": 1333, "STUDENT_WEIGHTS": "pretrained/r18-r101.pth",
                      "TEACHER_FLIP_BEFORE_NORMALIZE": False, "MASK_ON": False},
        "RCNN_DKD": {"ALPHA": 1.0, "BETA": 0.25, "T": 1.0},
    }


@pytest.mark.parametrize("upstream", MASK_FILES)
def test_mask_files_are_refused_in_one_line_naming_mask_on(upstream):
    path = UPSTREAM / f"{upstream}.yaml"
    assert _refusal(path).startswith(f"MODEL.MASK_ON True in {path} does not map: Mask R-CNN")


@pytest.fixture
def tree(tmp_path) -> Path:
    """A writable copy of upstream's folder."""
    shutil.copytree(UPSTREAM, tmp_path / "configs")
    return tmp_path / "configs"


def _child(tree: Path, text: str, name: str = "DKD/X.yaml") -> Path:
    path = tree / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _with(upstream: str, extra: str, tree: Path) -> Path:
    """An upstream file with extra YAML appended (a second top-level section would be refused as given twice, so
    the extras go in a child that takes the file as its _BASE_)."""
    return _child(tree, f"_BASE_: ../{upstream}.yaml\n{extra}")


def test_a_changed_fixed_value_is_refused_naming_the_key_value_file_and_ours(tree):
    path = _with("DKD/DKD-R18-R101", "MODEL:\n  RPN:\n    POST_NMS_TOPK_TRAIN: 2000\n", tree)
    assert _refusal(path) == (f"MODEL.RPN.POST_NMS_TOPK_TRAIN 2000 in {path} does not map: our detector uses 1000 "
                              "(detection.md 1.5-1.8)")


def test_an_unknown_key_is_refused_naming_it(tree):
    path = _with("DKD/DKD-R50-R101", "MODEL:\n  RPN:\n    HEAD_CONV_COUNT: 3\n", tree)
    assert _refusal(path).startswith(f"MODEL.RPN.HEAD_CONV_COUNT 3 in {path} does not map: no key of ours")
    path = _with("DKD/DKD-R50-R101", "SOLVER:\n  WEIGHT_DECAY_BIAS: 0.0\n", tree)
    assert _refusal(path).startswith(f"SOLVER.WEIGHT_DECAY_BIAS 0.0 in {path} does not map")


def test_a_refused_key_names_the_file_of_the_chain_that_set_it(tree):
    base = tree / "Base-Distillation.yaml"
    base.write_text(base.read_text().replace("      NUM_FC: 2", "      NUM_FC: 4"))  # the teacher's box head
    path = tree / "DKD" / "DKD-R50-R101.yaml"
    assert _refusal(path).startswith(f"TEACHER.MODEL.ROI_BOX_HEAD.NUM_FC 4 in {base} does not map: our detector "
                                     "uses 2")


def test_a_fixed_key_left_at_detectron2s_default_is_checked_too(tree):
    base = tree / "Base-Distillation.yaml"
    text = base.read_text()
    assert text.count("\n    POST_NMS_TOPK_TRAIN: 1000\n") == 1  # the student's (the teacher's is indented more)
    base.write_text(text.replace("\n    POST_NMS_TOPK_TRAIN: 1000\n", "\n"))
    path = tree / "ReviewKD" / "ReviewKD-R50-R101.yaml"
    assert _refusal(path) == (f"MODEL.RPN.POST_NMS_TOPK_TRAIN 2000 (detectron2's default, not set) in {path} does "
                              "not map: our detector uses 1000 (detection.md 1.5-1.8)")


def test_per_backbone_values_are_checked_against_our_detector(tree):
    # an R18 student needs its RGB input and ImageNet std; left out, detectron2's BGR / std 1 would be used
    text = (UPSTREAM / "DKD" / "DKD-R18-R101.yaml").read_text().replace("  PIXEL_STD: [57.375, 57.120, 58.395]\n", "")
    path = _child(tree, text)
    assert _refusal(path).startswith(f"MODEL.PIXEL_STD [1.0, 1.0, 1.0] (detectron2's default, not set) in {path} "
                                     "does not map: our detector uses [57.375, 57.12, 58.395]")
    # MobileNetV2 trains every conv: FREEZE_AT 0, not detectron2's 2
    path = _with("DKD/DKD-MV2-R50", "MODEL:\n  BACKBONE:\n    FREEZE_AT: 2\n", tree)
    assert _refusal(path).startswith(f"MODEL.BACKBONE.FREEZE_AT 2 in {path} does not map: our detector uses 0")
    path = _with("DKD/DKD-R50-R101", "TEACHER:\n  MODEL:\n    RESNETS:\n      DEPTH: 152\n", tree)
    assert _refusal(path).startswith(f"TEACHER.MODEL.RESNETS.DEPTH 152 in {path} does not map: our teachers are")
    path = _with("DKD/DKD-R50-R101", "DATASETS:\n  TRAIN: ('coco_2017_train', 'coco_2017_val')\n", tree)
    assert _refusal(path).startswith(f"DATASETS.TRAIN ['coco_2017_train', 'coco_2017_val'] in {path} does not map")
    path = _with("DKD/DKD-R50-R101", "KD:\n  TYPE: FitNet\n", tree)
    assert _refusal(path).startswith(f"KD.TYPE FitNet in {path} does not map: our detection methods take NONE, DKD")


def test_base_chains_merge_key_by_key_with_detectron2_defaults_underneath(tree):
    base = tree / "Base-Distillation.yaml"
    base.write_text(base.read_text().replace("INPUT:\n  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)\n", ""))
    _child(tree, "_BASE_: Base-Distillation.yaml\nKD:\n  TYPE: ReviewKD\n  REVIEWKD:\n    LOSS_WEIGHT: 3\n"
                 "SOLVER:\n  BASE_LR: 0.02\n  GAMMA: 0.5\nOUTPUT_DIR: output/mid\n", "mid.yaml")
    leaf = _child(tree, "_BASE_: ../mid.yaml\nMODEL:\n  RESNETS:\n    DEPTH: 18\n    RES2_OUT_CHANNELS: 64\n"
                        "  PIXEL_STD: [57.375, 57.120, 58.395]\n  WEIGHTS: w.pth\nINPUT:\n  FORMAT: RGB\n"
                        "SOLVER:\n  BASE_LR: 0.005\n  STEPS: (100, 200)\n  WARMUP_FACTOR: 1e-2\n"
                        "OUTPUT_DIR: ./runs/leaf/\n", "deep/leaf.yaml")
    out = translate_detectron2_config(str(leaf))
    # the leaf's MODEL.RESNETS adds to the base's (OUT_FEATURES kept: a replaced section would be refused)
    assert out["DISTILLER"] == {"TYPE": "RCNN_REVIEWKD", "STUDENT": "R18-FPN", "TEACHER": "R50-FPN",
                                "TEACHER_CKPT": "w.pth"}
    assert out["RCNN_REVIEWKD"] == {"LOSS_WEIGHT": 3.0} and "RCNN_DKD" not in out
    solver = out["SOLVER"]
    assert (solver["LR"], solver["LR_DECAY_ITERS"], solver["WARMUP_FACTOR"]) == (0.005, [100, 200], 0.01)  # leaf
    assert solver["LR_DECAY_RATE"] == 0.5  # mid
    assert (solver["BATCH_SIZE"], solver["MAX_ITER"]) == (16, 90000)  # base
    assert solver["WARMUP_ITERS"] == 1000 and out["DATASET"]["NUM_WORKERS"] == 4  # detectron2's defaults
    assert out["DETECTION"]["MIN_SIZE_TRAIN"] == [800]  # detectron2's default, not our 640..800
    assert out["EXPERIMENT"]["NAME"] == "leaf"
    # the base alone: KD.TYPE left out is upstream's default, DKD; student and teacher R-50 (detectron2's depth)
    alone = translate_detectron2_config(str(tree / "Base-Distillation.yaml"))
    assert alone["DISTILLER"]["TYPE"] == "RCNN_DKD" and alone["DISTILLER"]["STUDENT"] == "R50-FPN"
    assert alone["SOLVER"]["LR_DECAY_ITERS"] == [60000, 80000] and alone["EXPERIMENT"]["NAME"] == "output"


def test_a_base_loop_and_a_missing_base_are_one_line_errors(tree):
    a = _child(tree, "_BASE_: b.yaml\nMODEL:\n  MASK_ON: False\n", "a.yaml")
    _child(tree, "_BASE_: a.yaml\nVERSION: 2\n", "b.yaml")
    assert "loops back" in _refusal(a)
    missing = _child(tree, "_BASE_: nowhere.yaml\nMODEL:\n  MASK_ON: False\n", "c.yaml")
    assert _refusal(missing) == f"config file not found: {tree / 'nowhere.yaml'}"


# ---- recognising detectron2's files ----

def test_only_detectron2_files_are_recognised():
    ours = [p for p in (REPO / "configs").rglob("*.yaml") if "sweeps" not in p.parts]
    ours += list((Path(__file__).parent / "data" / "reference_configs").rglob("*.yaml"))
    assert len(ours) > 200 and any(p.parent == COCO for p in ours)
    assert [p for p in ours if is_detectron2_config(str(p))] == []
    upstream = sorted(UPSTREAM.rglob("*.yaml"))
    assert len(upstream) == 13 and all(is_detectron2_config(str(p)) for p in upstream)


def test_a_file_is_decided_by_its_own_keys_then_its_base(tmp_path):
    def write(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    ours = write("ours.yaml", "SOLVER:\n  BATCH_SIZE: 8\n")
    assert not is_detectron2_config(write("only_shared.yaml", "SOLVER:\n  MOMENTUM: 0.9\n"))
    assert is_detectron2_config(write("on_d2.yaml", f"_BASE_: {BASE}\nSOLVER:\n  MOMENTUM: 0.9\n"))
    assert not is_detectron2_config(write("on_ours.yaml", "_BASE_: ours.yaml\nSOLVER:\n  MOMENTUM: 0.9\n"))
    assert is_detectron2_config(write("ims.yaml", "SOLVER:\n  IMS_PER_BATCH: 8\n"))
    assert is_detectron2_config(write("kd_type.yaml", "KD:\n  TYPE: DKD\n"))
    assert not is_detectron2_config(write("kd_ours.yaml", "KD:\n  TEMPERATURE: 4\n"))
    assert not is_detectron2_config(write("bad.yaml", "SOLVER: [\n"))
    assert ours
    # a file with keys of ours is ours: a stray detectron2 key is the ordinary unknown-key error, as before
    mixed = write("mixed.yaml", "DISTILLER:\n  TYPE: KD\nMODEL:\n  MASK_ON: False\n")
    assert not is_detectron2_config(mixed)
    assert _refusal(mixed).startswith(f"unknown config key MODEL in {mixed}")


@pytest.mark.parametrize("key, value, phrase", [
    ("DATASET.IMAGE_SIZE", "160", "DATASET.IMAGE_SIZE 160 is not supported for detection"),
    ("DATASET.GPU_DECODE", "True", "DATASET.GPU_DECODE True is not supported for detection"),
    ("SOLVER.COMPILE", "default", "SOLVER.COMPILE 'default' is not supported for detection"),
    ("DETECTION.MASK_ON", "True", "DETECTION.MASK_ON True is not supported for detection"),
    ("SOLVER.EPOCHS", "12", "SOLVER.EPOCHS 12 is not read by a run of SOLVER.MAX_ITER > 0"),
    ("DISTILLER.TYPE", "DKD", "DISTILLER.TYPE DKD is a classification method but DATASET.TYPE coco is detection"),
])
def test_what_a_detection_run_would_not_read_is_refused_in_one_line(key, value, phrase):
    from mdistiller.engine.cfg import load_cfg
    from mdistiller.engine.validate import check_recipe

    cfg = load_cfg(str(COCO / "DKD-R18-R101.yaml"), [key, value])
    with pytest.raises(MdistillerError) as info:
        check_recipe(cfg)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_a_detection_setting_on_classification_data_is_refused():
    from mdistiller.engine.cfg import load_cfg
    from mdistiller.engine.validate import check_recipe

    cfg = load_cfg(str(Path(__file__).resolve().parents[1] / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"),
                   ["DETECTION.MIN_SIZE_TEST", "600"])
    with pytest.raises(MdistillerError, match="DETECTION.MIN_SIZE_TEST is read by the detection task"):
        check_recipe(cfg)
    cfg = load_cfg(str(Path(__file__).resolve().parents[1] / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"),
                   ["DISTILLER.TYPE", "RCNN_DKD"])
    with pytest.raises(MdistillerError, match="DISTILLER.TYPE RCNN_DKD is a detection method but DATASET.TYPE"):
        check_recipe(cfg)
