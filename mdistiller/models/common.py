"""What every zoo model shares: the reference initialisations, the stage-channel accessor, the stage of blocks that
return `(out, preact)` with the ResNet way of building and running them, and the classifier seen from outside (on
region vectors, as a 1x1 conv on the pre-pool map, without its bias)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError


def classifier(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of a model (its classifier), whatever its attribute name (fc, linear, classifier, head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MdistillerError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def num_classes_of_model(model: nn.Module) -> int:
    """The class count of a model: its classifier's outputs (-1 when it has none)."""
    try:
        layer = classifier_layer(model)
    except MdistillerError:
        return -1
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class ZooModel(nn.Module):
    """A zoo model: `forward -> (logits, feats)`; `stage_channels` lists the channels of `feats[1:]`.

    `feats["prepool"]` is the tensor the model's average pooling reads, taken from the forward itself (so a final
    BN runs once): `classifier(pool(prepool))` is the logits, `pool` being the model's own pooling (global at the
    zoo's input size). It is `feats[-1]` for the ResNets, VGG, ShuffleV1 and MobileNetV1, and a map after it for
    WRN (`relu(bn1(block3))`), ShuffleV2 (`relu(bn2(conv2(layer3)))`) and the MobileNetV2s (their last conv).

    What the feature distillers read, besides `feats`: `get_stage_channels()` (channels of `feats[1:]`, the stem
    left out: unlike upstream's CIFAR models, whose lists start with the stem, nothing should slice it off again),
    `get_bn_before_relu()` where the model has one BN before each stage's last ReLU, and `ofd_first_stage`.
    """

    stage_channels: list[int]
    # OFD distils the stages from this index on. 0 everywhere but on the ImageNet ResNets and MobileNetV1, whose
    # upstream `get_stage_channels()` lists no stem, so that upstream's OFD (which slices one entry off as a stem)
    # leaves out their first stage: R50 -> MobileNetV1 has 3 connectors there (256->512, 512->1024, 1024->2048).
    ofd_first_stage: int = 0

    def get_stage_channels(self) -> list[int]:
        """Channels of ``feats[1:]`` (the stage outputs)."""
        return list(self.stage_channels)

    def classifier_layer(self) -> ClassifierLayer:
        """The layer that makes the logits from the pooled feature: the last nn.Linear (a 1x1 conv overrides)."""
        return classifier(self)


ClassifierLayer = Union[nn.Linear, nn.Conv2d]


def classifier_layer(model: nn.Module) -> ClassifierLayer:
    """The layer that makes a model's logits: a zoo model's own (the Tiny-ImageNet MobileNetV2's is a 1x1 conv),
    else the last nn.Linear (timm's models)."""
    if isinstance(model, ZooModel):
        return model.classifier_layer()
    return classifier(model)


def classifier_name(model: nn.Module) -> str:
    """The qualified module name of the model's classifier layer (``fc``, ``linear``, ``classifier.0``, ...)."""
    layer = classifier_layer(model)
    return next(name for name, module in model.named_modules() if module is layer)


def classifier_weights(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The classifier as a C x D matrix and its C bias (None once dropped), whether it is a linear or a 1x1 conv."""
    layer = classifier_layer(model)
    if isinstance(layer, nn.Conv2d) and (layer.kernel_size != (1, 1) or layer.groups != 1):
        raise MdistillerError(f"{type(model).__name__}'s classifier is a {layer.kernel_size} conv with "
                              f"{layer.groups} groups, not a 1x1 conv: it is not a linear map of the pooled feature")
    return layer.weight.flatten(1), layer.bias


def classify_regions(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """The model's own classifier (weight and bias) applied to each of N region vectors: (B, D, N) -> (B, C, N)."""
    weight, bias = classifier_weights(model)
    if vectors.dim() != 3 or vectors.shape[1] != weight.shape[1]:
        raise MdistillerError(f"region vectors must be B x {weight.shape[1]} x N for {type(model).__name__}'s "
                              f"classifier, got {list(vectors.shape)}")
    return F.linear(vectors.transpose(1, 2), weight, bias).transpose(1, 2)


def class_activation_maps(model: nn.Module, prepool: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """The classifier as a 1x1 conv on the pre-pool map (bias-free unless asked): (B, D, H, W) -> (B, C, H, W).
    Their spatial mean is the logits minus the bias when the model pools globally."""
    weight, b = classifier_weights(model)
    if prepool.dim() != 4 or prepool.shape[1] != weight.shape[1]:
        raise MdistillerError(f"the pre-pool map must be B x {weight.shape[1]} x H x W for {type(model).__name__}'s "
                              f"classifier, got {list(prepool.shape)}")
    return F.conv2d(prepool, weight[:, :, None, None], b if bias else None)


def drop_classifier_bias(model: nn.Module) -> nn.Module:
    """Remove the classifier's bias (None: out of `parameters()` and of the state dict), as CAT-KD trains its
    student; a checkpoint without `<classifier>.bias` is loaded back the same way (`engine.checkpoint`)."""
    classifier_layer(model).register_parameter("bias", None)
    return model


def has_classifier_bias(model: nn.Module) -> bool:
    """Whether the model's classifier has a bias (False once dropped)."""
    return classifier_layer(model).bias is not None


def prepool_map(feats: Mapping[str, Any], who: str = "the model") -> torch.Tensor:
    """`feats["prepool"]`, or a one-line MdistillerError for a model without a pooled map (the ViTs)."""
    prepool = feats.get("prepool")
    if prepool is None:
        raise MdistillerError(f"{who} has no pre-pool feature map (feats['prepool']): its classifier does not read an "
                              f"average-pooled map (a ViT classifies a token)")
    return prepool


class Stage(nn.Sequential):
    """Blocks in sequence (children `0`, `1`, ... as the published `layerN`), each returning ``(out, preact)``;
    returns the pair of its last block."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact


def resnet_stage(block: Callable[[int, int, int], nn.Module], in_planes: int, planes: int, blocks: int,
                 stride: int, expansion: int) -> tuple[Stage, int]:
    """`blocks` blocks `block(in, planes, stride)`, the first with `stride`; the stage and its output channels."""
    layers: list[nn.Module] = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes * expansion
    return Stage(*layers), in_planes


def run_stages(x: torch.Tensor, stages: Iterable[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each stage's output and pre-activation, running the stages in sequence from `x`."""
    outs, preacts = [], []
    for stage in stages:
        x, preact = stage(x)
        outs.append(x)
        preacts.append(preact)
    return outs, preacts


def kaiming_init(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: kaiming-normal (fan_out) convolutions, norms at weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def fan_out_normal_init(model: nn.Module, linear_std: float | None = 0.01) -> None:
    """The VGG / MobileNetV2 / WRN initialisation: convolutions N(0, 2 / fan_out), BN at 1 and 0, linear biases 0 and
    linear weights N(0, linear_std) (left at PyTorch's default when linear_std is None, as WRN does)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
