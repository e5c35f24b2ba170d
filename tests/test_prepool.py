"""`feats["prepool"]`: in every zoo, the very tensor the model's average pooling reads, from the forward itself.

SDD pools it into regions and CAT-KD turns the classifier into a 1x1 conv on it, so `classifier(pool(prepool))` must
be the logits with `pool` the model's own pooling (a fixed window for some CIFAR models, global at 32 px), and taking
it must not run a BN a second time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdistiller.models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict
from mdistiller.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from mdistiller.models.common import classifier_layer
from mdistiller.models.imagenet import mobilenetv1
from mdistiller.models.imagenet import resnet as imagenet_resnet
from mdistiller.models.tiny_imagenet import TinyMobileNetV2

# zoo -> (registry, class count, input size): the input sizes the zoos are trained at (ImageNet's models pool
# adaptively: 64 px keeps the test fast and still leaves a 2x2 map)
ZOOS = {
    "cifar": (cifar_model_dict, 100, 32),
    "tiny_imagenet": (tiny_imagenet_model_dict, 200, 64),
    "imagenet": (imagenet_model_dict, 1000, 64),
}
TIMM_MODELS = {"deit_tiny", "deit_small", "regnety_160"}
HEAVY = {"ResNet101", "ResNet152", "regnety_160"}  # seconds each to build on a CPU (ResNet50 covers the ResNet code)
CASES = [pytest.param(zoo, name, marks=[pytest.mark.slow] if zoo == "imagenet" and name in HEAVY else [])
         for zoo, (registry, _, _) in ZOOS.items() for name in registry]

# CIFAR: prepool channels and side at 32 px, and whether it is the last `feats` entry (spec recent.md §5 / §9)
CIFAR_PREPOOL = {
    **{n: (64, 8, True) for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "resnet8x4": (256, 8, True), "resnet32x4": (256, 8, True),
    "ResNet18": (512, 4, True), "ResNet50": (2048, 4, True),
    "wrn_16_1": (64, 8, False), "wrn_40_1": (64, 8, False), "wrn_16_2": (128, 8, False), "wrn_40_2": (128, 8, False),
    **{n: (512, 4, True) for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "MobileNetV2": (1280, 2, False), "ShuffleV1": (960, 4, True), "ShuffleV2": (1024, 4, False),
}


def model_pool(model: nn.Module, prepool: torch.Tensor) -> torch.Tensor:
    """The pooling each model's forward applies to its pre-pool map (read off each model's code), B x D."""
    if isinstance(model, (resnet.ResNet, wrn.WideResNet)):  # nn.AvgPool2d(8) / F.avg_pool2d(out, 8)
        return F.avg_pool2d(prepool, 8).flatten(1)
    if isinstance(model, shufflenetv1.ShuffleNet):  # F.avg_pool2d(out, 4)
        return F.avg_pool2d(prepool, 4).flatten(1)
    if isinstance(model, shufflenetv2.ShuffleNetV2) and not model.global_pool:  # F.avg_pool2d(out, 4)
        return F.avg_pool2d(prepool, 4).flatten(1)
    if isinstance(model, mobilenetv2.MobileNetV2):  # nn.AvgPool2d(input_size // 16, ceil_mode=True)
        return F.avg_pool2d(prepool, 2, ceil_mode=True).flatten(1)
    adaptive = (vgg.VGG, resnetv2.ResNet, shufflenetv2.ShuffleNetV2, imagenet_resnet.ResNet, mobilenetv1.MobileNetV1,
                TinyMobileNetV2)
    if isinstance(model, adaptive) or type(model).__name__.startswith("RegNet"):
        return F.adaptive_avg_pool2d(prepool, 1).flatten(1)
    raise AssertionError(f"no pooling known for {type(model).__name__}: add it here")


def apply_classifier(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    layer = classifier_layer(model)
    return layer(pooled) if isinstance(layer, nn.Linear) else layer(pooled[:, :, None, None]).flatten(1)


def _build(zoo: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    registry, classes, size = ZOOS[zoo]
    if name in TIMM_MODELS:
        pytest.importorskip("timm")
    torch.manual_seed(0)
    extra = {"image_size": size} if zoo == "imagenet" else {}
    model = registry[name][0](num_classes=classes, **extra)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, images


@pytest.mark.parametrize("zoo,name", CASES)
def test_prepool_is_what_the_pooling_reads_and_the_forward_runs_each_bn_once(zoo, name):
    model, images = _build(zoo, name)
    if name in ("deit_tiny", "deit_small"):
        assert "prepool" not in model(images)[1]  # a ViT classifies its class token: no pooled map
        return
    logits, feats = model.train()(images)
    prepool = feats["prepool"]
    layer = classifier_layer(model)
    dim = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    assert prepool.dim() == 4 and prepool.shape[:2] == (2, dim)
    if zoo == "cifar":
        channels, side, is_last_feat = CIFAR_PREPOOL[name]
        assert tuple(prepool.shape) == (2, channels, side, side)
        assert (prepool is feats["feats"][-1]) == is_last_feat

    pooled = model_pool(model, prepool)
    torch.testing.assert_close(pooled, feats["pooled_feat"], rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_classifier(model, pooled), logits, rtol=1e-5, atol=1e-5)
    # at the zoo's input size every pooling is global (SDD's 1x1 region is the ordinary pooled feature)
    torch.testing.assert_close(pooled, prepool.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    # the forward's own tensor, in the logits' graph (not a recomputation beside it)
    (grad,) = torch.autograd.grad(logits.sum(), prepool)
    assert grad.shape == prepool.shape

    # one forward = one update of every BN's running statistics
    tracked = {k: int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {1}, {k: v for k, v in tracked.items() if v != 1}


def test_every_cifar_model_has_its_expected_prepool_entry():
    assert set(CIFAR_PREPOOL) == set(cifar_model_dict)


def test_the_maps_after_the_last_feature_are_the_models_heads():
    """WRN, ShuffleV2 and MobileNetV2 pool a map computed after `feats[-1]` (eval mode: the BNs' running stats)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name, head in [
            ("wrn_16_2", lambda m, f: F.relu(m.bn1(f))),
            ("ShuffleV2", lambda m, f: F.relu(m.bn2(m.conv2(f)))),
            ("MobileNetV2", lambda m, f: m.conv2(f)),
        ]:
            model = cifar_model_dict[name][0](num_classes=100).eval()
            for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
            _, feats = model(images)
            torch.testing.assert_close(feats["prepool"], head(model, feats["feats"][-1]), rtol=0, atol=0)


def test_a_models_state_dict_does_not_change():
    """The pre-pool map is an output, not a module: the published keys stay (tests/test_models_cifar.py pins all)."""
    model = cifar_model_dict["MobileNetV2"][0](num_classes=100)
    assert not any("prepool" in k for k in model.state_dict())
    assert [k for k in model.state_dict() if k.startswith("conv2.") or k.startswith("classifier.")] == [
        "conv2.0.weight", "conv2.1.weight", "conv2.1.bias", "conv2.1.running_mean", "conv2.1.running_var",
        "conv2.1.num_batches_tracked", "classifier.0.weight", "classifier.0.bias"]


def test_mobilenetv2_without_its_pool_classifies_the_prepool_map_flattened():
    model = mobilenetv2.MobileNetV2(T=6, feature_dim=10, width_mult=0.5, remove_avg=True, input_size=32).eval()
    model.classifier = nn.Sequential(nn.Linear(1280 * 2 * 2, 10))
    with torch.no_grad():
        logits, feats = model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(logits, model.classifier(feats["prepool"].flatten(1)))
