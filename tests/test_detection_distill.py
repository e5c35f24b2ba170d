"""The detection distillation terms of issue 26 (detection.md 1.2-1.4): DKD on the box head's logits, the FPN
ReviewKD transform `kd_trans` and its HCL loss (CPU, seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdistiller.detection.detector import build_student, build_teacher, fpn_features, roi_logits
from mdistiller.detection.distill import FPNABF, KDTrans, dkd_roi_loss, reviewkd_fpn_loss
from mdistiller.distillers.dkd import dkd_loss
from mdistiller.errors import MdistillerError

pytestmark = pytest.mark.usefixtures("one_thread")

FPN_SHAPES = [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]  # p2..p6 of a 128x192 image


def _dkd_by_hand(zs, zt, labels, alpha: float, beta: float, t: float) -> float:
    """DKD written out with Python loops: T^2 (alpha KL(binary) + beta KL(non-target softmax)), mean over rows."""
    total = 0.0
    for s_row, t_row, y in zip(zs, zt, labels):
        es = [math.exp(v / t) for v in s_row]
        et = [math.exp(v / t) for v in t_row]
        ps_y, pt_y = es[y] / sum(es), et[y] / sum(et)
        tckd = pt_y * math.log(pt_y / ps_y) + (1 - pt_y) * math.log((1 - pt_y) / (1 - ps_y))
        rest_s = sum(v for j, v in enumerate(es) if j != y)
        rest_t = sum(v for j, v in enumerate(et) if j != y)
        nckd = sum((et[j] / rest_t) * math.log((et[j] / rest_t) / (es[j] / rest_s)) for j in range(len(es)) if j != y)
        total += t * t * (alpha * tckd + beta * nckd)
    return total / len(zs)


def _bg_last(z: torch.Tensor) -> torch.Tensor:
    """Background-first columns to background-last, by an explicit index list."""
    c = z.shape[1]
    return z[:, list(range(1, c)) + [0]]


# ---- DKD on the box head's logits ---------------------------------------------------------------------------


def test_dkd_roi_loss_specs_hand_values() -> None:
    zs = torch.zeros(2, 4)
    zt = torch.tensor([[math.log(3), 0, 0, 0], [0, math.log(2), 0, 0]])
    y = torch.tensor([0, 0])
    assert dkd_roi_loss(zs, zt, y, background_first=False).item() == pytest.approx(0.082783, abs=1e-6)
    assert dkd_roi_loss(zs[:1], zt[:1], y[:1], background_first=False).item() == pytest.approx(0.143841, abs=1e-6)
    assert dkd_roi_loss(zs[1:], zt[1:], y[1:], background_first=False).item() == pytest.approx(0.021725, abs=1e-6)


def test_dkd_roi_loss_on_3x5_toy_logits_by_hand() -> None:
    zs = [[0.5, -1.0, 2.0, 0.0, 1.5], [1.0, 0.2, -0.3, 0.8, -2.0], [-0.5, 0.4, 0.1, 3.0, 0.0]]
    zt = [[1.5, 0.0, 1.0, -1.0, 0.3], [0.0, 2.0, 0.5, -0.5, 1.0], [2.0, -1.0, 0.0, 1.0, 0.5]]
    labels_bg_first = [0, 3, 1]  # 0 = background
    labels_bg_last = [4, 2, 0]  # the same classes in detectron2's order, by hand
    zs_last = [row[1:] + row[:1] for row in zs]
    zt_last = [row[1:] + row[:1] for row in zt]
    for alpha, beta, t in ((1.0, 0.25, 1.0), (0.5, 2.0, 2.0)):
        expected = _dkd_by_hand(zs_last, zt_last, labels_bg_last, alpha, beta, t)
        got = dkd_roi_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(labels_bg_first), alpha, beta, t)
        assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-5)
        got_last = dkd_roi_loss(torch.tensor(zs_last), torch.tensor(zt_last), torch.tensor(labels_bg_last), alpha,
                                beta, t, background_first=False)
        assert got_last.item() == pytest.approx(expected, rel=1e-5)
    # defaults are the spec's alpha 1, beta 0.25, T 1
    assert dkd_roi_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(labels_bg_first)).item() == pytest.approx(
        _dkd_by_hand(zs_last, zt_last, labels_bg_last, 1.0, 0.25, 1.0), rel=1e-5)


def test_dkd_roi_loss_equals_classification_dkd_on_hand_mapped_logits() -> None:
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 81, generator=g) * 2, torch.randn(6, 81, generator=g) * 2
    labels = torch.tensor([0, 0, 1, 80, 17, 0])  # bg-first
    labels_d2 = torch.tensor([80, 80, 0, 79, 16, 80])
    got = dkd_roi_loss(zs, zt, labels)
    torch.testing.assert_close(got, dkd_loss(_bg_last(zs), _bg_last(zt), labels_d2, 1.0, 0.25, 1.0))
    assert got.item() > 0
    assert dkd_roi_loss(zs, zs.clone(), labels).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_is_invariant_to_a_shared_class_permutation() -> None:
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(6, 81, generator=g), torch.randn(6, 81, generator=g)
    labels = torch.randint(0, 81, (6,), generator=g)
    perm = torch.randperm(81, generator=g)
    inverse = torch.argsort(perm)
    base = dkd_roi_loss(zs, zt, labels, background_first=False)
    permuted = dkd_roi_loss(zs[:, perm], zt[:, perm], inverse[labels], background_first=False)
    torch.testing.assert_close(base, permuted)
    # hence bg-first inputs given as they are give the same value as the mapped ones
    torch.testing.assert_close(dkd_roi_loss(zs, zt, labels, background_first=False), dkd_roi_loss(zs, zt, labels))


def test_dkd_roi_loss_refuses_bad_shapes() -> None:
    with pytest.raises(MdistillerError, match="must both be"):
        dkd_roi_loss(torch.zeros(3, 81), torch.zeros(3, 80), torch.zeros(3, dtype=torch.long))
    with pytest.raises(MdistillerError, match="gt_classes"):
        dkd_roi_loss(torch.zeros(3, 81), torch.zeros(3, 81), torch.zeros(4, dtype=torch.long))


# ---- kd_trans -------------------------------------------------------------------------------------------------


def _maps(seed: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 256, h, w, generator=g) for h, w in FPN_SHAPES]


def test_kd_trans_names_count_and_shapes_on_non_square_maps() -> None:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.kd_trans = KDTrans()
    names = set(holder.state_dict())
    expected = set()
    for i in range(5):
        for conv in ("conv1", "conv2"):
            expected |= {f"kd_trans.abfs.{i}.{conv}.0.weight"}
            expected |= {f"kd_trans.abfs.{i}.{conv}.1.{k}" for k in
                         ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
        if i > 0:
            expected |= {f"kd_trans.abfs.{i}.att_conv.0.weight", f"kd_trans.abfs.{i}.att_conv.0.bias"}
    assert names == expected
    assert holder.kd_trans.abfs[0].att_conv is None
    assert sum(p.numel() for p in holder.parameters()) == 3_286_024
    assert holder.kd_trans.abfs[1].att_conv[0].weight.shape == (2, 512, 1, 1)
    assert holder.kd_trans.abfs[4].conv2[0].weight.shape == (256, 256, 3, 3)
    assert holder.kd_trans.abfs[4].conv1[0].bias is None and holder.kd_trans.abfs[4].conv2[0].bias is None
    outs = holder.kd_trans(_maps(0))
    assert [tuple(o.shape) for o in outs] == [(2, 256, h, w) for h, w in FPN_SHAPES]
    with pytest.raises(MdistillerError, match="5 FPN levels"):
        holder.kd_trans(_maps(0)[:4])


def test_kd_trans_init_is_kaiming_uniform_a1() -> None:
    torch.manual_seed(0)
    abf = KDTrans().abfs[2]
    for conv, fan_in in ((abf.conv1[0], 256), (abf.conv2[0], 256 * 9)):
        bound = math.sqrt(6 / ((1 + 1) * fan_in))  # gain sqrt(2 / (1 + a^2)), a = 1
        w = conv.weight
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound


def test_kd_trans_fuses_deepest_first_with_nearest_resize_to_own_size() -> None:
    torch.manual_seed(0)
    trans = KDTrans().eval()
    maps = _maps(1)
    outs = trans(maps)
    with torch.no_grad():
        a0, a1 = trans.abfs[0], trans.abfs[1]
        mid6 = a0.conv1(maps[4])
        torch.testing.assert_close(outs[4], a0.conv2(mid6))
        x5 = a1.conv1(maps[3])
        up = mid6.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 2x3 -> 4x6, nearest by hand
        att = torch.sigmoid(a1.att_conv[0](torch.cat([x5, up], dim=1)))
        torch.testing.assert_close(outs[3], a1.conv2(x5 * att[:, :1] + up * att[:, 1:]))
    # p2's output depends on p6 (the residual chain), p6's does not depend on p2
    changed = [m.clone() for m in maps]
    changed[4] = changed[4] + 1.0
    outs2 = trans(changed)
    assert not torch.allclose(outs2[0], outs[0])
    changed = [m.clone() for m in maps]
    changed[0] = changed[0] + 1.0
    torch.testing.assert_close(trans(changed)[4], outs[4])


def test_fpn_abf_that_fuses_needs_a_residual() -> None:
    with pytest.raises(MdistillerError, match="residual"):
        FPNABF()(torch.zeros(1, 256, 2, 3))


def test_gradients_reach_kd_trans_and_student_maps_not_teacher_maps() -> None:
    torch.manual_seed(0)
    trans = KDTrans().train()
    student = [m.requires_grad_() for m in _maps(2)]
    teacher = [m.requires_grad_() for m in _maps(3)]
    loss = reviewkd_fpn_loss(trans(student), teacher, 1.2)
    assert torch.isfinite(loss) and loss.dim() == 0
    loss.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in student)
    assert all(m.grad is None for m in teacher)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trans.parameters())


# ---- HCL --------------------------------------------------------------------------------------------------------


def _adaptive_pool_by_hand(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) with PyTorch's adaptive windows [floor(i H / s), ceil((i + 1) H / s))."""
    h, w = x.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            r0, r1 = math.floor(i * h / size), math.ceil((i + 1) * h / size)
            c0, c1 = math.floor(j * w / size), math.ceil((j + 1) * w / size)
            out[i, j] = x[r0:r1, c0:c1].mean()
    return out


