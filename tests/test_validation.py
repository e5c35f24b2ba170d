"""Validation before any side effect: every refused run of the README's "Errors before training" list gives its one
line and leaves LOG.PREFIX and LOG.RESULTS_DIR untouched (no run folder, no log, no config.yaml) and the data root as
it was. Besides the hand-written list, cases are generated from the refusal sites themselves: every registered
method's choice keys, its trainer names, the LS flags, Mixup, DOT (no teacher, no distillation term), the top-level
keys a method does not read, and the update rule's / batch mixer's refusals that need the built distiller."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mdistiller.cli import train as train_tool
from mdistiller.distillers import Key, distiller_dict, method_sections
from mdistiller.distillers.config import iter_keys
from mdistiller.engine.cfg import TRAINERS
from mdistiller.engine.validate import check_writable
from mdistiller.errors import MdistillerError

from conftest import REPO, run_overrides

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")
KD = str(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml")
CRD = str(REPO / "configs/cifar100/crd/resnet56_resnet20.yaml")
FITNET = str(REPO / "configs/cifar100/fitnet/resnet56_resnet20.yaml")
WKD_L = str(REPO / "configs/cifar100/wkd_l/resnet32x4_resnet8x4.yaml")
TEACHER = "<teacher ckpt>"  # replaced by a random-weight checkpoint of DISTILLER.TEACHER in the test


def _snapshot(folder: str) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime: what "unchanged" means for the data root."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


def _invalid_choice(key: Key):
    if all(isinstance(c, str) for c in key.choices):
        return "no_such_choice"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in key.choices):
        return str(max(key.choices) + 1000)
    return None


def _method_configs() -> dict[str, str]:
    """DISTILLER.TYPE -> the first CIFAR-100 config of that method (its keys as its authors' recipe sets them)."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "configs/cifar100").glob("*/*.yaml")):
        match = re.search(r"^DISTILLER:\n(?:[ \t]+.*\n)*?[ \t]+TYPE:\s*\"?(\w+)", path.read_text(), re.MULTILINE)
        if match:
            found.setdefault(match.group(1), str(path))
    return found


def _package_methods() -> dict:
    """The registered classification methods of the package itself (tests register stand-ins of their own; the
    detection methods have no CIFAR-100 config to derive these cases from)."""
    return {name: cls for name, cls in distiller_dict.items()
            if cls.__module__.startswith("mdistiller.") and cls.declares.task == "classification"}


def _generated_cases() -> dict[str, tuple[list[str], str]]:
    """Refusal cases derived from the registry: each method's declaration and config section, every trainer name."""
    cases: dict[str, tuple[list[str], str]] = {}
    sections = method_sections()
    configs = _method_configs()
    for method, cls in sorted(_package_methods().items()):
        declares = cls.declares
        head = ["--cfg", configs[method]]
        for section in declares.config_sections:
            spec = sections.get(section)
            if spec is None or isinstance(spec, Key):
                continue
            for full_key, key in iter_keys(spec, section):
                value = _invalid_choice(key) if key.choices else None
                if value is not None:
                    cases[f"{method} {full_key} not a choice"] = ([*head, full_key, value], f"{full_key} ")
        other = [t for t in TRAINERS if t not in declares.upstream_trainers and t not in ("dot", "crd_dot")]
        if other:
            cases[f"{method} with SOLVER.TRAINER {other[0]}"] = (
                [*head, "SOLVER.TRAINER", other[0]], f"SOLVER.TRAINER {other[0]} is upstream's trainer")
        if declares.logit_stand is None:
            cases[f"{method} with --logit-stand"] = ([*head, "--logit-stand"], "logit")
        if not declares.accepts_soft_targets:
            cases[f"{method} with Mixup"] = ([*head, "DATASET.MIXUP.MIXUP_ALPHA", "0.8"],
                                             f"DATASET.MIXUP gives soft labels, which {cls.__name__} cannot train on")
        if not declares.requires_teacher:
            cases[f"{method} with DOT"] = ([*head, "SOLVER.TRAINER", "dot"], "has no teacher to distil from")
    for name, spec in sections.items():
        if isinstance(spec, Key):
            readers = [m for m, c in distiller_dict.items() if name in c.declares.config_sections]
            if "KD" not in readers:
                value = "True" if spec.default is False else ("False" if spec.default is True else "1")
                cases[f"{name} for KD"] = (["--cfg", KD, name, value], f"is read by {', '.join(sorted(readers))}")
    # refusals that need the built distiller: the update rule, the batch mixer, the loss terms of a dry forward
    cases["DOT with no distillation term (WKD-L at weight 0)"] = (
        ["--cfg", WKD_L, "WKD.LOSS.WKD_LOGIT_WEIGHT", "0", "SOLVER.TRAINER", "dot", "SOLVER.BATCH_SIZE", "8",
         "DISTILLER.TEACHER_CKPT", TEACHER], "SOLVER.TRAINER dot needs the task term")
    cases["Mixup with an odd batch"] = (
        ["--cfg", KD, "DATASET.MIXUP.MIXUP_ALPHA", "0.8", "SOLVER.BATCH_SIZE", "7", "DISTILLER.TEACHER_CKPT", TEACHER],
        "DATASET.MIXUP")
    return cases


GENERATED = _generated_cases()


def _damaged_copy(tmp: Path, data_root: str) -> str:
    root = tmp / "damaged"
    shutil.copytree(data_root, root)
    train = root / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:100])
    return str(root)


