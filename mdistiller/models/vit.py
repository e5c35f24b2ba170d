"""timm models in the zoo's `(logits, feats)` form: DeiT-Tiny/Small students and the RegNetY-160 teacher (VkD, DeiT).

timm is an optional extra (`pip install -e ".[vit]"`) imported only when one of these models is built. Each model is
timm's own module with its `forward` replaced (the instance's class becomes a subclass of timm's class), so its state
dict is timm's: DeiT's and timm's weight files load as they are (e.g. DeiT's teacher file `regnety_160-a5fe301d.pth`,
`{"model": state_dict}`), and a trained student loads back into `timm.create_model(...)`.

- DeiT (timm `deit_{tiny,small}_patch16_224`, a plain ViT with a class token): `feats["tokens"]` = the output patch
  tokens after the final norm, B x N x D (the class token left out: VkD's student representation is their mean),
  `feats["cls_token"]` = the class token, `feats["pooled_feat"]` = what the classifier sees (the class token),
  `feats["feats"]` = `feats["preact_feats"]` = [] (no feature maps: CNN feature methods refuse them clearly), and no
  `feats["prepool"]` (the classifier reads a token, not a pooled map: SDD / CAT-KD refuse these models).
- RegNetY-160 (timm `regnety_160`): `feats["feats"]` = [stem, s1, s2, s3, s4] (timm's intermediates, after their
  activations; `preact_feats` repeats them), `feats["pooled_feat"]` = the globally pooled B x 3024 feature,
  `feats["prepool"]` = the map the head pools (after timm's `final_conv`, an identity for RegNetY-160).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MdistillerError

TIMM_NAMES = {  # zoo name -> timm model name
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "regnety_160": "regnety_160",
}


def import_timm():
    """timm, or a one-line MdistillerError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise MdistillerError(
            'the DeiT / RegNetY models need timm, which is not installed: pip install -e ".[vit]"'
        ) from None
    return timm


class _ViTForward:
    """Mixin over timm's VisionTransformer: forward -> (logits, feats) with the output tokens."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        tokens = self.forward_features(x)  # B x (prefix + N) x D, after the final norm
        pooled = self.forward_head(tokens, pre_logits=True)
        logits = self.head(self.head_drop(pooled))
        prefix = self.num_prefix_tokens
        feats = {
            "tokens": tokens[:, prefix:],
            "cls_token": tokens[:, 0] if getattr(self, "cls_token", None) is not None else None,
            "pooled_feat": pooled,
            "feats": [],
            "preact_feats": [],
        }
        return logits, feats

    def get_stage_channels(self) -> list[int]:
        return [self.embed_dim]

    def get_bn_before_relu(self) -> list[nn.Module]:
        return []


class _CNNForward:
    """Mixin over a timm CNN with `forward_intermediates` (timm >= 1.0): forward -> (logits, feats)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        final, intermediates = self.forward_intermediates(x)
        pooled = self.forward_head(final, pre_logits=True)
        logits = self.forward_head(final)
        return logits, {"feats": list(intermediates), "preact_feats": list(intermediates), "pooled_feat": pooled,
                        "prepool": final}

    def get_stage_channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info][1:]

    def get_bn_before_relu(self) -> list[nn.Module]:
        return []


@functools.cache
def _zoo_class(base: type, mixin: type) -> type:
    return type(f"{base.__name__}Zoo", (mixin, base), {"__module__": __name__})


def _as_zoo_model(model: nn.Module, mixin: type) -> nn.Module:
    model.__class__ = _zoo_class(type(model), mixin)
    return model


def _create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    timm = import_timm()
    return timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=num_classes, **kwargs)


def deit_tiny(num_classes: int = 1000, image_size: int = 224, drop_path_rate: float = 0.1, **kwargs: Any) -> nn.Module:
    """DeiT-Tiny (192-d, 12 blocks, 3 heads, 16x16 patches) for `image_size` inputs; stochastic depth 0.1 as DeiT and
    VkD train it."""
    model = _create("deit_tiny", num_classes, img_size=image_size, drop_path_rate=drop_path_rate, **kwargs)
    return _as_zoo_model(model, _ViTForward)


def deit_small(num_classes: int = 1000, image_size: int = 224, drop_path_rate: float = 0.1, **kwargs: Any) -> nn.Module:
    """DeiT-Small (384-d, 12 blocks, 6 heads, 16x16 patches) for `image_size` inputs; stochastic depth 0.1."""
    model = _create("deit_small", num_classes, img_size=image_size, drop_path_rate=drop_path_rate, **kwargs)
    return _as_zoo_model(model, _ViTForward)


def regnety_160(num_classes: int = 1000, image_size: int = 224, **kwargs: Any) -> nn.Module:
    """RegNetY-16GF, DeiT's teacher (any input size; `image_size` is accepted for the zoo's signature)."""
    return _as_zoo_model(_create("regnety_160", num_classes, **kwargs), _CNNForward)


VIT_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deit_tiny": deit_tiny,
    "deit_small": deit_small,
    "regnety_160": regnety_160,
}