def _hcl_level_by_hand(fs: np.ndarray, ft: np.ndarray) -> float:
    """One level, one channel: mse + sum_{l in 4,2,1, l < H} w_l mse(pool_l), w = 1/2, 1/4, 1/8 over used l."""
    loss, weight, weights = float(((fs - ft) ** 2).mean()), 1.0, 1.0
    for size in (4, 2, 1):
        if size < fs.shape[0]:  # height only
            weight /= 2
            loss += weight * float(((_adaptive_pool_by_hand(fs, size) - _adaptive_pool_by_hand(ft, size)) ** 2).mean())
            weights += weight
    return loss / weights


def test_hcl_on_non_square_maps_by_hand() -> None:
    g = np.random.default_rng(0)
    shapes = [(6, 9), (4, 6), (2, 3), (1, 2)]  # uses (4, 2, 1), (2, 1), (1,), nothing
    fs = [g.standard_normal(s) for s in shapes]
    ft = [g.standard_normal(s) for s in shapes]
    expected = 1.5 * sum(_hcl_level_by_hand(a, b) for a, b in zip(fs, ft))
    got = reviewkd_fpn_loss([torch.tensor(a, dtype=torch.float32)[None, None] for a in fs],
                            [torch.tensor(b, dtype=torch.float32)[None, None] for b in ft], 1.5)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-5)
    # 2x3: the 2x2 pooling is skipped (2 is not below the height), though the width is 3
    a, b = (torch.tensor(x, dtype=torch.float32)[None, None] for x in (fs[2], ft[2]))
    by_height = (F.mse_loss(a, b) + 0.5 * F.mse_loss(a.mean((2, 3)), b.mean((2, 3)))) / 1.5
    assert reviewkd_fpn_loss([a], [b], 1.0).item() == pytest.approx(by_height.item(), rel=1e-6)
    assert reviewkd_fpn_loss([a], [a.clone()], 2.0).item() == 0.0