def _cases(tmp: Path, data_root: str, teacher_ckpt) -> dict[str, tuple[list[str], str]]:
    base = run_overrides(tmp, data_root)
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")  # fails for root too, unlike chmod
    return {
        "missing config": (["--cfg", str(tmp / "nope.yaml")], "config file not found"),
        "unknown key": (["--cfg", VANILLA, *base, "SOLVER.EPOHCS", "1"], "did you mean SOLVER.EPOCHS"),
        "unknown model": (["--cfg", VANILLA, *base, "DISTILLER.STUDENT", "resnet9"], "unknown model 'resnet9'"),
        "unknown distiller": (["--cfg", VANILLA, *base, "DISTILLER.TYPE", "NOSUCHKD"], "unknown distiller"),
        "missing data": (["--cfg", VANILLA, *base, "DATASET.ROOT", str(tmp / "void"), "DATASET.DOWNLOAD", "False"],
                         "CIFAR-100 not found"),
        "damaged data": (["--cfg", VANILLA, *base, "DATASET.ROOT", _damaged_copy(tmp, data_root)],
                         "is truncated or corrupt"),
        "missing teacher": (["--cfg", KD, *base, "DISTILLER.TEACHER_CKPT", str(tmp / "t.pth")],
                            "teacher checkpoint not found"),
        "teacher of another architecture": (["--cfg", KD, *base, "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet8")],
                                            "holds weights of resnet8, not resnet56"),
        "teacher of another class count": (
            ["--cfg", KD, *base, "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet56", num_classes=10)],
            "holds weights of resnet56 with 10 classes"),
        "zero epochs": (["--cfg", VANILLA, *base, "SOLVER.EPOCHS", "0"], "SOLVER.EPOCHS must be positive"),
        "negative batch": (["--cfg", VANILLA, *base, "SOLVER.BATCH_SIZE", "-4"], "SOLVER.BATCH_SIZE must be positive"),
        "batch larger than the data": (["--cfg", VANILLA, *base, "SOLVER.BATCH_SIZE", "512"],
                                       "larger than the training set"),
        "decay stages": (["--cfg", VANILLA, *base, "SOLVER.LR_DECAY_STAGES", "[180, 150]"],
                         "strictly increasing positive epochs"),
        "nan policy": (["--cfg", VANILLA, *base, "SOLVER.NAN_POLICY", "ignore"], "SOLVER.NAN_POLICY must be one of"),
        "unwritable LOG.PREFIX": (["--cfg", VANILLA, *base, "LOG.PREFIX", str(blocker / "output")],
                                  "cannot write to the run folder (LOG.PREFIX)"),
        "unwritable LOG.RESULTS_DIR": (["--cfg", VANILLA, *base, "LOG.RESULTS_DIR", str(blocker / "logs")],
                                       "cannot write to LOG.RESULTS_DIR"),
        "DOT with AdamW": (["--cfg", KD, *base, "SOLVER.TRAINER", "dot", "SOLVER.TYPE", "AdamW"],
                           "SOLVER.TRAINER dot is DOT, a variant of SGD; SOLVER.TYPE is AdamW"),
        "DOT without a teacher": (["--cfg", VANILLA, *base, "SOLVER.TRAINER", "dot"],
                                  "DISTILLER.TYPE NONE has no teacher to distil from"),
        "DOT momentum of 1": (["--cfg", KD, *base, "SOLVER.TRAINER", "dot", "SOLVER.DOT.DELTA", "0.1"],
                              "momenta 0.8 / 1; both must lie in [0, 1)"),
        "another method's trainer": (["--cfg", KD, *base, "SOLVER.TRAINER", "ours"],
                                     "SOLVER.TRAINER ours is upstream's trainer for another method"),
        "CRD mode": (["--cfg", CRD, *base, "CRD.MODE", "loose"], "CRD.MODE 'loose' is not one of exact, relax"),
        "CRD dims": (["--cfg", CRD, *base, "DISTILLER.TEACHER", "resnet8", "DISTILLER.TEACHER_CKPT",
                      teacher_ckpt("resnet8"), "CRD.FEAT.TEACHER_DIM", "256"],
                     "CRD.FEAT.TEACHER_DIM 256 does not match the models: student resnet20 pools 64 features"),
        "resume without a run": (["--cfg", VANILLA, *base, "--resume"], "resume checkpoint not found"),
        "odd overrides": (["--cfg", VANILLA, *base, "SOLVER.EPOCHS"], "KEY VALUE pairs"),
        "unknown flag": (["--cfg", VANILLA, *base, "--resum"], "unknown flag --resum (did you mean --resume?)"),
        "teacher cache for a feature method": (
            ["--cfg", FITNET, *base, "DISTILLER.TEACHER_CACHE", "auto"],
            "FITNET uses the teacher's features, and a cache holds logits only"),
        "teacher cache not built": (["--cfg", KD, *base, "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet56"),
                                     "DISTILLER.TEACHER_CACHE", str(tmp / "no_cache")], "no teacher cache at"),
    }


