"""Pure Wasserstein losses for WKD (Lv et al., NeurIPS 2024): tensors in, tensor out, fp32.

- `sinkhorn`: entropic optimal transport between batched discrete distributions. The default iteration is the
  reference's (multiplicative updates on `K = exp(-M / lam)` with a `1e-8` guard); `log_domain=True` runs the same
  iteration on log-potentials with logsumexp, which stays finite where `exp(-M / lam)` underflows in fp32
  (small `lam`). The two agree wherever the reference is finite (tests/test_wkd.py).
- `wkd_logit_loss`: WKD-L, a target-class cross term plus OT between the non-target distributions (the reference
  iteration on one shared C x C kernel, equal to the reference's per-sample (C-1)-class problems and far lighter).
- `gaussian_moments` / `gaussian_wasserstein_loss`: WKD-F, the closed-form 2-Wasserstein distance between
  diagonal Gaussians (per channel mean and std) of a feature map, optionally per cell of a spatial grid.
- `cosine_decay_weight`: the reference's weight schedule.
- `fc_cost_matrix`, `sharpen_cost`, `linear_cka_distance`: the class-to-class cost matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .precision import fp32_loss

# The reference's additive guard in the Sinkhorn denominators and on the cost (`relu(M) + 1e-8`).
SINKHORN_GUARD = 1e-8


def _batched_cost(cost: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, N) or (B, N, N) -> (B, N, N) fp32 (a view where possible)."""
    cost = cost.float()
    if cost.dim() == 2:
        return cost.unsqueeze(0).expand(batch, -1, -1)
    if cost.dim() != 3 or cost.shape[0] != batch:
        raise ValueError(f"cost must be (N, N) or (B, N, N) with B = {batch}, got {tuple(cost.shape)}")
    return cost


def sinkhorn(p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor, lam: float, iters: int,
             log_domain: bool = False) -> torch.Tensor:
    """Entropic OT plan (B x N x N) between rows of p and q (B x N, each row a distribution) under `cost`.

    Reference iteration: `K = exp(-M / lam)`, `u = 1/N`, then `iters` times `v = q / (K^T u + 1e-8)`,
    `u = p / (K v + 1e-8)`; the plan is `u_i K_ij v_j`. After the last step its rows sum to p (up to the guard);
    its columns approach q as `iters` grows. `log_domain=True`: the same updates on log u, log v (no guard term).
    """
    p, q = p.float(), q.float()
    batch, n = p.shape
    cost = _batched_cost(cost, batch)
    if log_domain:
        return _sinkhorn_log(p, q, cost, lam, iters)
    kernel = torch.exp(-cost / lam)
    u = torch.full_like(p, 1.0 / n).unsqueeze(-1)  # B x N x 1
    v = torch.ones_like(u)
    p, q = p.unsqueeze(-1), q.unsqueeze(-1)
    kernel_t = kernel.transpose(1, 2)
    for _ in range(iters):
        v = q / (torch.bmm(kernel_t, u) + SINKHORN_GUARD)
        u = p / (torch.bmm(kernel, v) + SINKHORN_GUARD)
    return u * kernel * v.transpose(1, 2)


def _sinkhorn_log(p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor, lam: float, iters: int) -> torch.Tensor:
    """`sinkhorn` on log-potentials: `log v = log q - LSE_i(log K_ij + log u_i)`, `log u = log p - LSE_j(...)`."""
    tiny = torch.finfo(torch.float32).tiny
    log_p, log_q = p.clamp_min(tiny).log(), q.clamp_min(tiny).log()
    log_k = -cost / lam
    log_u = torch.full_like(p, -math.log(p.shape[1]))
    log_v = torch.zeros_like(q)
    for _ in range(iters):
        log_v = log_q - torch.logsumexp(log_k + log_u.unsqueeze(2), dim=1)
        log_u = log_p - torch.logsumexp(log_k + log_v.unsqueeze(1), dim=2)
    return torch.exp(log_u.unsqueeze(2) + log_k + log_v.unsqueeze(1))


def sinkhorn_cost(p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor, lam: float, iters: int,
                  log_domain: bool = False) -> torch.Tensor:
    """`sum(plan * cost)` per row pair, averaged over the batch."""
    plan = sinkhorn(p, q, cost, lam, iters, log_domain)
    return (plan * _batched_cost(cost, p.shape[0])).sum(dim=(1, 2)).mean()


def prepare_cost(cost: torch.Tensor) -> torch.Tensor:
    """`relu(M) + 1e-8` in fp32, as the reference feeds the cost to Sinkhorn."""
    return F.relu(cost.float()) + SINKHORN_GUARD


