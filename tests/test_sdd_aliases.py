"""SDD's `<name>_sdd` model names read as the zoo's models (same weights, same teacher checkpoint), with a warning."""

from __future__ import annotations

import pytest
import torch

from mdistiller.engine.build import build_model, model_builder, teacher_checkpoint_path, zoo_name
from mdistiller.engine.cfg import default_cfg
from mdistiller.models.cifar import CIFAR_ALIASES, cifar_model_dict
from mdistiller.models.imagenet import IMAGENET_ALIASES

# the names of SDD's mdistiller/models/cifar/__init__.py and models/imagenet/__init__.py (shicaiwei123/SDD-CVPR2024)
SDD_CIFAR = ["resnet56_sdd", "resnet110_sdd", "resnet32x4_sdd", "ResNet50_sdd", "wrn_40_2_sdd", "vgg13_sdd",
             "wrn_16_1_sdd", "wrn_16_2_sdd", "wrn_40_1_sdd", "vgg8_sdd", "vgg11_sdd", "vgg16_sdd", "vgg19_sdd",
             "MobileNetV2_sdd", "ShuffleV1_sdd", "ShuffleV2_sdd", "resnet8_sdd", "resnet14_sdd", "resnet20_sdd",
             "resnet32_sdd", "resnet44_sdd", "resnet8x4_sdd", "ResNet18_sdd"]
SDD_IMAGENET = {"ResNet18_sdd": "ResNet18", "ResNet34_sdd": "ResNet34", "ResNet50_sdd": "ResNet50",
                "ResNet101_sdd": "ResNet101", "MobileNetV2_sdd": "MobileNetV1"}


def _signature(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_the_alias_tables_hold_sdds_names():
    assert sorted(CIFAR_ALIASES) == sorted(SDD_CIFAR)
    assert all(CIFAR_ALIASES[name][0] == name[: -len("_sdd")] for name in SDD_CIFAR)
    assert {k: v[0] for k, v in IMAGENET_ALIASES.items() if k.endswith("_sdd")} == SDD_IMAGENET


@pytest.mark.parametrize("alias", SDD_CIFAR)
def test_each_cifar_alias_builds_the_zoo_model(alias):
    plain = alias[: -len("_sdd")]
    assert model_builder(alias, "cifar100") is cifar_model_dict[plain][0]
    with torch.device("meta"):
        got, expected = build_model(alias, 100, "cifar100"), build_model(plain, 100, "cifar100")
    assert type(got) is type(expected) and _signature(got) == _signature(expected)


@pytest.mark.parametrize("alias,plain", list(SDD_IMAGENET.items()))
def test_each_imagenet_alias_builds_the_zoo_model(alias, plain):
    with torch.device("meta"):
        got, expected = build_model(alias, 1000, "imagenet"), build_model(plain, 1000, "imagenet")
    assert type(got).__name__ == type(expected).__name__ and _signature(got) == _signature(expected)


def test_an_alias_is_read_with_a_one_line_warning_once(capsys, monkeypatch):
    monkeypatch.setattr("mdistiller.engine.build._WARNED_ALIASES", set())  # earlier tests of this process warned
    capsys.readouterr()
    assert zoo_name("vgg19_sdd", "cifar100") == "vgg19"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model vgg19_sdd is read as vgg19 on CIFAR" in err
    assert zoo_name("vgg19_sdd", "cifar100") == "vgg19" and capsys.readouterr().err == ""
    assert zoo_name("vgg19", "cifar100") == "vgg19" and zoo_name("ResNet18_sdd", "tiny_imagenet") == "ResNet18_sdd"


def test_the_teacher_checkpoint_of_an_alias_is_the_vanilla_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mdistiller.files.PROJECT_ROOT", tmp_path)
    zoo = tmp_path / "download_ckpts/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth"
    zoo.parent.mkdir(parents=True)
    zoo.write_bytes(b"")
    cfg = default_cfg()
    cfg.DISTILLER.TEACHER = "resnet32x4"
    expected = teacher_checkpoint_path(cfg)
    cfg.DISTILLER.TEACHER = "resnet32x4_sdd"
    assert teacher_checkpoint_path(cfg) == expected and expected.endswith("resnet32x4_vanilla/ckpt_epoch_240.pth")

    folder = tmp_path / "download_ckpts/imagenet_teachers"
    folder.mkdir(parents=True)
    (folder / "ResNet34.pth").write_bytes(b"")
    cfg.DATASET.TYPE, cfg.DISTILLER.TEACHER = "imagenet", "ResNet34_sdd"
    assert teacher_checkpoint_path(cfg).endswith("imagenet_teachers/ResNet34.pth")


def test_tools_eval_takes_an_alias_with_the_published_weights(tmp_path, monkeypatch, cifar100_root):
    from mdistiller.cli import eval as eval_tool

    from conftest import save_teacher

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mdistiller.files.PROJECT_ROOT", tmp_path)
    save_teacher(str(tmp_path / "download_ckpts/cifar_teachers/resnet56_vanilla/ckpt_epoch_240.pth"), "resnet56")
    args = ["-c", "pretrain", "-d", "cifar100", "--data-root", cifar100_root, "--num-workers", "0"]
    assert eval_tool.main(["-m", "resnet56_sdd", *args]) == eval_tool.main(["-m", "resnet56", *args])
