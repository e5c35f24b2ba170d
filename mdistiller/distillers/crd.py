"""CRD (Tian et al., ICLR 2020): contrastive representation distillation with a memory of K negatives per sample.

Student and teacher `pooled_feat` go through `embed_s` / `embed_t` (a Linear, then division by the L2 norm, no eps;
both trained). Each embedding is scored against the *other* model's memory rows of the batch's `contrastive_index`
(column 0 the positive, then K negatives of other classes, served by the data path: mdistiller.dataset.contrastive):
`out = exp(<memory row, v> / T) / Z`, and the NCE loss `contrast_loss` compares the positive's score with the
noise level K / num_data. As upstream (megvii-research/mdistiller), including its quirks:
- `contrast.params = [K, T, Z_v1, Z_v2, momentum]` (float32 buffer; Z's start at -1), `contrast.memory_v1` (student
  embeddings) and `memory_v2` (teacher's), (num_data, DIM) uniform in [-1/sqrt(DIM/3), 1/sqrt(DIM/3)]: all three in
  the state dict, so resume is exact and upstream checkpoints load strictly;
- T and momentum are used as the float32 values `params` holds (0.07 -> 0.0700000003);
- Z_v1 = mean(out_v1) * num_data (likewise Z_v2) is estimated on the first batch, against the random initial memory,
  then never changes; it divides as a constant (no gradient flows through it, on that first step neither);
- memory rows are read (detached) before the batch's momentum update
  `memory[y] <- l2norm(momentum * memory[y] + (1 - momentum) * v)`;
- `loss_kd = FEAT_WEIGHT * (contrast_loss(out_v1) + contrast_loss(out_v2))` has shape (1,).
Upstream's alias-method sampler (which moves itself to CUDA in the constructor, so its CRD cannot be built on a
CPU-only machine) is left out: it is never used, the data set always provides the indices. This CRD runs anywhere.

Ours, not upstream's: nothing reads the host during a step (K comes from the batch's shape, T and momentum are read
from `params` when it is built or loaded, Z is set on the device, so a step never waits for the GPU); the CRD head
(embeddings, scores, loss, memory update) is computed in fp32 under SOLVER.AMP; under torchrun every rank updates its
memory with the rows of the whole global batch and Z is the ranks' mean, so the memories stay equal (and DDP does not
broadcast them: `Declaration.rank_synced_buffers`); CRD.FEAT.STUDENT_DIM / TEACHER_DIM 0 (our default) are read
from the models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed
from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .precision import fp32_loss
from .probe import CIFAR_INPUT_SIZE, DEFAULT_SETTING, Setting, probe_features, probe_input_size
from .registry import register_distiller
from .vkd import pooled_feature

MODES = ("exact", "relax")


@fp32_loss
def contrast_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """NCE loss of (B, K + 1, 1) scores, column 0 the positive: with noise level c = K / num_data,
    `-(sum_b log(x_b0 / (x_b0 + c + 1e-7)) + sum_{b, k >= 1} log(c / (x_bk + c + 1e-7))) / B`, shape (1,)."""
    eps = 1e-7
    batch, negatives = scores.shape[0], scores.shape[1] - 1
    noise = negatives * (1 / float(num_data))
    positive = scores.select(1, 0)  # (B, 1)
    log_positive = torch.log(positive / (positive + (noise + eps)))
    rest = scores.narrow(1, 1, negatives)
    log_negative = torch.log(torch.full_like(rest, noise) / (rest + (noise + eps)))
    return -(log_positive.sum(0) + log_negative.reshape(-1, 1).sum(0)) / batch


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (no eps, as upstream)."""
    return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


class Normalize(nn.Module):
    """L2 normalisation of rows (upstream's module; no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2_normalize(x)


class Embed(nn.Module):
    """Flatten, Linear(dim_in, dim_out), L2-normalise (state-dict keys `linear.weight`, `linear.bias`)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2norm(self.linear(x.reshape(x.shape[0], -1)))


class ContrastLoss(nn.Module):
    """`contrast_loss` with its num_data (upstream's criterion module; no state)."""

    def __init__(self, num_data: int):
        super().__init__()
        self.num_data = num_data

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return contrast_loss(scores, self.num_data)


