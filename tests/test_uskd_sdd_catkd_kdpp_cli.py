"""USKD, SD-KD / SD-DKD / SD-NKD, CAT-KD, KD++ / DKD++ through the command line: the class-centre tool (the authors'
layout and rounding), refused runs (one line, no run folder), and one epoch of each method's CIFAR YAML through
tools/train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdistiller.analysis.published import published_top1
from mdistiller.cli import kdpp_centers
from mdistiller.cli import train as train_tool
from mdistiller.dataset.cifar_files import learnable_images, write_cifar100
from mdistiller.distillers.kdpp import load_centres
from mdistiller.engine.build import load_zoo_model
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict
from mdistiller.models.common import classifier_name, has_classifier_bias

from conftest import REPO, run_overrides, run_tool


@pytest.fixture(scope="module")
def every_class_root(tmp_path_factory) -> str:
    """CIFAR-100 files whose 200 training images hold every class twice (class centres need all 100)."""
    root = tmp_path_factory.mktemp("every_class")
    rng = np.random.default_rng(0)
    train, test = np.arange(200) % 100, np.arange(40) % 100
    write_cifar100(str(root), images={"train": (learnable_images(train, 100, rng), train),
                                      "test": (learnable_images(test, 100, rng), test)})
    return str(root)


def _centres(tmp_path: Path, root: str, teacher: str, ckpt: str, name: str = "c.json") -> str:
    out = str(tmp_path / name)
    kdpp_centers.main(["-o", out, "DISTILLER.TEACHER", teacher, "DISTILLER.TEACHER_CKPT", ckpt, "DATASET.ROOT", root,
                       "DATASET.NUM_WORKERS", "0"])
    return out


def test_centre_tool_writes_the_authors_layout_and_rounding(tmp_path, every_class_root, teacher_ckpt, one_thread):
    ckpt = teacher_ckpt("resnet20")
    out = _centres(tmp_path, every_class_root, "resnet20", ckpt)
    data = json.loads(Path(out).read_text())
    assert list(data) == [str(k) for k in range(100)] and all(len(row) == 64 for row in data.values())
    assert all(round(v, 4) == v for row in data.values() for v in row)
    assert Path(out).read_text().startswith('{\n    "0": [\n        ')  # json.dumps(indent=4), as the authors
    assert load_centres(out, 100, 64).shape == (100, 64)
    # the same seed draws the same augmentation: the same file
    again = _centres(tmp_path, every_class_root, "resnet20", ckpt, "again.json")
    assert Path(again).read_text() == Path(out).read_text()
    # the config's CENTERS is the default output
    cfg_path = str(REPO / "configs/cifar100/kdpp/resnet56_resnet20.yaml")
    args = kdpp_centers.parse_args(["--cfg", cfg_path])
    assert kdpp_centers.default_output(train_tool.load_cfg(args.cfg)) == (
        "kdpp_centers/cifar100/resnet56/center_emb_train.json")


def test_centre_tool_refuses_a_class_without_images(tmp_path, cifar100_tiny_root, teacher_ckpt):
    with pytest.raises(MdistillerError, match=r"no sample of class\(es\)"):
        _centres(tmp_path, cifar100_tiny_root, "resnet20", teacher_ckpt("resnet20"))
    assert not (tmp_path / "c.json").exists()


def _refused_cases(tmp: Path, root: str, teacher_ckpt) -> dict[str, tuple[list[str], str]]:
    base = run_overrides(tmp, root)
    uskd = str(REPO / "configs/cifar100/uskd/resnet8x4.yaml")
    cat = str(REPO / "configs/cifar100/cat_kd/resnet56_resnet20.yaml")
    kdpp = str(REPO / "configs/cifar100/kdpp/resnet56_resnet20.yaml")
    sdd = str(REPO / "configs/cifar100/sdd_dkd/resnet56_resnet20.yaml")
    kd = str(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml")
    teacher = ["DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet56")]
    wrong_size = tmp / "wrong.json"
    wrong_size.write_text(json.dumps({str(k): [0.5] * 32 for k in range(100)}))
    return {
        "USKD --logit-stand": (["--cfg", uskd, *base, "--logit-stand"], "refused for USKD"),
        "SDD --logit-stand": (["--cfg", sdd, *base, *teacher, "--logit-stand"], "refused for SDD_KD, SDD_DKD"),
        "CAT-KD --logit-stand": (["--cfg", cat, *base, *teacher, "--logit-stand"], "refused for CAT_KD"),
        "KD++ --logit-stand": (["--cfg", kdpp, *base, *teacher, "--logit-stand"], "refused for KDPP and DKDPP"),
        "if_test False": (["--cfg", cat, *base, *teacher, "if_test", "False"], "CAT_KD needs if_test True"),
        "if_test with KD": (["--cfg", kd, *base, *teacher, "if_test", "True"], "is read by CAT_KD, not by"),
        "REDUCTION True": (["--cfg", cat, *base, *teacher, "DATASET.REDUCTION", "True"],
                           "DATASET.REDUCTION True (the CAT-KD repo's training-set reduction) is not implemented"),
        "empty CENTERS": (["--cfg", kdpp, *base, *teacher, "KDPP.CENTERS", ""], "KDPP.CENTERS is empty"),
        "missing CENTERS": (["--cfg", kdpp, *base, *teacher, "KDPP.CENTERS", str(tmp / "no.json")],
                            "no.json: no such file. Make it with python tools/kdpp_centers.py"),
        "CENTERS of another size": (["--cfg", kdpp, *base, *teacher, "KDPP.CENTERS", str(wrong_size),
                                     "SOLVER.BATCH_SIZE", "32"],
                                    "class 0 has a centre of size 32, the teacher's embedding has 64"),
        "--M on KD": (["--cfg", kd, *base, *teacher, "--M", "[1,2]"], "--M sets SDD's scales (SDD.M)"),
        "USKD under Mixup": (["--cfg", uskd, *base, "DATASET.MIXUP.MIXUP_ALPHA", "0.8"],
                             "which USKD cannot train on"),
        "SD-DKD from the cache": (["--cfg", sdd, *base, *teacher, "DISTILLER.TEACHER_CACHE", "auto"],
                                  "SDD_DKD uses the teacher's features, and a cache holds logits only"),
    }


REFUSED = ["USKD --logit-stand", "SDD --logit-stand", "CAT-KD --logit-stand", "KD++ --logit-stand", "if_test False",
           "if_test with KD", "REDUCTION True", "empty CENTERS", "missing CENTERS", "CENTERS of another size",
           "--M on KD", "USKD under Mixup", "SD-DKD from the cache"]


@pytest.mark.parametrize("case", REFUSED)
def test_a_refused_run_is_one_line_and_leaves_no_run_folder(tmp_path, cifar100_tiny_root, teacher_ckpt, case):
    args, message = _refused_cases(tmp_path, cifar100_tiny_root, teacher_ckpt)[case]
    with pytest.raises(MdistillerError) as info:
        train_tool.main(args)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    for folder in (tmp_path / "output", tmp_path / "logs"):
        assert not folder.exists() or not any(folder.iterdir()), f"{case}: {folder} holds {list(folder.rglob('*'))}"


# ---- one epoch of each method's YAML (small models in place of the pair's: the YAML's method keys are what runs) ----

ONE_EPOCH = {
    "uskd": ("configs/cifar100/uskd/resnet8x4.yaml", None, "resnet8"),
    "sdd_kd": ("configs/cifar100/sdd_kd/resnet32x4_resnet8x4.yaml", "resnet20", "resnet8"),
    "sdd_dkd": ("configs/cifar100/sdd_dkd/ResNet50_MobileNetV2.yaml", "wrn_16_2", "ShuffleV2"),
    "sdd_nkd": ("configs/cifar100/sdd_nkd/vgg13_vgg8.yaml", "resnet20", "resnet8"),
    "cat_kd": ("configs/cifar100/cat_kd/resnet32x4_ShuffleV1.yaml", "wrn_16_2", "resnet8"),
    "kdpp": ("configs/cifar100/kdpp/wrn_40_2_wrn_40_1.yaml", "wrn_16_2", "resnet8"),  # 64 -> 128: a projector
    "dkdpp": ("configs/cifar100/dkdpp/resnet56_resnet20.yaml", "resnet20", "resnet8"),
}
LOSSES = {"uskd": ("loss_kd",), "cat_kd": ("loss_CAT", "loss_CE"), "kdpp": ("loss_kd", "loss_nd"),
          "dkdpp": ("loss_kd", "loss_nd")}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(ONE_EPOCH))
def test_one_epoch_through_tools_train(method, tmp_path, every_class_root, teacher_ckpt):
    config, teacher, student = ONE_EPOCH[method]
    overrides = ["DISTILLER.STUDENT", student, "SOLVER.BATCH_SIZE", "32"]
    if teacher is not None:
        overrides += ["DISTILLER.TEACHER", teacher, "DISTILLER.TEACHER_CKPT", teacher_ckpt(teacher)]
    if method in ("kdpp", "dkdpp"):  # the centres made by the tool, as a user makes them
        centres = str(tmp_path / "centres.json")
        made = run_tool("kdpp_centers.py", "-o", centres, "DISTILLER.TEACHER", teacher, "DISTILLER.TEACHER_CKPT",
                        teacher_ckpt(teacher), "DATASET.ROOT", every_class_root, "DATASET.NUM_WORKERS", "0")
        assert made.returncode == 0, made.stderr[-2000:]
        overrides += [f"{method.upper()}.CENTERS", centres]
    flags = ["--M", "[1,2]"] if method.startswith("sdd") else []
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/train.py"), "--cfg", str(REPO / config), *flags, *overrides,
         *run_overrides(tmp_path, every_class_root)],
        cwd=str(REPO), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [p.parent for p in (tmp_path / "output").rglob("worklog.txt")]
    assert len(run_dirs) == 1, run_dirs
    worklog = (run_dirs[0] / "worklog.txt").read_text()
    for name in LOSSES.get(method, ("loss_kd",)):
        assert name in worklog, worklog[-2000:]
    merged = train_tool.load_cfg(str(run_dirs[0] / "config.yaml"))
    if method.startswith("sdd"):
        assert list(merged.SDD.M) == [1, 2] and "SDD.M:[1,2]" in run_dirs[0].name
    student_file = torch.load(run_dirs[0] / "student_best", map_location="cpu", weights_only=False)
    weights = student_file["model"] if "model" in student_file else student_file
    has_bias = f"{classifier_name(cifar_model_dict[student][0](num_classes=100))}.bias" in weights
    assert has_bias == (method != "cat_kd")  # CAT-KD's student trains without a classifier bias
    model, _ = load_zoo_model(student, str(run_dirs[0] / "student_best"), 100)  # and loads back for tools/eval.py
    assert has_classifier_bias(model) == has_bias


RECENT = ("USKD", "SDD_KD", "SDD_DKD", "SDD_NKD", "CAT_KD", "KDPP", "DKDPP")
# ImageNet numbers report.py cannot tell from a CIFAR run's (the log name has no data set): in the header only
SAME_LOG_NAME_AS_CIFAR = {("USKD", "imagenet", "ResNet18"), ("USKD", "imagenet", "ResNet50")}


def test_config_headers_and_report_published_numbers_agree():
    """Each config's header gives the published top-1 that `tools/report.py --published` shows, or says "owed"
    / "none" where there is no number."""
    seen = 0
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "sweeps" in path.parts or "coco" in path.parts:  # detection configs: AP headers (test_detection_configs)
            continue
        cfg = train_tool.load_cfg(str(path))
        if cfg.DISTILLER.TYPE not in RECENT:
            continue
        seen += 1
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        claim = [line for line in header if line.startswith("# Published top-1")]
        assert len(claim) == 1, path
        teacher = "none" if cfg.DISTILLER.TYPE == "USKD" else cfg.DISTILLER.TEACHER
        published = published_top1(cfg.DISTILLER.TYPE, teacher, cfg.DISTILLER.STUDENT)
        if (cfg.DISTILLER.TYPE, cfg.DATASET.TYPE, cfg.DISTILLER.STUDENT) in SAME_LOG_NAME_AS_CIFAR:
            assert published is None
        elif published is None:
            assert "owed" in claim[0] or "none" in claim[0] or "no table" in claim[0], (path, claim)
        else:
            assert f": {published.top1:.2f}" in claim[0], (path, claim, published)
    assert seen >= 90