def sharpen_cost(cost: torch.Tensor, sharpen: float) -> torch.Tensor:
    """`1 - exp(-s M)` for s != 0 (WKD.COST_MATRIX_SHARPEN), M unchanged for s == 0."""
    if sharpen == 0:
        return cost
    return 1.0 - torch.exp(-sharpen * cost)


def fc_cost_matrix(weight: torch.Tensor) -> torch.Tensor:
    """`1 - cosine` between the rows (class prototypes) of a classifier weight (C x D) -> C x C, with an exact zero
    diagonal (fp32 rounding leaves about 1e-7 there otherwise)."""
    normed = F.normalize(weight.float(), p=2, dim=1)
    return (1.0 - normed @ normed.t()).fill_diagonal_(0.0)


def non_target_indices(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x (C - 1): every class but the target, in ascending order (`j + [j >= y]`, no host sync)."""
    j = torch.arange(num_classes - 1, device=target.device).expand(target.shape[0], num_classes - 1)
    return j + (j >= target.view(-1, 1)).long()


def wkd_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`-(p_t[y] * log p_s[y])` at T = 1, batch-mean; the teacher side carries no gradient."""
    log_p_s = F.log_softmax(student_logits.float(), dim=1).gather(1, target.view(-1, 1))
    p_t = F.softmax(teacher_logits.float(), dim=1).gather(1, target.view(-1, 1)).detach()
    return -(p_t * log_p_s).mean()


def wkd_nontarget_loss_gathered(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                                cost: torch.Tensor, temperature: float, lam: float, iters: int,
                                log_domain: bool = False) -> torch.Tensor:
    """The reference's layout: one (C-1)-class problem per sample, the cost gathered to B x (C-1) x (C-1)."""
    keep = non_target_indices(target, student_logits.shape[1])
    z_s = student_logits.float().gather(1, keep)
    z_t = teacher_logits.float().gather(1, keep)
    sub_cost = cost.float()[keep.unsqueeze(2), keep.unsqueeze(1)]
    p_s = F.softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    return sinkhorn_cost(p_s, p_t, sub_cost, lam, iters, log_domain)


def _shared_kernel_cost(p: torch.Tensor, q: torch.Tensor, u: torch.Tensor, cost: torch.Tensor, lam: float,
                        iters: int) -> torch.Tensor:
    """The reference iteration with one N x N cost for the whole batch: `sum(plan * M)` per row, computed as
    `u^T (K * M) v` without a B x N x N tensor. `u` is the starting potential (B x N)."""
    kernel = torch.exp(-cost / lam)
    for _ in range(iters):
        v = q / (u @ kernel + SINKHORN_GUARD)  # (K^T u)_j = sum_i u_i K_ij
        u = p / (v @ kernel.t() + SINKHORN_GUARD)  # (K v)_i = sum_j K_ij v_j
    return ((v @ (kernel * cost).t()) * u).sum(dim=1)


def wkd_nontarget_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                       cost: torch.Tensor, temperature: float, lam: float, iters: int,
                       log_domain: bool = False) -> torch.Tensor:
    """OT between the non-target distributions `softmax(z / T)` (target class removed from the logits and from the
    rows and columns of `cost`, C x C, already `relu + 1e-8`-prepared); `sum(plan * M)` batch-mean, no T^2.

    The reference iteration runs on the full C classes with the target's mass and starting potential set to 0
    (`u = 1/(C-1)` elsewhere): every update then equals the reference's on the C-1 remaining classes, guard
    included, while memory stays O(B C + C^2) instead of B x (C-1)^2 (1 GB a tensor for ImageNet at batch 256).
    `log_domain=True` solves the gathered per-sample problems in log space (`wkd_nontarget_loss_gathered`).
    """
    if log_domain:
        return wkd_nontarget_loss_gathered(student_logits, teacher_logits, target, cost, temperature, lam, iters,
                                           log_domain=True)
    num_classes = student_logits.shape[1]
    is_target = F.one_hot(target, num_classes).bool()
    p_s = F.softmax((student_logits.float() / temperature).masked_fill(is_target, float("-inf")), dim=1)
    p_t = F.softmax((teacher_logits.float() / temperature).masked_fill(is_target, float("-inf")), dim=1)
    u = (~is_target).float() / (num_classes - 1)
    return _shared_kernel_cost(p_s, p_t, u, cost.float(), lam, iters).mean()


@fp32_loss
def wkd_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                   cost: torch.Tensor, temperature: float, lam: float, iters: int,
                   log_domain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """WKD-L's two parts, `(target part, non-target OT)`; the loss is `target + w_logit(e) * OT`."""
    return (
        wkd_target_loss(student_logits, teacher_logits, target),
        wkd_nontarget_loss(student_logits, teacher_logits, target, cost, temperature, lam, iters, log_domain),
    )


