"""TTM / WTTM losses: hand computations, closed forms (power 1 is KD at T = 1, the transformed teacher is the teacher
at temperature 1/power), the WTTM weights and their detachment, gradients, fp32 under bf16, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.ttm import ttm_loss, ttm_terms, wttm_loss
from mdistiller.errors import MdistillerError

pytestmark = pytest.mark.usefixtures("one_thread")

Z_S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
Z_T = [[2.0, 0.0, 1.0], [-1.0, 4.0, 1.0]]


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _hand_rows(z_s: list[list[float]], z_t: list[list[float]], power: float) -> list[tuple[float, float]]:
    """(KL_b, U_b) per row, from the formulas written out."""
    rows = []
    for s, t in zip(z_s, z_t):
        p_s = _softmax(s)
        powered = [p**power for p in _softmax(t)]
        u = sum(powered)
        q = [v / u for v in powered]
        rows.append((sum(qc * (math.log(qc) - math.log(pc)) for qc, pc in zip(q, p_s)), u))
    return rows


@pytest.mark.parametrize("power", [0.1, 0.5, 2.0])
def test_ttm_and_wttm_match_hand_computation(power: float) -> None:
    rows = _hand_rows(Z_S, Z_T, power)
    z_s, z_t = torch.tensor(Z_S), torch.tensor(Z_T)
    assert ttm_loss(z_s, z_t, power).item() == pytest.approx(sum(kl for kl, _ in rows) / 2, rel=1e-5)
    assert wttm_loss(z_s, z_t, power).item() == pytest.approx(sum(kl * u for kl, u in rows) / 2, rel=1e-5)
    kl, u = ttm_terms(z_s, z_t, power)
    assert kl.shape == u.shape == (2,)
    assert kl.tolist() == pytest.approx([r[0] for r in rows], rel=1e-5)
    assert u.tolist() == pytest.approx([r[1] for r in rows], rel=1e-6)


def test_power_one_is_kd_at_temperature_one_and_wttm_equals_ttm() -> None:
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(8, 10, generator=gen, dtype=torch.float64) * 3
    z_t = torch.randn(8, 10, generator=gen, dtype=torch.float64) * 3
    kd = kd_loss(z_s, z_t, 1.0).item()  # computed in fp32
    assert ttm_loss(z_s, z_t, 1.0).item() == pytest.approx(kd, rel=1e-6)
    # U_b = sum_c p_c = 1
    assert wttm_loss(z_s, z_t, 1.0).item() == pytest.approx(ttm_loss(z_s, z_t, 1.0).item(), rel=1e-12)


@pytest.mark.parametrize("power", [0.1, 0.3, 2.0])
def test_transformed_teacher_is_the_teacher_at_temperature_one_over_power(power: float) -> None:
    gen = torch.Generator().manual_seed(1)
    z_s = torch.randn(6, 7, generator=gen, dtype=torch.float64) * 2
    z_t = torch.randn(6, 7, generator=gen, dtype=torch.float64) * 2
    q = torch.softmax(power * z_t, dim=1)
    expected = (q * (q.log() - torch.log_softmax(z_s, dim=1))).sum(1).mean()
    assert ttm_loss(z_s, z_t, power).item() == pytest.approx(expected.item(), rel=1e-10)
    # and it is 0 when the student predicts that distribution
    assert ttm_loss(power * z_t, z_t, power).item() == pytest.approx(0.0, abs=1e-12)


def test_wttm_weights_each_sample_by_the_teachers_power_sum() -> None:
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(5, 8, generator=gen, dtype=torch.float64) * 2
    z_t = torch.randn(5, 8, generator=gen, dtype=torch.float64) * 2
    power = 0.2
    per_sample = [ttm_loss(z_s[b : b + 1], z_t[b : b + 1], power).item() for b in range(5)]
    weights = [sum(p**power for p in torch.softmax(z_t[b], 0).tolist()) for b in range(5)]
    assert all(w >= 1.0 for w in weights)
    assert wttm_loss(z_s, z_t, power).item() == pytest.approx(
        sum(w * kl for w, kl in zip(weights, per_sample)) / 5, rel=1e-10
    )
    # the flat teacher row has the largest weight, C^(1 - power)
    flat = torch.zeros(1, 8, dtype=torch.float64)
    assert ttm_terms(z_s[:1], flat, power)[1].item() == pytest.approx(8 ** (1 - power), rel=1e-12)


def test_underflowing_teacher_probabilities_contribute_zero() -> None:
    # softmax(z_t) underflows to 0 in fp32 for the last class: q is 0 there (the reference's pow of the softmax)
    z_t = torch.tensor([[0.0, 1.0, -200.0]])
    z_s = torch.tensor([[0.5, 0.0, 0.0]])
    loss = ttm_loss(z_s, z_t, 0.1)
    p_s = _softmax([0.5, 0.0, 0.0])
    q = [p**0.1 for p in _softmax([0.0, 1.0])]
    q = [v / sum(q) for v in q]
    expected = sum(qc * math.log(qc / pc) for qc, pc in zip(q, p_s[:2]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradcheck_float64_student() -> None:
    gen = torch.Generator().manual_seed(3)
    z_s = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: ttm_loss(s, z_t, 0.3), (z_s,))
    assert torch.autograd.gradcheck(lambda s: wttm_loss(s, z_t, 0.3), (z_s,))


def test_student_gradient_is_closed_form() -> None:
    """d/dz_s of mean_b w_b KL(q_b || softmax(z_s)_b) is w_b (p_s - q) / B."""
    gen = torch.Generator().manual_seed(4)
    z_s = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    power = 0.4
    q = torch.softmax(power * z_t, dim=1)
    u = torch.softmax(z_t, dim=1).pow(power).sum(1, keepdim=True)
    (grad_ttm,) = torch.autograd.grad(ttm_loss(z_s, z_t, power), z_s)
    (grad_wttm,) = torch.autograd.grad(wttm_loss(z_s, z_t, power), z_s)
    p_s = torch.softmax(z_s.detach(), dim=1)
    torch.testing.assert_close(grad_ttm, (p_s - q) / 4)
    torch.testing.assert_close(grad_wttm, u * (p_s - q) / 4)


def test_wttm_weight_carries_no_gradient_to_the_teacher() -> None:
    gen = torch.Generator().manual_seed(5)
    z_s = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    z_t = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    power = 0.3
    (grad,) = torch.autograd.grad(wttm_loss(z_s, z_t, power), z_t)
    # independent formula: the weight a constant, the gradient through q = softmax(power * z_t) only
    u = torch.softmax(z_t.detach(), dim=1).pow(power).sum(1)
    q = torch.softmax(power * z_t, dim=1)
    kl = (q * (q.log() - torch.log_softmax(z_s, dim=1))).sum(1)
    (expected,) = torch.autograd.grad((u * kl).mean(), z_t)
    torch.testing.assert_close(grad, expected)
    assert not ttm_terms(z_s, z_t, power)[1].requires_grad


def test_bf16_inputs_give_an_fp32_loss_inside_and_outside_autocast() -> None:
    gen = torch.Generator().manual_seed(6)
    z_s = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    z_t = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    for fn in (ttm_loss, wttm_loss):
        reference = fn(z_s.float(), z_t.float(), 0.2)
        plain = fn(z_s, z_t, 0.2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = fn(z_s, z_t, 0.2)
        for loss in (plain, autocast):
            assert loss.dtype == torch.float32 and loss.shape == ()
            assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("power", [0.0, -0.5, float("inf")])
def test_non_positive_power_is_refused(power: float) -> None:
    with pytest.raises(MdistillerError, match="power must be") as info:
        wttm_loss(torch.zeros(2, 3), torch.zeros(2, 3), power)
    assert "\n" not in str(info.value)


def test_mismatched_logits_are_refused() -> None:
    with pytest.raises(MdistillerError, match="same shape"):
        ttm_loss(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