def divide_by_constant(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`x / z` for a one-element tensor z, rounded as torch rounds `x / float(z)` (upstream divides by the Python
    number): CUDA multiplies by the reciprocal of a host scalar, the CPU divides."""
    return x * torch.reciprocal(z) if x.is_cuda else x / z


class ContrastMemory(nn.Module):
    """The two memories and `params`; `forward(v1, v2, y, idx)` -> (out_v1, out_v2), each (B, K + 1, 1)."""

    def __init__(self, dim: int, num_data: int, k: int, temperature: float = 0.07, momentum: float = 0.5,
                 rank_batch: int = 0):
        super().__init__()
        self.num_data = num_data
        self.rank_batch = rank_batch  # rows each rank contributes to the memory update under torchrun
        self.register_buffer("params", torch.tensor([k, temperature, -1, -1, momentum]))  # float32, as upstream
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_v1", torch.rand(num_data, dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("memory_v2", torch.rand(num_data, dim).mul_(2 * bound).add_(-bound))
        self._read_params()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._read_params())

    def _read_params(self) -> None:
        """K, T and momentum as Python numbers, from `params` (when built or loaded: not at every step)."""
        k, temperature, _, _, momentum = self.params.tolist()
        self.k, self.temperature, self.momentum = int(k), temperature, momentum
        self.z_checked = False  # whether this process has made sure Z is set (see _set_z_once)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dim = v1.shape
        if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] != self.k + 1:
            raise MdistillerError(
                f"contrastive_index has shape {tuple(idx.shape)}, expected ({batch}, {self.k + 1}): the batch's index "
                f"and CRD.NCE.K {self.k} negatives per sample (plus the positive)"
            )
        rows = idx.reshape(-1)
        memory_v1 = self.memory_v1.index_select(0, rows).detach().view(batch, self.k + 1, dim)
        out_v2 = torch.exp(torch.div(torch.bmm(memory_v1, v2.view(batch, dim, 1)), self.temperature))
        memory_v2 = self.memory_v2.index_select(0, rows).detach().view(batch, self.k + 1, dim)
        out_v1 = torch.exp(torch.div(torch.bmm(memory_v2, v1.view(batch, dim, 1)), self.temperature))
        if not self.z_checked:
            self._set_z_once(out_v1, out_v2)
        z = self.params[2:4].clone()  # constants: params needs no grad, and a later in-place write cannot reach them
        out_v1 = divide_by_constant(out_v1, z[0]).contiguous()
        out_v2 = divide_by_constant(out_v2, z[1]).contiguous()
        self._update(v1, v2, y)
        return out_v1, out_v2

    @torch.no_grad()
    def _set_z_once(self, out_v1: torch.Tensor, out_v2: torch.Tensor) -> None:
        """Z_v1, Z_v2 <- mean(out) * num_data where still negative (the first batch of a run), decided on the device."""
        estimate = torch.stack([out_v1.mean(), out_v2.mean()]) * self.num_data
        if distributed.world_size() > 1:  # the global batch's mean (equal slices: the mean of the ranks' means)
            estimate = distributed.all_reduce_sum(estimate) / distributed.world_size()
        current = self.params[2:4]
        self.params[2:4] = torch.where(current < 0, estimate, current)
        self.z_checked = True

    @torch.no_grad()
    def _update(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor) -> None:
        """memory[y] <- l2norm(momentum * memory[y] + (1 - momentum) * v), for both memories (after the reads)."""
        if distributed.world_size() > 1:  # every rank applies the whole global batch: the memories stay equal
            width = v1.shape[1]
            both = distributed.all_gather_rows(torch.cat([v1, v2], 1), self.rank_batch)
            v1, v2 = both[:, :width], both[:, width:]
            y = distributed.all_gather_rows(y, self.rank_batch)
        for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = memory.index_select(0, y.view(-1))
            rows.mul_(self.momentum).add_(torch.mul(v, 1 - self.momentum))
            memory.index_copy_(0, y, l2_normalize(rows))


def embedding_dims(student: nn.Module, teacher: nn.Module, setting: Setting, configured: tuple[int, int] = (0, 0)
                   ) -> tuple[int, int]:
    """(student, teacher) pooled_feat sizes, read by a dry forward (eval mode, zero input: no RNG draw, no BN
    statistics moved); a non-zero configured value (CRD.FEAT.STUDENT_DIM / TEACHER_DIM) must equal them."""
    feats_s, feats_t = probe_features((student, teacher), probe_input_size(setting, CIFAR_INPUT_SIZE))
    student_dim, teacher_dim = pooled_feature(feats_s).shape[-1], pooled_feature(feats_t).shape[-1]
    for key, given, actual in (("STUDENT_DIM", configured[0], student_dim),
                               ("TEACHER_DIM", configured[1], teacher_dim)):
        if given and given != actual:
            raise MdistillerError(
                f"CRD.FEAT.{key} {given} does not match the models: student {setting.student} pools "
                f"{student_dim} features, teacher {setting.teacher} {teacher_dim}; set CRD.FEAT.STUDENT_DIM "
                f"{student_dim} CRD.FEAT.TEACHER_DIM {teacher_dim}, or 0 to read them from the models"
            )
    return student_dim, teacher_dim


config_section("CRD", {
    "MODE": Key("exact", "the positive is the sample itself (exact) or a sample of its class (relax)", MODES),
    "FEAT": {
        "DIM": Key(128, "embedding size of both heads"),
        "STUDENT_DIM": Key(0, "ours: 0 = the student's pooled_feat size, read by a dry forward; else must equal it"),
        "TEACHER_DIM": Key(0, "ours: likewise for the teacher"),
    },
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(0.8, "weight of the contrastive term"),
    },
    "NCE": {
        "K": Key(16384, "negatives per sample, from other classes (drawn by the data path)"),
        "MOMENTUM": Key(0.5, "momentum of the memory update"),
        "TEMPERATURE": Key(0.07, "NCE temperature"),
    },
})


def crd_batch_needs(hparams) -> dict[str, object]:
    """CRD's negatives: K indices per sample, exact or relaxed positives."""
    return {"contrastive_index": {"k": int(hparams["nce_k"]), "mode": hparams["mode"]}}


@register_distiller("CRD")
class CRD(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * (NCE(student vs teacher memory) + NCE(teacher vs student memory))`; see the
    module docstring. Built as upstream's `CRD(student, teacher, cfg, num_data)` (the builder passes num_data, the
    training-set size, because CRD declares it in `build_needs`)."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("CRD",),
        batch_needs=crd_batch_needs,
        build_needs=("num_data",),
        extra_modules=("embed_s", "embed_t", "contrast", "criterion_s", "criterion_t"),
        upstream_trainers=("base", "crd"),  # upstream's CRDTrainer only passes the indices, which our batches carry
        rank_synced_buffers=("contrast.params", "contrast.memory_v1", "contrast.memory_v2"),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        crd = cfg.CRD
        for key, value in (("CRD.NCE.K", crd.NCE.K), ("CRD.FEAT.DIM", crd.FEAT.DIM)):
            if value <= 0:
                raise MdistillerError(f"{key} must be positive, got {value}")
        for key, value in (("CRD.FEAT.STUDENT_DIM", crd.FEAT.STUDENT_DIM),
                           ("CRD.FEAT.TEACHER_DIM", crd.FEAT.TEACHER_DIM)):
            if value < 0:
                raise MdistillerError(f"{key} must be >= 0 (0: read from the model), got {value}")
        if not 0 <= crd.NCE.MOMENTUM < 1:
            raise MdistillerError(f"CRD.NCE.MOMENTUM must be in [0, 1), got {crd.NCE.MOMENTUM}")
        if crd.NCE.TEMPERATURE <= 0:
            raise MdistillerError(f"CRD.NCE.TEMPERATURE must be positive, got {crd.NCE.TEMPERATURE}")
        return {"mode": crd.MODE, "feat_dim": crd.FEAT.DIM, "dims": (crd.FEAT.STUDENT_DIM, crd.FEAT.TEACHER_DIM),
                "ce_weight": crd.LOSS.CE_WEIGHT, "feat_weight": crd.LOSS.FEAT_WEIGHT, "nce_k": crd.NCE.K,
                "nce_momentum": crd.NCE.MOMENTUM, "nce_temperature": crd.NCE.TEMPERATURE,
                "rank_batch": cfg.SOLVER.BATCH_SIZE // distributed.world_size(), "setting": Setting.from_cfg(cfg)}

    def setup(self, num_data: int, mode: str = "exact", feat_dim: int = 128, dims: tuple[int, int] = (0, 0),
              ce_weight: float = 1.0, feat_weight: float = 0.8, nce_k: int = 16384, nce_momentum: float = 0.5,
              nce_temperature: float = 0.07, rank_batch: int = 64, setting: Setting = DEFAULT_SETTING) -> None:
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data <= 0:
            raise MdistillerError(f"CRD needs num_data, the training-set size (a positive int), got {num_data!r}")
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        student_dim, teacher_dim = embedding_dims(self.student, self.teacher, setting, dims)
        # attribute names and order as upstream: its checkpoints load strictly
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, num_data, nce_k, nce_temperature, nce_momentum, rank_batch)
        self.criterion_s = ContrastLoss(num_data)
        self.criterion_t = ContrastLoss(num_data)

    @fp32_loss
    def crd_loss(self, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor,
                 contrastive_index: torch.Tensor) -> torch.Tensor:
        """NCE of both directions (shape (1,)); updates the memories."""
        v1, v2 = self.embed_s(f_s), self.embed_t(f_t)
        out_v1, out_v2 = self.contrast(v1, v2, index, contrastive_index)
        return self.criterion_s(out_v1) + self.criterion_t(out_v2)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None,
                      contrastive_index: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, dict]:
        if index is None or contrastive_index is None:
            raise MdistillerError("CRD trains on batches with 'index' and 'contrastive_index' (the data path adds them "
                                  "when get_dataset receives CRD's declared batch needs)")
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        loss_kd = self.crd_loss(feats_student["pooled_feat"], feats_teacher["pooled_feat"], index.view(-1),
                                contrastive_index)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * loss_kd,
        }
        return logits_student, losses
