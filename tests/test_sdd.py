"""SDD: the spatial pyramid (order, P2/P1 pooled from P4), the teacher-defined row weights, SD-KD / SD-DKD / SD-NKD
against float64 hand computations, the N = 1 fall-backs, NaN handling and the whole-loss guard, gradients, bf16, bad
inputs; the distillers (their losses are the pure functions on the models' region logits, gradients, M = [1], the
--M / --warmup flags, refusals)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdistiller.distillers.dkd import dkd_loss
from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.sdd import (
    SDD_DKD,
    SDD_KD,
    SDD_NKD,
    guarded,
    nkd_keep_label_rows,
    region_rows,
    region_weights,
    sdd_dkd_loss,
    sdd_kd_loss,
    sdd_nkd_loss,
    spatial_pyramid,
)
from mdistiller.engine.build import apply_logit_stand_flags
from mdistiller.engine.cfg import load_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict
from mdistiller.models.common import classify_regions

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive average pooling's bins: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _pool(x: np.ndarray, out: int) -> np.ndarray:
    """(H, W) -> (out, out) adaptive average pooling, by loops."""
    rows, cols = _bins(x.shape[0], out), _bins(x.shape[1], out)
    return np.array([[x[r0:r1, c0:c1].mean() for c0, c1 in cols] for r0, r1 in rows])


@pytest.mark.parametrize("size", [8, 7, 4])
def test_pyramid_order_and_pooling_from_p4(size):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=torch.float64)
    got = spatial_pyramid(x, [1, 2, 4])
    assert got.shape == (2, 3, 21)
    for b in range(2):
        for d in range(3):
            p4 = _pool(x[b, d].numpy(), 4)
            expected = np.concatenate([[p4.mean()], _pool(p4, 2).ravel(), p4.ravel()])  # P2, P1 from P4
            assert got[b, d].numpy() == pytest.approx(expected, rel=1e-12)
    assert spatial_pyramid(x, [1, 2]).shape == (2, 3, 5)
    assert torch.equal(spatial_pyramid(x, [1, 2]), got[:, :, :5])
    assert torch.equal(spatial_pyramid(x, [1]), got[:, :, :1])
    assert torch.equal(spatial_pyramid(x, [2, 4]), got[:, :, 1:])


def test_on_a_7x7_map_region_0_is_not_the_global_mean():
    # 7 -> 4 bins overlap (rows 1 and 5 count twice), so P1 = mean(P4) differs from the 7x7 mean (spec §5, ImageNet)
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 1, 1] = 1.0
    p1 = spatial_pyramid(x, [1])[0, 0, 0].item()
    assert p1 == pytest.approx(_pool(_pool(x[0, 0].numpy(), 4), 1)[0, 0])
    assert p1 == pytest.approx((1 / 4 + 2 / 6 + 1 / 9) / 16)  # in bins of 2x2, 2x3, 3x2 and 3x3 pixels
    assert abs(p1 - 1 / 49) > 1e-3
    # on an 8x8 map the bins tile: region 0 is the plain global mean
    y = torch.randn(2, 5, 8, 8)
    assert torch.allclose(spatial_pyramid(y, [1])[..., 0], y.mean(dim=(2, 3)), atol=1e-6)


def test_constant_map_gives_constant_regions():
    x = torch.full((2, 4, 6, 6), 3.5)
    assert torch.allclose(spatial_pyramid(x), torch.full((2, 4, 21), 3.5))


@pytest.mark.parametrize("scales", [[], [3], [4, 1], [1, 1, 2], [1, 8], "[1,2]", [True], [1.0, 2.0]])
def test_bad_scales_are_refused_in_one_line(scales):
    with pytest.raises(MdistillerError, match="strictly increasing subset of") as info:
        spatial_pyramid(torch.zeros(1, 1, 8, 8), scales)
    assert "\n" not in str(info.value)


def test_rows_are_region_major():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # (B, C, N)
    rows = region_rows(x)
    for n in range(4):
        for b in range(2):
            assert torch.equal(rows[n * 2 + b], x[b, :, n])


def _teacher_regions(predictions: list[list[int]], classes: int = 3) -> torch.Tensor:
    """(B, C, N) logits whose argmax at (b, n) is predictions[b][n]."""
    batch, regions = len(predictions), len(predictions[0])
    logits = torch.zeros(batch, classes, regions)
    for b in range(batch):
        for n in range(regions):
            logits[b, predictions[b][n], n] = 5.0
    return logits


def _hand_weights(predictions: list[list[int]], target: list[int]) -> list[float]:
    """Row n * B + b: 1 on region 0; else 2 when (local right) != (global right)."""
    batch, regions = len(predictions), len(predictions[0])
    weights = [0.0] * (batch * regions)
    for n in range(regions):
        for b in range(batch):
            local = predictions[b][n] == target[b]
            glob = predictions[b][0] == target[b]
            weights[n * batch + b] = 2.0 if n > 0 and local != glob else 1.0
    return weights


def test_row_weights_are_the_teachers_complementary_regions():
    # sample 0: global right; regions 1, 3 wrong (complementary, 2), 2, 4 right (1)
    # sample 1: global wrong; region 1 right (2), 2 wrong on another class (1), 3 wrong on the global's class (1)
    predictions = [[0, 1, 0, 2, 0], [2, 1, 0, 2, 2]]
    target = [0, 1]
    weights = region_weights(_teacher_regions(predictions), torch.tensor(target))
    assert weights.tolist() == _hand_weights(predictions, target)
    assert weights.tolist() == [1, 1, 2, 2, 1, 1, 2, 1, 1, 1]
    assert weights.dtype == torch.float32


def test_row_weights_ignore_the_student():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(4, 5, 5, generator=gen)
    t = torch.randn(4, 5, 5, generator=gen)
    y = torch.tensor([0, 1, 2, 3])
    weights = np.array(_hand_weights(t.argmax(1).tolist(), y.tolist()))
    for student in (s, t, -t):  # the student's own predictions (right, wrong, the teacher's) never move a weight
        expected = (_np_kd_rows(student, t, 4.0) * weights).sum() / 20
        assert sdd_kd_loss(student, t, y, 4.0).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def _np_rows(x: torch.Tensor) -> list[np.ndarray]:
    batch, _, regions = x.shape
    return [x[b, :, n].double().numpy() for n in range(regions) for b in range(batch)]


def _np_kd_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> np.ndarray:
    out = []
    for zs, zt in zip(_np_rows(s), _np_rows(t)):
        ps, pt = _np_softmax(zs / temperature), _np_softmax(zt / temperature)
        out.append(temperature**2 * sum(pt[c] * math.log(pt[c] / ps[c]) for c in range(len(pt))))
    return np.array(out)


def _np_dkd_rows(s, t, target, alpha, beta, temperature) -> np.ndarray:
    regions = s.shape[2]
    out = []
    for zs, zt, y in zip(_np_rows(s), _np_rows(t), list(target) * regions):
        ps, pt = _np_softmax(zs / temperature), _np_softmax(zt / temperature)
        tckd = pt[y] * math.log(pt[y] / ps[y]) + (1 - pt[y]) * math.log((1 - pt[y]) / (1 - ps[y]))
        others = [c for c in range(len(zs)) if c != y]
        qs, qt = _np_softmax(zs[others] / temperature), _np_softmax(zt[others] / temperature)
        nckd = sum(qt[i] * math.log(qt[i] / qs[i]) for i in range(len(others)))
        out.append(temperature**2 * (alpha * tckd + beta * nckd))
    return np.array(out)


def _np_nkd_rows(s, t, target, temperature, gamma) -> np.ndarray:
    regions = s.shape[2]
    out = []
    for zs, zt, y in zip(_np_rows(s), _np_rows(t), list(target) * regions):
        target_part = -_np_softmax(zt)[y] * math.log(_np_softmax(zs)[y])
        qs, qt = _np_softmax(zs / temperature), _np_softmax(zt / temperature)
        out.append(target_part - gamma * temperature**2 * sum(qt[c] * math.log(qs[c]) for c in range(len(zs))))
    return np.array(out)


def _regions_case(seed: int, batch: int = 3, classes: int = 4, regions: int = 5):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, regions, generator=gen) * 2
    t = torch.randn(batch, classes, regions, generator=gen) * 2
    t[:, 1] += 1.5  # the teacher often predicts class 1: a mix of right and wrong rows
    y = torch.tensor([1, 0, 1, 2, 1, 3][:batch])
    predictions = t.argmax(1).tolist()
    weights = np.array(_hand_weights(predictions, y.tolist()))
    assert set(weights[batch:]) == {1.0, 2.0}, "the case should hold both kinds of rows"
    return s, t, y, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_sd_kd_matches_a_hand_computation(seed):
    s, t, y, weights = _regions_case(seed)
    expected = (weights * _np_kd_rows(s, t, 4.0)).sum() / len(weights)
    assert sdd_kd_loss(s, t, y, 4.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_sd_dkd_matches_a_hand_computation(seed):
    s, t, y, weights = _regions_case(seed)
    expected = (weights * _np_dkd_rows(s, t, y.tolist(), 1.0, 8.0, 4.0)).sum() / len(weights)
    assert sdd_dkd_loss(s, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_sd_nkd_matches_a_hand_computation_with_the_label_column_kept(seed):
    s, t, y, weights = _regions_case(seed)
    expected = (weights * _np_nkd_rows(s, t, y.tolist(), 2.0, 1.5)).sum() / len(weights)
    assert sdd_nkd_loss(s, t, y, 2.0, 1.5).item() == pytest.approx(expected, rel=1e-5)


def test_one_region_falls_back_to_the_plain_losses():
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(6, 10, generator=gen) * 3
    t = torch.randn(6, 10, generator=gen) * 3
    y = torch.randint(0, 10, (6,), generator=gen)
    s1, t1 = s.unsqueeze(2), t.unsqueeze(2)
    assert torch.allclose(sdd_kd_loss(s1, t1, y, 4.0), kd_loss(s, t, 4.0), rtol=1e-6)
    assert torch.allclose(sdd_dkd_loss(s1, t1, y, 1.0, 8.0, 4.0), dkd_loss(s, t, y, 1.0, 8.0, 4.0), rtol=1e-6)
    nkd = _np_nkd_rows(s1, t1, y.tolist(), 1.0, 1.5).mean()  # SDD's plain NKD: batch means, label kept
    assert sdd_nkd_loss(s1, t1, y, 1.0, 1.5).item() == pytest.approx(nkd, rel=1e-5)


def test_student_equal_to_teacher_gives_zero_kd_and_dkd():
    _, t, y, _ = _regions_case(2)
    assert sdd_kd_loss(t, t, y, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sdd_dkd_loss(t, t, y, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sdd_nkd_loss(t, t, y, 1.0, 1.5).item() > 0  # a cross-entropy: the teacher's entropy remains


def test_losses_do_not_depend_on_the_order_of_the_samples():
    s, t, y, _ = _regions_case(3, batch=4)
    perm = torch.tensor([2, 0, 3, 1])
    for fn in (
        lambda a, b, c: sdd_kd_loss(a, b, c, 4.0),
        lambda a, b, c: sdd_dkd_loss(a, b, c, 1.0, 8.0, 4.0),
        lambda a, b, c: sdd_nkd_loss(a, b, c, 1.0, 1.5),
    ):
        assert fn(s[perm], t[perm], y[perm]).item() == pytest.approx(fn(s, t, y).item(), rel=1e-6)


def test_nan_kl_entries_are_zeroed_in_kd_only():
    # a class both give probability 0 (logit -inf): its KL entry is 0 * inf = NaN, which SD-KD's reference zeroes
    s = torch.tensor([[[0.0], [float("-inf")], [1.0]]])
    t = torch.tensor([[[1.0], [float("-inf")], [0.0]]])
    y = torch.tensor([0])
    expected = _np_kd_rows(s[:, [0, 2]], t[:, [0, 2]], 1.0).sum()
    assert sdd_kd_loss(s, t, y, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert torch.isnan(sdd_nkd_loss(s, t, y, 1.0, 1.5))  # no zeroing in SDD_nkd.py: the whole-loss guard acts


def test_whole_loss_guard_gives_zero_and_exactly_zero_gradient():
    s, t, y, _ = _regions_case(4)
    # finite: the unguarded value and gradient
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    plain = sdd_dkd_loss(a, t, y, 1.0, 8.0, 4.0)
    guard = guarded(sdd_dkd_loss, b, t, y, 1.0, 8.0, 4.0)
    assert torch.equal(plain, guard)
    plain.backward()
    guard.backward()
    assert torch.equal(a.grad, b.grad)
    # TCKD's log(0): a student target probability that underflows makes the loss inf, and the plain backward NaN
    s_bad = s.clone()
    s_bad[0, y[0], 0] = -1e4
    a, b = s_bad.clone().requires_grad_(), s_bad.clone().requires_grad_()
    plain = sdd_dkd_loss(a, t, y, 1.0, 8.0, 4.0)
    assert torch.isinf(plain)
    plain.backward()
    assert torch.isnan(a.grad).any()
    guard = guarded(sdd_dkd_loss, b, t, y, 1.0, 8.0, 4.0)
    assert guard.item() == 0.0
    guard.backward()
    assert torch.equal(b.grad, torch.zeros_like(b.grad))  # the reference's fresh zero sends no gradient at all
    nan_case = torch.full_like(s, float("nan")).requires_grad_()
    assert guarded(sdd_nkd_loss, nan_case, t, y, 1.0, 1.5).item() == 0.0


def test_gradients_reach_the_student_regions_only():
    s, t, y, _ = _regions_case(4)
    for fn in (
        lambda a, b: sdd_kd_loss(a, b, y, 4.0),
        lambda a, b: sdd_dkd_loss(a, b, y, 1.0, 8.0, 4.0),
        lambda a, b: sdd_nkd_loss(a, b, y, 1.0, 1.5),
    ):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(a, b)
        assert loss.shape == ()
        loss.backward()
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        assert b.grad is None


def test_bf16_inputs_give_the_fp32_value():
    s, t, y, _ = _regions_case(5)
    s16, t16 = s.bfloat16(), t.bfloat16()
    for fn in (
        lambda a, b: sdd_kd_loss(a, b, y, 4.0),
        lambda a, b: sdd_dkd_loss(a, b, y, 1.0, 8.0, 4.0),
        lambda a, b: sdd_nkd_loss(a, b, y, 1.0, 1.5),
    ):
        expected = fn(s16.float(), t16.float())
        for autocast in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got = fn(s16, t16)
            assert got.dtype == torch.float32
            assert torch.equal(got, expected)


def test_mismatched_inputs_are_refused_in_one_line():
    s = torch.randn(2, 4, 5)
    with pytest.raises(MdistillerError, match="one shape"):
        sdd_kd_loss(s, torch.randn(2, 4, 1), torch.tensor([0, 1]), 4.0)
    with pytest.raises(MdistillerError, match="targets"):
        sdd_dkd_loss(s, s, torch.tensor([0, 1, 2]), 1.0, 8.0, 4.0)
    with pytest.raises(MdistillerError, match="pre-pool map"):
        spatial_pyramid(torch.randn(2, 4, 8), [1])


# ---- the distillers ----

def _models(student: str = "resnet8", teacher: str = "resnet20"):
    torch.manual_seed(0)
    return cifar_model_dict[student][0](num_classes=100), cifar_model_dict[teacher][0](num_classes=100)


def _batch(seed: int = 0, batch: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 100, (batch,), generator=gen)


@pytest.mark.parametrize("kind", ["SDD_KD", "SDD_DKD", "SDD_NKD"])
@pytest.mark.parametrize("scales", [(1, 2, 4), (1, 2)])
def test_distiller_losses_are_the_pure_functions_on_the_region_logits(kind, scales):
    student, teacher = _models("ShuffleV2", "wrn_16_2")  # ShuffleV2's pre-pool map is not in feats["feats"]
    cls = {"SDD_KD": SDD_KD, "SDD_DKD": SDD_DKD, "SDD_NKD": SDD_NKD}[kind]
    hparams = {"SDD_KD": dict(temperature=4.0, ce_weight=0.1, kd_weight=0.9),
               "SDD_DKD": dict(ce_weight=1.0, alpha=1.0, beta=6.0, temperature=4.0, warmup=20),
               "SDD_NKD": dict(ce_weight=1.0, temperature=4.0, gamma=6.0, warmup=20)}[kind]
    distiller = cls(student, teacher, scales=scales, **hparams).train()
    image, target = _batch()
    logits, losses = distiller.forward_train(image, target, epoch=5)
    with torch.no_grad():
        z_s, f_s = distiller.student(image)
        _, f_t = distiller.teacher(image)
        region_s = classify_regions(student, spatial_pyramid(f_s["prepool"], scales))
        region_t = classify_regions(teacher, spatial_pyramid(f_t["prepool"], scales))
    regions = {(1, 2, 4): 21, (1, 2): 5}[scales]
    assert region_s.shape == (4, 100, regions)
    assert torch.allclose(region_s[:, :, 0], z_s, atol=1e-5)  # region 0 on a pooled-globally map: the logits
    if kind == "SDD_KD":
        expected = 0.9 * sdd_kd_loss(region_s, region_t, target, 4.0)
    elif kind == "SDD_DKD":
        expected = 5 / 20 * sdd_dkd_loss(region_s, region_t, target, 1.0, 6.0, 4.0)
    else:
        expected = 5 / 20 * sdd_nkd_loss(region_s, region_t, target, 4.0, 6.0)
    assert torch.allclose(losses["loss_kd"], expected, rtol=1e-5, atol=0)
    assert set(losses) == {"loss_ce", "loss_kd"}


def test_one_scale_uses_the_ordinary_logits_and_can_be_cached():
    image, target = _batch(1)
    for cls, expected in (
        (SDD_KD, lambda s, t: 0.9 * kd_loss(s, t, 4.0)),
        (SDD_DKD, lambda s, t: 1.0 * dkd_loss(s, t, target, 1.0, 8.0, 4.0)),
        (SDD_NKD, lambda s, t: nkd_keep_label_rows(s, t, target, 4.0, 8.0).mean()),
    ):
        student, teacher = _models()
        distiller = cls(student, teacher, scales=[1]).train()
        cached = torch.randn(4, 100)  # served by the teacher-output cache: the teacher is not run
        logits, losses = distiller.forward_train(image, target, epoch=30, teacher_logits=cached)
        assert torch.allclose(losses["loss_kd"], expected(logits.detach(), cached), rtol=1e-5)
        assert cls.declares.teacher_uses({"scales": (1,)}) == {"image": frozenset({"logits"})}
        assert cls.declares.teacher_uses({"scales": (1, 2)}) == {"image": frozenset({"logits", "features"})}


def test_gradients_reach_the_student_never_the_teacher():
    student, teacher = _models()
    distiller = SDD_DKD(student, teacher).train()
    image, target = _batch(2)
    _, losses = distiller.forward_train(image, target, epoch=30)
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert [n for n, _ in distiller.named_extra_modules()] == []
    assert {k.split(".")[0] for k in distiller.state_dict()} == {"student", "teacher"}


def test_configs_read_the_authors_keys():
    cfg = load_cfg(str(REPO / "configs/cifar100/sdd_dkd/vgg13_vgg8.yaml"))
    hparams = SDD_DKD.hparams(cfg)
    assert hparams == {"scales": (1, 2), "ce_weight": 1.0, "alpha": 1.0, "beta": 6.0, "temperature": 4.0,
                       "warmup": 20}
    nkd = SDD_NKD.hparams(load_cfg(str(REPO / "configs/cifar100/sdd_nkd/resnet32x4_resnet8x4.yaml")))
    assert (nkd["scales"], nkd["gamma"], nkd["temperature"]) == ((1, 2), 8.0, 4.0)
    kd = SDD_KD.hparams(load_cfg(str(REPO / "configs/cifar100/sdd_kd/resnet32x4_ShuffleV1.yaml")))
    assert kd == {"scales": (1, 2, 4), "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    cfg.SDD.M = [1, 4, 2]
    with pytest.raises(MdistillerError, match="strictly increasing subset"):
        SDD_DKD.hparams(cfg)
    with pytest.raises(MdistillerError, match="refused for SDD_KD, SDD_DKD and SDD_NKD"):
        apply_logit_stand_flags(cfg, 2.0, 9.0)


def _cli_cfg(*argv: str):
    from mdistiller.cli import train as train_tool

    args = train_tool.parse_args(list(argv))
    return train_tool.build_cfg(args), args


def test_the_authors_flags_become_recorded_overrides():
    path = str(REPO / "configs/cifar100/sdd_dkd/resnet32x4_ShuffleV1.yaml")
    cfg, args = _cli_cfg("--cfg", path, "--M", "[1,2]", "--warmup", "30.0", "SOLVER.EPOCHS", "3")
    assert (list(cfg.SDD.M), cfg.DKD.WARMUP) == ([1, 2], 30)
    assert args.opts == ["SOLVER.EPOCHS", "3", "SDD.M", "[1,2]", "DKD.WARMUP", "30"]  # in the run name too
    cfg, _ = _cli_cfg("--M", "[1]", "--cfg", path)
    assert list(cfg.SDD.M) == [1] and cfg.DKD.WARMUP == 20


@pytest.mark.parametrize("argv, message", [
    (("--cfg", "configs/cifar100/kd/resnet32x4_resnet8x4.yaml", "--M", "[1,2]"),
     "--M sets SDD's scales (SDD.M), which DISTILLER.TYPE KD does not read"),
    (("--cfg", "configs/cifar100/dkd/resnet32x4_resnet8x4.yaml", "--warmup", "20"),
     "--warmup sets SD-DKD / SD-NKD's warm-up (DKD.WARMUP), which DISTILLER.TYPE DKD does not read"),
    (("--cfg", "configs/cifar100/sdd_kd/resnet32x4_ShuffleV1.yaml", "--warmup", "20"), "SD-KD has no warm-up"),
    (("--cfg", "configs/cifar100/sdd_kd/resnet32x4_ShuffleV1.yaml", "--M", "[1,2"), "--M takes a list of scales"),
    (("--cfg", "configs/cifar100/sdd_kd/resnet32x4_ShuffleV1.yaml", "--M", "[2,4]"), "SDD.M must start with 1"),
    (("--cfg", "configs/cifar100/sdd_nkd/resnet32x4_ShuffleV1.yaml", "--warmup", "2.5"), "whole number of epochs"),
])
def test_the_authors_flags_are_refused_in_one_line(argv, message):
    argv = tuple(str(REPO / a) if a.endswith(".yaml") else a for a in argv)
    with pytest.raises(MdistillerError) as info:
        _cli_cfg(*argv)
    assert message in str(info.value) and "\n" not in str(info.value)