def test_reviewkd_fpn_loss_refuses_mismatched_levels() -> None:
    with pytest.raises(MdistillerError, match="as many"):
        reviewkd_fpn_loss(_maps(0, 1), _maps(0, 1)[:4], 1.0)
    with pytest.raises(MdistillerError, match="level 1"):
        maps = _maps(0, 1)
        reviewkd_fpn_loss(maps, [maps[0], maps[2], maps[2], maps[3], maps[4]], 1.0)


# ---- with the detector --------------------------------------------------------------------------------------


def _batch():
    a = torch.full((3, 128, 128), 40.0)
    a[:, 20:90, 10:60] = 220.0
    b = torch.full((3, 96, 128), 60.0)
    b[:, 10:80, 30:100] = 200.0
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([3])},
        {"boxes": torch.tensor([[30.0, 10.0, 100.0, 80.0]]), "labels": torch.tensor([80])},
    ]
    return [a, b], targets


def test_loss_dkd_on_the_students_sampled_proposals_trains_the_student_only() -> None:
    torch.manual_seed(0)
    student = build_student("R18").train()
    teacher = build_teacher("R50")
    images, targets = _batch()
    il = student.preprocess(images)
    out = student.train_forward(il, targets)
    teacher_il = teacher.preprocess([im.flip(0) for im in images])
    assert teacher_il.image_sizes == il.image_sizes
    z_t = roi_logits(teacher, fpn_features(teacher, teacher_il), out.sample.proposals, il.image_sizes)
    z_s = out.sample.class_logits
    assert z_t.shape == z_s.shape and z_s.shape[1] == 81
    loss_dkd = dkd_roi_loss(z_s, z_t, out.sample.labels)
    assert torch.isfinite(loss_dkd) and loss_dkd.item() > 0
    torch.testing.assert_close(loss_dkd, dkd_loss(_bg_last(z_s), _bg_last(z_t), out.sample.labels_detectron2,
                                                  1.0, 0.25, 1.0))
    loss_dkd.backward()
    assert student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert student.backbone.fpn.inner_blocks[0][0].weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_losses_are_fp32_for_bf16_inputs() -> None:
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(4, 81, generator=g), torch.randn(4, 81, generator=g)
    labels = torch.tensor([0, 5, 0, 80])
    low = dkd_roi_loss(zs.bfloat16(), zt.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, dkd_roi_loss(zs.bfloat16().float(), zt.bfloat16().float(), labels))
    maps_s, maps_t = _maps(5, 1), _maps(6, 1)
    low = reviewkd_fpn_loss([m.bfloat16() for m in maps_s], [m.bfloat16() for m in maps_t], 1.0)
    assert low.dtype == torch.float32
