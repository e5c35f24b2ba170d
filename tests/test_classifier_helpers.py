"""The classifier seen from outside (models/common.py): on SDD's region vectors, as CAT-KD's 1x1 conv on the pre-pool
map, and without its bias (CAT-KD's student)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict, imagenet_model_dict, tiny_imagenet_model_dict
from mdistiller.models.common import (
    class_activation_maps,
    classifier_layer,
    classifier_name,
    classifier_weights,
    classify_regions,
    drop_classifier_bias,
    has_classifier_bias,
    num_classes_of_model,
    prepool_map,
)

# (builder, classes, input size): a Linear head, a Sequential(Linear) head, the 1x1-conv head, an ImageNet model
MODELS = {
    "resnet8": (cifar_model_dict["resnet8"][0], 100, 32),
    "MobileNetV2": (cifar_model_dict["MobileNetV2"][0], 100, 32),
    "wrn_16_1": (cifar_model_dict["wrn_16_1"][0], 100, 32),
    "ShuffleV2": (cifar_model_dict["ShuffleV2"][0], 100, 32),
    "tiny_MobileNetV2": (tiny_imagenet_model_dict["MobileNetV2"][0], 200, 64),
    "MobileNetV1": (imagenet_model_dict["MobileNetV1"][0], 1000, 64),
}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    builder, classes, size = MODELS[name]
    torch.manual_seed(0)
    model = builder(num_classes=classes).eval()
    with torch.no_grad():  # a bias that is not zero, so that leaving it out (or in) shows
        classifier_layer(model).bias.uniform_(-1.0, 1.0)
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _matrix_and_bias(model: nn.Module) -> tuple[list[list[float]], list[float]]:
    """The classifier's weight (C x D) and bias as Python lists, read off the layer itself."""
    layer = classifier_layer(model)
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    return weight.tolist(), layer.bias.detach().tolist()


def test_classifier_layer_and_name_per_head():
    names = {name: classifier_name(_model(name)[0]) for name in MODELS}
    assert names == {"resnet8": "fc", "MobileNetV2": "classifier.0", "wrn_16_1": "fc", "ShuffleV2": "linear",
                     "tiny_MobileNetV2": "conv2", "MobileNetV1": "fc"}
    assert isinstance(classifier_layer(_model("tiny_MobileNetV2")[0]), nn.Conv2d)
    assert num_classes_of_model(_model("tiny_MobileNetV2")[0]) == 200  # its head is a conv, not an nn.Linear
    assert num_classes_of_model(nn.Conv2d(3, 3, 1)) == -1


@pytest.mark.parametrize("name", ["resnet8", "tiny_MobileNetV2"])
def test_classify_regions_is_the_classifier_with_its_bias_on_each_region(name):
    model, _ = _model(name)
    weight, bias = _matrix_and_bias(model)
    classes, dim = len(weight), len(weight[0])
    vectors = torch.randn(2, dim, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    got = classify_regions(model, vectors)
    assert got.shape == (2, classes, 3)
    v = vectors.detach().tolist()
    for b in range(2):
        for n in range(3):
            for c in (0, 7, classes - 1):
                expected = bias[c] + sum(weight[c][d] * v[b][d][n] for d in range(dim))
                assert abs(got[b, c, n].item() - expected) < 1e-4
    got.sum().backward()  # the gradient reaches the classifier (weight and bias) and the region vectors
    layer = classifier_layer(model)
    assert layer.weight.grad is not None and layer.bias.grad is not None and vectors.grad is not None
    torch.testing.assert_close(layer.bias.grad, torch.full_like(layer.bias, 6.0))  # B * N regions per class


def test_classify_regions_of_the_global_region_is_the_logits():
    model, images = _model("ShuffleV2")
    with torch.no_grad():
        logits, feats = model(images)
        regions = classify_regions(model, feats["prepool"].mean(dim=(2, 3))[:, :, None])
    torch.testing.assert_close(regions[:, :, 0], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_cams_are_the_bias_free_classifier_per_position_and_average_to_the_logits_minus_bias(name):
    model, images = _model(name)
    with torch.no_grad():
        logits, feats = model(images)
        prepool = feats["prepool"]
        cams = class_activation_maps(model, prepool)
        with_bias = class_activation_maps(model, prepool, bias=True)
    assert cams.shape == (2, logits.shape[1], *prepool.shape[2:])
    bias = classifier_layer(model).bias
    torch.testing.assert_close(cams.mean(dim=(2, 3)), logits - bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_bias.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4)
    # one position by hand: sum_d W[c, d] * X[b, d, i, j]
    weight, _ = _matrix_and_bias(model)
    x = prepool[1, :, 1, 0].tolist()
    for c in (0, 3):
        assert abs(cams[1, c, 1, 0].item() - sum(w * xi for w, xi in zip(weight[c], x))) < 1e-4


def test_dropping_the_bias_removes_it_from_parameters_state_dict_and_logits():
    model, images = _model("resnet8")
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits, _ = model(images)
    assert has_classifier_bias(model)
    bias = classifier_layer(model).bias.detach().clone()
    assert drop_classifier_bias(model) is model
    assert not has_classifier_bias(model) and classifier_layer(model).bias is None
    assert "fc.bias" not in model.state_dict() and "fc.weight" in model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == before - 100
    with torch.no_grad():
        unbiased, feats = model(images)
        cams = class_activation_maps(model, feats["prepool"], bias=True)  # no bias left to add
    torch.testing.assert_close(unbiased, logits - bias)
    torch.testing.assert_close(cams.mean(dim=(2, 3)), unbiased, rtol=1e-5, atol=1e-5)
    assert classify_regions(model, torch.zeros(2, 64, 1)).abs().max() == 0
    drop_classifier_bias(model)  # idempotent
    conv_head, _ = _model("tiny_MobileNetV2")
    assert "conv2.bias" not in drop_classifier_bias(conv_head).state_dict()


def test_bad_shapes_and_missing_prepool_are_one_line_errors():
    model, _ = _model("resnet8")
    with pytest.raises(MdistillerError, match=r"region vectors must be B x 64 x N .* got \[2, 32, 4\]"):
        classify_regions(model, torch.zeros(2, 32, 4))
    with pytest.raises(MdistillerError, match=r"region vectors must be B x 64 x N"):
        classify_regions(model, torch.zeros(2, 64))
    with pytest.raises(MdistillerError, match=r"pre-pool map must be B x 64 x H x W .* got \[2, 64, 8\]"):
        class_activation_maps(model, torch.zeros(2, 64, 8))
    with pytest.raises(MdistillerError, match=r"deit_tiny has no pre-pool feature map"):
        prepool_map({"feats": [], "pooled_feat": torch.zeros(1)}, "deit_tiny")
    x = torch.zeros(1, 64, 2, 2)
    assert prepool_map({"prepool": x}) is x
    with pytest.raises(MdistillerError, match="has no nn.Linear classifier"):
        classifier_weights(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_a_head_that_is_not_a_1x1_conv_is_refused():
    from mdistiller.models.common import ZooModel

    class Odd(ZooModel):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(8, 4, 3)

        def classifier_layer(self) -> nn.Conv2d:
            return self.head

    with pytest.raises(MdistillerError, match=r"Odd's classifier is a \(3, 3\) conv with 1 groups, not a 1x1 conv"):
        classifier_weights(Odd())