def cosine_decay_weight(weight: float, epoch: int | None, decay_epoch: int, total_epochs: int) -> float:
    """`w` up to `decay_epoch` (inclusive); after it (strictly), `w (1 + cos(pi (e - E0) / (E - E0))) / 2`."""
    if epoch is None or epoch <= decay_epoch or total_epochs <= decay_epoch:
        return weight
    progress = min(epoch - decay_epoch, total_epochs - decay_epoch) / (total_epochs - decay_epoch)
    return weight * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """Adaptive-pooling cell bounds: `[floor(i * size / cells), ceil((i + 1) * size / cells))`."""
    return [((i * size) // cells, -((-(i + 1) * size) // cells)) for i in range(cells)]


def gaussian_moments(feat: torch.Tensor, eps: float = 1e-5, grid: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel mean and std `sqrt(var + eps)` (var unbiased) of a B x C x H x W map over space, or over each
    cell of a `grid x grid` partition (adaptive-pooling bounds) -> two B x C x grid x grid tensors (fp32)."""
    feat = feat.float()
    batch, channels, height, width = feat.shape
    if grid == 1:
        mean = feat.mean(dim=(2, 3))
        std = torch.sqrt(feat.var(dim=(2, 3)) + eps)
        return mean.view(batch, channels, 1, 1), std.view(batch, channels, 1, 1)
    if height % grid == 0 and width % grid == 0:  # equal cells: one reshape
        cells = feat.reshape(batch, channels, grid, height // grid, grid, width // grid)
        return cells.mean(dim=(3, 5)), torch.sqrt(cells.var(dim=(3, 5)) + eps)
    means, stds = [], []
    for top, bottom in _cell_bounds(height, grid):
        row_means, row_stds = [], []
        for left, right in _cell_bounds(width, grid):
            cell = feat[:, :, top:bottom, left:right]
            row_means.append(cell.mean(dim=(2, 3)))
            row_stds.append(torch.sqrt(cell.var(dim=(2, 3)) + eps))
        means.append(torch.stack(row_means, dim=-1))
        stds.append(torch.stack(row_stds, dim=-1))
    return torch.stack(means, dim=-2), torch.stack(stds, dim=-2)


def gaussian_wasserstein_terms(student_feat: torch.Tensor, teacher_feat: torch.Tensor, eps: float = 1e-5,
                               grid: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`(||mu_s - mu_t||^2, ||sigma_s - sigma_t||^2)`, each summed and divided by B * grid^2."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"feature shapes differ: {tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}")
    mean_s, std_s = gaussian_moments(student_feat, eps, grid)
    mean_t, std_t = gaussian_moments(teacher_feat, eps, grid)
    norm = student_feat.shape[0] * grid * grid
    mean_term = F.mse_loss(mean_s, mean_t, reduction="sum") / norm
    std_term = F.mse_loss(std_s, std_t, reduction="sum") / norm
    return mean_term, std_term


@fp32_loss
def gaussian_wasserstein_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, mean_cov_ratio: float,
                              eps: float = 1e-5, grid: int = 1) -> torch.Tensor:
    """WKD-F: `MEAN_COV_RATIO * ||mu_s - mu_t||^2 + ||sigma_s - sigma_t||^2` (squared W2 between diagonal
    Gaussians with the mean part reweighted), per sample and grid cell."""
    mean_term, std_term = gaussian_wasserstein_terms(student_feat, teacher_feat, eps, grid)
    return mean_cov_ratio * mean_term + std_term


@fp32_loss
def linear_cka_distance(class_feats: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """`1 - linear CKA` between the per-class feature matrices of a C x n x d tensor -> C x C (symmetric, zero
    diagonal). Each class's rows are centred; CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), rows of
    different classes paired by position, as the WKD authors' tool does."""
    feats = class_feats.float()
    feats = feats - feats.mean(dim=1, keepdim=True)
    num_classes = feats.shape[0]
    gram_norms = torch.stack([torch.linalg.matrix_norm(f.t() @ f) for f in feats])
    similarity = torch.eye(num_classes, dtype=torch.float32, device=feats.device)
    rows = range(num_classes)
    if progress:
        rows = tqdm(rows, desc="linear CKA", dynamic_ncols=True)
    dim = feats.shape[2]
    block = max(1, (1 << 26) // (dim * dim))  # classes per matmul: about 256 MB of d x d cross-covariances
    for i in rows:
        for start in range(i + 1, num_classes, block):
            stop = min(start + block, num_classes)
            cross = torch.matmul(feats[i].t().unsqueeze(0), feats[start:stop])  # (stop - start) x d x d
            sim = cross.pow(2).sum(dim=(1, 2)) / (gram_norms[i] * gram_norms[start:stop]).clamp_min(1e-12)
            similarity[i, start:stop] = sim
            similarity[start:stop, i] = sim
    return 1.0 - similarity
