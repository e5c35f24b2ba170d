"""Checkpoints: the published teacher format loads, a wrong architecture is named, writes are atomic."""

from __future__ import annotations

import os

import pytest
import torch

from mdistiller.engine.build import build_teacher, teacher_checkpoint_path
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.checkpoint import load_model_weights, save_checkpoint
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict


def _model(name: str, classes: int = 100, seed: int = 0):
    torch.manual_seed(seed)
    return cifar_model_dict[name][0](num_classes=classes).eval()


@pytest.mark.parametrize("wrap", ["model", "bare", "module_prefix", "state_dict"])
def test_published_formats_load_and_reproduce_outputs(tmp_path, wrap):
    source = _model("resnet20", seed=1)
    state = source.state_dict()
    if wrap == "module_prefix":  # saved from DataParallel
        obj = {"model": {f"module.{k}": v for k, v in state.items()}}
    elif wrap == "bare":
        obj = state
    else:
        obj = {wrap: state}
    torch.save(obj, tmp_path / "ckpt_epoch_240.pth")
    target = _model("resnet20", seed=2)
    load_model_weights(target, str(tmp_path / "ckpt_epoch_240.pth"), "resnet20", 100)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target(x)[0], source(x)[0], rtol=0, atol=0)


def test_wrong_architecture_names_both(tmp_path):
    torch.save({"model": _model("resnet8x4").state_dict()}, tmp_path / "t.pth")
    with pytest.raises(MdistillerError, match=r"holds weights of resnet8x4, not resnet32x4 \(100 classes\)"):
        load_model_weights(_model("resnet32x4"), str(tmp_path / "t.pth"), "resnet32x4", 100)


def test_wrong_class_count_is_explained(tmp_path):
    torch.save({"model": _model("resnet8", classes=10).state_dict()}, tmp_path / "t.pth")
    with pytest.raises(MdistillerError, match=r"resnet8 with 10 classes, not resnet8 \(100 classes\): fc.weight"):
        load_model_weights(_model("resnet8"), str(tmp_path / "t.pth"), "resnet8", 100)


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(MdistillerError, match="checkpoint not found"):
        load_model_weights(_model("resnet8"), str(tmp_path / "absent.pth"), "resnet8", 100)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(MdistillerError, match="junk.pth is unreadable"):
        load_model_weights(_model("resnet8"), str(tmp_path / "junk.pth"), "resnet8", 100)


def test_teacher_path_from_zoo_or_override(tmp_path, monkeypatch):
    cfg = default_cfg()
    cfg.DISTILLER.TEACHER = "resnet56"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MdistillerError, match="teacher checkpoint not found: download_ckpts/cifar_teachers/resnet56"):
        teacher_checkpoint_path(cfg)
    zoo = tmp_path / "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"
    zoo.parent.mkdir(parents=True)
    torch.save({"model": _model("resnet56").state_dict()}, zoo)
    assert build_teacher(cfg, 100).training is False
    cfg.DISTILLER.TEACHER_CKPT = str(tmp_path / "elsewhere.pth")
    with pytest.raises(MdistillerError, match="elsewhere.pth"):
        build_teacher(cfg, 100)
    cfg.DISTILLER.TEACHER, cfg.DISTILLER.TEACHER_CKPT = "resnet8", ""
    with pytest.raises(MdistillerError, match="no published checkpoint for teacher resnet8"):
        teacher_checkpoint_path(cfg)


def test_atomic_save_leaves_previous_file_intact_on_failure(tmp_path):
    path = str(tmp_path / "latest")
    save_checkpoint({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom while writing")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False)["epoch"] == 1
    assert os.listdir(tmp_path) == ["latest"]  # no temporary file left behind


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MdistillerError, match="could not write checkpoint .*sub/latest"):
        save_checkpoint({"epoch": 1}, str(blocker / "sub" / "latest"))


def _bias_free_student(tmp_path, arch: str = "resnet8"):
    """A student trained without a classifier bias (CAT-KD's), saved as RunState.student_state writes it."""
    from mdistiller.models.common import drop_classifier_bias

    student = drop_classifier_bias(_model(arch, seed=3))
    with torch.no_grad():  # BN statistics and weights away from their initial values
        student.train()(torch.randn(8, 3, 32, 32))
        student.fc.weight.mul_(3.0)
    student.eval()
    path = tmp_path / "student_best"
    save_checkpoint({"model": student.state_dict(), "arch": arch, "num_classes": 100, "epoch": 1, "test_acc": 1.0},
                    str(path))
    return student, str(path)


def test_a_student_without_classifier_bias_loads_without_one(tmp_path, capsys):
    student, path = _bias_free_student(tmp_path)
    model = _model("resnet8", seed=4)
    load_model_weights(model, path, "resnet8", 100)
    assert model.fc.bias is None and "fc.bias" not in model.state_dict()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "has no fc.bias" in out[0] and "resnet8 is loaded without one" in out[0], out
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], student(x)[0], rtol=0, atol=0)


def test_only_the_classifier_bias_may_be_missing(tmp_path):
    state = _model("resnet8").state_dict()
    for dropped in (["fc.bias", "bn1.weight"], ["layer1.0.bn1.bias"]):
        torch.save({"model": {k: v for k, v in state.items() if k not in dropped}}, tmp_path / "t.pth")
        model = _model("resnet8")
        with pytest.raises(MdistillerError, match=r"weights of resnet8 are missing"):
            load_model_weights(model, str(tmp_path / "t.pth"), "resnet8", 100)
        assert model.fc.bias is not None  # a refused file leaves the model as built
    extra = {k: v for k, v in state.items() if k != "fc.bias"}
    extra["fc.extra"] = torch.zeros(1)
    torch.save({"model": extra}, tmp_path / "t.pth")
    with pytest.raises(MdistillerError, match="holds weights of"):
        load_model_weights(_model("resnet8"), str(tmp_path / "t.pth"), "resnet8", 100)


def test_tools_eval_evaluates_a_bias_free_student(tmp_path, cifar100_root, capsys):
    """tools/eval.py's path (cli.eval -> load_zoo_model -> load_model_weights) on CAT-KD's student file."""
    from mdistiller.cli import eval as eval_tool
    from mdistiller.dataset import eval_loader, get_test_set
    from mdistiller.engine.cfg import data_cfg
    from mdistiller.engine.evaluate import evaluate

    student, path = _bias_free_student(tmp_path)
    got = eval_tool.main(["-m", "resnet8", "-c", path, "-d", "cifar100", "--data-root", cifar100_root,
                          "--num-workers", "0"])
    assert "has no fc.bias" in capsys.readouterr().out
    loader = eval_loader(get_test_set(data_cfg("cifar100", cifar100_root, 224)), 64, 0)
    expected = evaluate(student, loader, torch.device("cpu"))
    assert got["top1"] == expected["top1"] and got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
