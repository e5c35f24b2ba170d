"""ReviewKD (Chen et al., CVPR 2021, "Distilling knowledge via knowledge review"), DISTILLER.TYPE `REVIEWKD`.

    loss_ce = CE_WEIGHT * CE(z_s, y)
    loss_kd = REVIEWKD_WEIGHT * min(epoch / WARMUP_EPOCHS, 1) * sum_levels hcl(out_level, teacher_level)

Levels, shallow to deep: the stage outputs (stem left out) then the pooled feature as a 1x1 map. Student: `feats`
(or `preact_feats` with REVIEWKD.STU_PREACT); teacher: `preact_feats`. Attention-based fusion (ABF) runs from the
deepest level up: each level's student map goes through `conv1` (1x1 to `mid` channels + BN); below the pooled level
the residual from the level under it is upsampled (nearest) to this level's student size and fused with it by two
sigmoid attention maps (`att_conv`, a 1x1 conv of both); the fused map is resized (nearest) to the teacher's size,
passed on as the next residual, and `conv2` (3x3 to the teacher's channels + BN) gives this level's output. HCL:
mse at full size plus mse after average pooling to 4x4, 2x2, 1x1 (those smaller than the map), weighted 1, 1/2,
1/4, 1/8, divided by the sum of the weights used. Epochs count from 1.

State-dict names are upstream's: `abfs.{i}.conv1.{0,1}`, `abfs.{i}.conv2.{0,1}`, `abfs.{i}.att_conv.0` with `abfs.0`
the pooled level (no fusion) and the shallowest level last; conv weights kaiming_uniform(a=1), `mid = min(512,
IN_CHANNELS[-1])`: upstream ignores REVIEWKD.MAX_MID_CHANNEL (REVIEWKD.USE_MAX_MID_CHANNEL True honours it: mid =
min(MAX_MID_CHANNEL, IN_CHANNELS[-1]), and upstream's checkpoints then no longer load).

The channel/shape lists (REVIEWKD.IN_CHANNELS, OUT_CHANNELS, SHAPES, OUT_SHAPES) are determined by the two models:
`reviewkd_lists(student, teacher, input_size)` computes them with the shared probe, every shipped config carries
them, and a config whose lists do not fit its models is refused in one line that gives the lists to use. The
defaults fit resnet32x4 -> resnet8x4, so upstream's CIFAR file trains unchanged. When the stage counts differ the
levels are aligned from the deepest (pooled with pooled); upstream pairs the teacher's from the shallowest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .feature_hooks import feature_maps
from .precision import fp32_loss
from .probe import CIFAR_INPUT_SIZE, DEFAULT_SETTING, Setting, probe_features, probe_input_size
from .registry import register_distiller

LIST_KEYS = ("SHAPES", "OUT_SHAPES", "IN_CHANNELS", "OUT_CHANNELS")
UPSTREAM_MAX_MID = 512  # the cap upstream applies whatever MAX_MID_CHANNEL says


class ABF(nn.Module):
    """Attention-based fusion of one level (upstream's names: conv1, conv2, att_conv)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channel, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, shape: int | None = None,
                out_shape: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this level's output, the fused mid-channel map passed to the next level up)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (shape, shape), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


@fp32_loss
def hcl_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss summed over the levels (fp32); see the module docstring."""
    total = torch.zeros((), device=student_feats[0].device)
    for fs, ft in zip(student_feats, teacher_feats):
        fs, ft = fs.float(), ft.float()
        loss = F.mse_loss(fs, ft)
        weight, weights = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
            weights += weight
        total = total + loss / weights
    return total


def _levels(feats: dict, key: str, role: str, names: tuple[str, str]) -> list[tuple[int, int]]:
    """(channels, height) of each stage output (stem left out)."""
    maps = feature_maps(feats, key, "REVIEWKD", role, names)[1:]
    return [(int(f.shape[1]), int(f.shape[2])) for f in maps]


def reviewkd_lists(student: nn.Module, teacher: nn.Module, input_size, stu_preact: bool = False,
                   names: tuple[str, str] = ("student", "teacher")) -> dict[str, list[int]]:
    """REVIEWKD.{SHAPES, OUT_SHAPES, IN_CHANNELS, OUT_CHANNELS} for a pair, from a clean probe at input_size."""
    feats_s, feats_t = probe_features((student, teacher), input_size)
    key = "preact_feats" if stu_preact else "feats"
    s_levels = _levels(feats_s, key, "student", names)
    t_levels = _levels(feats_t, "preact_feats", "teacher", names)
    n = min(len(s_levels), len(t_levels))
    s_levels, t_levels = s_levels[len(s_levels) - n:], t_levels[len(t_levels) - n:]
    return {
        "SHAPES": [1] + [h for _, h in reversed(s_levels)],
        "OUT_SHAPES": [1] + [h for _, h in reversed(t_levels)],
        "IN_CHANNELS": [c for c, _ in s_levels] + [int(feats_s["pooled_feat"].shape[1])],
        "OUT_CHANNELS": [c for c, _ in t_levels] + [int(feats_t["pooled_feat"].shape[1])],
    }


def lists_as_overrides(lists: dict[str, list[int]]) -> str:
    """`REVIEWKD.SHAPES [1,8,16,32] ...`: the lists as command-line overrides."""
    return " ".join(f"REVIEWKD.{key} [{','.join(str(v) for v in lists[key])}]" for key in LIST_KEYS)


config_section("REVIEWKD", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
    "REVIEWKD_WEIGHT": Key(1.0, "weight of the hierarchical context loss"),
    "WARMUP_EPOCHS": Key(20, "epochs of the linear warm-up of the review term (>= 1)"),
    "SHAPES": Key([1, 8, 16, 32], "spatial sizes of the student levels (deepest first after the pooled one)"),
    "OUT_SHAPES": Key([1, 8, 16, 32], "spatial sizes of the teacher levels"),
    "IN_CHANNELS": Key([64, 128, 256, 256], "student channels per level"),
    "OUT_CHANNELS": Key([64, 128, 256, 256], "teacher channels per level"),
    "MAX_MID_CHANNEL": Key(512, "read but ignored by upstream (mid = min(512, IN_CHANNELS[-1]))"),
    "STU_PREACT": Key(False, "the student's pre-activation maps instead of its stage outputs"),
    "USE_MAX_MID_CHANNEL": Key(False, "ours: True honours MAX_MID_CHANNEL (upstream checkpoints then differ)"),
})


@register_distiller("REVIEWKD")
class ReviewKD(Distiller):
    """Knowledge review with attention-based fusion and the hierarchical context loss; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("REVIEWKD",),
        extra_modules=("abfs",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        review = cfg.REVIEWKD
        if review.WARMUP_EPOCHS < 1:
            raise MdistillerError(f"REVIEWKD.WARMUP_EPOCHS must be >= 1 (1: full weight from the first epoch), "
                                  f"got {review.WARMUP_EPOCHS}")
        lists = {key.lower(): [int(v) for v in review[key]] for key in LIST_KEYS}
        return {"ce_weight": review.CE_WEIGHT, "kd_weight": review.REVIEWKD_WEIGHT,
                "warmup_epochs": review.WARMUP_EPOCHS, "stu_preact": bool(review.STU_PREACT), **lists,
                "max_mid_channel": review.MAX_MID_CHANNEL if review.USE_MAX_MID_CHANNEL else UPSTREAM_MAX_MID,
                "setting": Setting.from_cfg(cfg)}

    def setup(self, shapes: list[int], out_shapes: list[int], in_channels: list[int], out_channels: list[int],
              ce_weight: float = 1.0, kd_weight: float = 1.0, warmup_epochs: float = 20, stu_preact: bool = False,
              max_mid_channel: int = UPSTREAM_MAX_MID, setting: Setting = DEFAULT_SETTING) -> None:
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.warmup_epochs = warmup_epochs
        self.stu_preact = stu_preact
        names = setting.names
        size = probe_input_size(setting, CIFAR_INPUT_SIZE)
        fitting = reviewkd_lists(self.student, self.teacher, size, self.stu_preact, names)
        given = {"SHAPES": list(shapes), "OUT_SHAPES": list(out_shapes), "IN_CHANNELS": list(in_channels),
                 "OUT_CHANNELS": list(out_channels)}
        if given != fitting:
            wrong = ", ".join(key for key in LIST_KEYS if given[key] != fitting[key])
            raise MdistillerError(
                f"REVIEWKD lists ({wrong}) do not fit student {names[0]} and teacher {names[1]} at {size[0]}x{size[1]}"
                f"{' with STU_PREACT' if self.stu_preact else ''}: set {lists_as_overrides(fitting)}"
            )
        self.shapes, self.out_shapes = given["SHAPES"], given["OUT_SHAPES"]
        mid = min(int(max_mid_channel), in_channels[-1])
        last = len(in_channels) - 1
        abfs = [ABF(c_in, mid, out_channels[i], i < last) for i, c_in in enumerate(in_channels)]
        self.abfs = nn.ModuleList(reversed(abfs))  # abfs.0 = the pooled level, as upstream's abfs[::-1]

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, epoch: int | None = None,
                      **batch) -> tuple[torch.Tensor, dict]:
        if epoch is None:
            raise MdistillerError("REVIEWKD needs the epoch for its warm-up: call forward_train(..., epoch=e)")
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        key = "preact_feats" if self.stu_preact else "feats"
        levels = feats_student[key] + [feats_student["pooled_feat"][:, :, None, None]]
        levels = levels[::-1]
        out, residual = self.abfs[0](levels[0], out_shape=self.out_shapes[0])
        outputs = [out]
        for feat, abf, shape, out_shape in zip(levels[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out, residual = abf(feat, residual, shape, out_shape)
            outputs.insert(0, out)
        n = len(outputs)
        teacher_levels = (feats_teacher["preact_feats"][1:] + [feats_teacher["pooled_feat"][:, :, None, None]])[-n:]
        warmup = min(epoch / self.warmup_epochs, 1.0)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.kd_weight * warmup * hcl_loss(outputs, teacher_levels),
        }
        return logits_student, losses