CASES = ["missing config", "unknown key", "unknown model", "unknown distiller", "missing data", "damaged data",
         "missing teacher", "teacher of another architecture", "teacher of another class count", "zero epochs",
         "negative batch", "batch larger than the data", "decay stages", "nan policy", "unwritable LOG.PREFIX",
         "unwritable LOG.RESULTS_DIR", "DOT with AdamW", "DOT without a teacher", "DOT momentum of 1",
         "another method's trainer", "CRD mode", "CRD dims", "resume without a run", "odd overrides", "unknown flag",
         "teacher cache for a feature method", "teacher cache not built"]


@pytest.mark.parametrize("case", CASES)
def test_a_refused_run_leaves_no_debris(tmp_path, cifar100_tiny_root, teacher_ckpt, case):
    args, message = _cases(tmp_path, cifar100_tiny_root, teacher_ckpt)[case]
    with pytest.raises(MdistillerError) as info:
        train_tool.main(args)
    assert message in str(info.value) and "\n" not in str(info.value)
    for folder in (tmp_path / "output", tmp_path / "logs"):
        assert not folder.exists() or not any(folder.iterdir()), f"{case}: {folder} holds {list(folder.rglob('*'))}"


@pytest.mark.parametrize("case", list(GENERATED))
def test_a_generated_refusal_leaves_no_debris(tmp_path, cifar100_tiny_root, teacher_ckpt, case):
    args, message = GENERATED[case]
    if TEACHER in args:
        arch = train_tool.build_cfg(train_tool.parse_args([a for a in args if a != TEACHER] + [""])).DISTILLER.TEACHER
        args = [teacher_ckpt(arch) if a == TEACHER else a for a in args]
    data_before = _snapshot(cifar100_tiny_root)
    with pytest.raises(MdistillerError) as info:
        train_tool.main([*args, *run_overrides(tmp_path, cifar100_tiny_root)])
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    for folder in (tmp_path / "output", tmp_path / "logs"):
        assert not folder.exists() or not any(folder.iterdir()), f"{case}: {folder} holds {list(folder.rglob('*'))}"
    assert _snapshot(cifar100_tiny_root) == data_before


def test_the_generated_cases_cover_every_method():
    methods = {case.split(" ")[0] for case in GENERATED}
    assert set(_package_methods()) <= set(_method_configs()) and set(_package_methods()) <= methods
    assert "DOT with no distillation term (WKD-L at weight 0)" in GENERATED


def test_an_existing_run_without_resume_is_refused_and_left_as_it_was(tmp_path, cifar100_tiny_root):
    args = ["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_tiny_root), "SOLVER.BATCH_SIZE", "32"]
    run_dir = Path(train_tool.main(args)["run_dir"])
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(MdistillerError, match="already holds a run: pass --resume"):
        train_tool.main(args)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_flags_may_follow_the_overrides(tmp_path, cifar100_tiny_root):
    """`--resume` typed after the KEY VALUE pairs (as after a stopped run) works like `--resume` before them."""
    overrides = [*run_overrides(tmp_path, cifar100_tiny_root), "SOLVER.BATCH_SIZE", "32"]
    first = train_tool.main(["--cfg", VANILLA, *overrides])
    again = train_tool.main(["--cfg", VANILLA, *overrides, "--resume"])  # the finished run: nothing left to do
    assert again["run_dir"] == first["run_dir"] and again["best_acc"] == first["best_acc"]
    args = train_tool.parse_args([*overrides, "--logit-stand", "--cfg", VANILLA, "--base-temp", "3", "WKD.HINT_LAYER",
                                  "-1", "--kd-weight=6", "--seeds", "0,1"])
    assert (args.cfg, args.logit_stand, args.base_temp, args.kd_weight, args.seeds) == (VANILLA, True, 3.0, 6.0, "0,1")
    assert args.opts == [*overrides, "WKD.HINT_LAYER", "-1"]


def test_writability_is_checked_without_creating_anything(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    check_writable(str(target), "the run folder")
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(MdistillerError, match="is a file, not a folder"):
        check_writable(str(tmp_path / "file" / "x"), "the run folder")
