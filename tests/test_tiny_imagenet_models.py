"""The Tiny-ImageNet zoo: mdistiller's state-dict names and shapes, 64 px forwards, and the zoo/teacher lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mdistiller.engine.build import load_zoo_model, model_builder, teacher_checkpoint_path
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict, tiny_imagenet_model_dict
from mdistiller.models.tiny_imagenet import TinyMobileNetV2

REFERENCE = json.loads((Path(__file__).parent / "data" / "tiny_imagenet_models.json").read_text())

# (feats shapes at 64 px without the batch dim, pooled feature size, has preact_feats)
SHAPES = {
    "ResNet18": ([(64, 64, 64), (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8)], 512, True),
    "MobileNetV2": ([(32, 66, 66), (24, 33, 33), (32, 17, 17), (64, 9, 9), (1280, 9, 9)], 1280, False),
    "ShuffleV2": ([(24, 64, 64), (116, 32, 32), (232, 16, 16), (464, 8, 8)], 1024, True),
}


def test_the_zoo_holds_mdistillers_three_models_and_teacher_path():
    assert list(tiny_imagenet_model_dict) == ["ResNet18", "MobileNetV2", "ShuffleV2"]
    assert tiny_imagenet_model_dict["ResNet18"][1] == REFERENCE["teacher_path"]
    assert tiny_imagenet_model_dict["MobileNetV2"][1] is None and tiny_imagenet_model_dict["ShuffleV2"][1] is None


@pytest.mark.parametrize("name", list(SHAPES))
def test_state_dict_names_and_shapes_are_mdistillers(name):
    model = tiny_imagenet_model_dict[name][0](num_classes=200)
    reference = REFERENCE["models"][name]
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_params"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_at_64_pixels(name):
    torch.manual_seed(0)
    model = tiny_imagenet_model_dict[name][0](num_classes=200).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(1, 3, 64, 64))
    feat_shapes, pooled, has_preact = SHAPES[name]
    assert logits.shape == (1, 200)
    assert [tuple(f.shape[1:]) for f in feats["feats"]] == feat_shapes
    assert feats["pooled_feat"].shape == (1, pooled)
    assert (feats["preact_feats"] is not None) == has_preact
    if has_preact:
        assert [p.shape for p in feats["preact_feats"]] == [f.shape for f in feats["feats"]]
    assert model.get_stage_channels() == [shape[0] for shape in feat_shapes[1:]]


def test_mobilenetv2_head_is_a_1x1_conv_on_the_pooled_feature_and_its_bns_end_the_feature_blocks():
    torch.manual_seed(0)
    model = TinyMobileNetV2(num_classes=200).eval()
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 64, 64))
        by_hand = feats["pooled_feat"] @ model.conv2.weight.flatten(1).T + model.conv2.bias
    assert torch.allclose(logits, by_hand, atol=1e-5)
    assert torch.allclose(feats["pooled_feat"], feats["feats"][-1].mean(dim=(2, 3)), atol=1e-6)
    assert [bn.num_features for bn in model.get_bn_before_relu()] == model.get_stage_channels()


def test_shufflev2_global_pool_is_mdistillers_4x4_pool_at_32_pixels():
    """At 32 px the last map is 4x4, so both pools are one and the same; at 64 px only the global pool runs."""
    torch.manual_seed(0)
    tiny = tiny_imagenet_model_dict["ShuffleV2"][0](num_classes=200).eval()
    cifar = cifar_model_dict["ShuffleV2"][0](num_classes=200).eval()
    cifar.load_state_dict(tiny.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tiny(x)[0], cifar(x)[0])
        with pytest.raises(RuntimeError):  # mdistiller's own ShuffleV2 on a Tiny-ImageNet image
            cifar(torch.randn(2, 3, 64, 64))


def test_the_tiny_imagenet_zoo_is_chosen_by_dataset_type():
    assert model_builder("MobileNetV2", "tiny_imagenet") is tiny_imagenet_model_dict["MobileNetV2"][0]
    assert model_builder("MobileNetV2", "cifar100") is cifar_model_dict["MobileNetV2"][0]  # the half-width one
    with pytest.raises(MdistillerError, match="unknown model 'resnet32x4'; Tiny-ImageNet models: ResNet18, Mobile"):
        model_builder("resnet32x4", "tiny_imagenet")


def test_teacher_is_looked_up_at_mdistillers_path(tmp_path, monkeypatch):
    cfg = default_cfg()
    cfg.DATASET.TYPE = "tiny_imagenet"
    cfg.DISTILLER.TEACHER = "ResNet18"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MdistillerError, match="teacher checkpoint not found: download_ckpts/tiny_imagenet_teachers/"
                                              "ResNet18_vanilla/ti_res18. Train it with configs/tiny_imagenet/"
                                              "vanilla/ResNet18.yaml"):
        teacher_checkpoint_path(cfg)
    path = tmp_path / "download_ckpts" / "tiny_imagenet_teachers" / "ResNet18_vanilla" / "ti_res18"
    path.parent.mkdir(parents=True)
    torch.save({"model": tiny_imagenet_model_dict["ResNet18"][0](num_classes=200).state_dict()}, path)
    assert teacher_checkpoint_path(cfg) == "download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18"
    model, _ = load_zoo_model("ResNet18", "pretrain", 200, "tiny_imagenet")
    assert model.linear.weight.shape == (200, 512)
    cfg.DISTILLER.TEACHER = "ShuffleV2"
    with pytest.raises(MdistillerError, match="no published checkpoint for teacher ShuffleV2"):
        teacher_checkpoint_path(cfg)


@pytest.fixture(scope="module")
def upstream_student(tmp_path_factory) -> tuple[Path, TinyMobileNetV2]:
    """mdistiller's student_best of a Tiny-ImageNet MobileNetV2: {"model": state_dict with DataParallel's prefix}."""
    torch.manual_seed(1)
    saved = TinyMobileNetV2(num_classes=200)
    path = tmp_path_factory.mktemp("upstream") / "student_best"
    torch.save({"model": {f"module.{k}": v for k, v in saved.state_dict().items()}}, path)
    return path, saved


def test_an_upstream_checkpoint_loads(upstream_student):
    path, saved = upstream_student
    model, _ = load_zoo_model("MobileNetV2", str(path), 200, "tiny_imagenet")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


@pytest.mark.slow  # the guess builds every CIFAR and ImageNet model before the Tiny-ImageNet ones (~4 s)
def test_a_checkpoint_of_the_wrong_architecture_is_named(upstream_student):
    path, _ = upstream_student
    with pytest.raises(MdistillerError, match=r"holds weights of MobileNetV2 \(Tiny-ImageNet zoo\), not ShuffleV2"):
        load_zoo_model("ShuffleV2", str(path), 200, "tiny_imagenet")
