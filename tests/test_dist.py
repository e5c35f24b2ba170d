"""DIST loss: a float64 hand computation, closed forms, the eps placement, the batch coupling of the intra term,
gradients, fp32 under bf16, and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdistiller.distillers.dist import dist_loss, inter_class_relation, intra_class_relation
from mdistiller.errors import MdistillerError

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax_rows(z: np.ndarray, tau: float) -> np.ndarray:
    out = np.zeros_like(z)
    for b in range(z.shape[0]):
        exps = [math.exp(v / tau) for v in z[b]]
        out[b] = [e / sum(exps) for e in exps]
    return out


def _corr(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [x - mean_a for x in a], [x - mean_b for x in b]
    dot = sum(x * y for x, y in zip(ca, cb))
    norm_a = math.sqrt(sum(x * x for x in ca))
    norm_b = math.sqrt(sum(y * y for y in cb))
    return dot / (norm_a * norm_b + 1e-8)


def _hand_dist(z_s: np.ndarray, z_t: np.ndarray, beta: float, gamma: float, tau: float) -> float:
    y_s, y_t = _softmax_rows(z_s, tau), _softmax_rows(z_t, tau)
    rows, cols = y_s.shape
    inter = 1 - sum(_corr(list(y_s[b]), list(y_t[b])) for b in range(rows)) / rows
    intra = 1 - sum(_corr(list(y_s[:, c]), list(y_t[:, c])) for c in range(cols)) / cols
    return tau**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_matches_hand_computation(tau: float) -> None:
    z_s = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [2.5, 0.1, 0.1, -0.7]])
    z_t = np.array([[2.0, 0.0, 1.0, 0.3], [1.0, 1.5, 1.0, -2.0], [0.4, 3.0, -1.0, 0.0]])
    beta, gamma = 1.5, 0.5
    expected = _hand_dist(z_s, z_t, beta, gamma, tau)
    got = dist_loss(torch.tensor(z_s, dtype=torch.float32), torch.tensor(z_t, dtype=torch.float32), beta, gamma, tau)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got64 = dist_loss(torch.tensor(z_s), torch.tensor(z_t), beta, gamma, tau)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(expected, rel=1e-12)


def test_inter_and_intra_terms_alone() -> None:
    y_s = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    y_t = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    inter = 1 - (_corr([0.7, 0.2, 0.1], [0.5, 0.4, 0.1]) + _corr([0.1, 0.3, 0.6], [0.2, 0.2, 0.6])) / 2
    # columns across the batch of two: (0.7, 0.1) vs (0.5, 0.2) etc.; with two samples each is +-1 (or 0 if flat)
    intra = 1 - (_corr([0.7, 0.1], [0.5, 0.2]) + _corr([0.2, 0.3], [0.4, 0.2]) + _corr([0.1, 0.6], [0.1, 0.6])) / 3
    assert inter_class_relation(y_s, y_t).item() == pytest.approx(inter, rel=1e-12)
    assert intra_class_relation(y_s, y_t).item() == pytest.approx(intra, rel=1e-12)
    assert intra == pytest.approx(1 - (1 - 1 + 1) / 3, abs=1e-6)


def test_zero_when_student_matches_teacher_up_to_a_per_row_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    z_t = torch.randn(8, 10, generator=gen, dtype=torch.float64) * 3
    shift = torch.randn(8, 1, generator=gen, dtype=torch.float64) * 5
    # not exactly 0: each correlation is |a|^2 / (|a|^2 + 1e-8)
    assert dist_loss(z_t + shift, z_t, 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_two_classes_mirrored_student_is_fully_anticorrelated(tau: float) -> None:
    # C = 2, z_s = -z_t: y_s is y_t with its columns swapped, every row and column correlation is -1
    z_t = torch.tensor([[2.0, -1.0], [0.5, 1.5], [-3.0, 0.0]], dtype=torch.float64)
    beta, gamma = 1.0, 2.0
    assert dist_loss(-z_t, z_t, beta, gamma, tau).item() == pytest.approx(tau**2 * (2 * beta + 2 * gamma), rel=1e-6)


def test_eps_is_added_to_the_product_of_the_norms() -> None:
    # nearly flat rows: centred norms ~1e-4, so |a| |b| ~ 1e-8 is comparable to the eps
    z = torch.tensor([[0.0, 4e-4, -4e-4]], dtype=torch.float64)
    y = torch.softmax(z, dim=1)[0].tolist()
    centred = [v - sum(y) / 3 for v in y]
    sq = sum(v * v for v in centred)
    expected_corr = sq / (sq + 1e-8)  # eps per norm would give sq / (sqrt(sq) + 1e-8)^2, about 1
    assert 0.1 < expected_corr < 0.9
    got = dist_loss(z, z, 1.0, 0.0, 1.0).item()
    assert got == pytest.approx(1 - expected_corr, rel=1e-9)


def test_a_batch_of_one_has_intra_term_one() -> None:
    # each column is a single number: centred to 0, correlation 0 / (0 + eps) = 0
    gen = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(1, 5, generator=gen), torch.randn(1, 5, generator=gen)
    assert dist_loss(z_s, z_t, 0.0, 1.0, 4.0).item() == pytest.approx(16.0, rel=1e-6)


def test_intra_term_couples_the_batch_but_inter_term_does_not() -> None:
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(8, 6, generator=gen, dtype=torch.float64) * 2
    z_t = torch.randn(8, 6, generator=gen, dtype=torch.float64) * 2
    halves = (slice(0, 4), slice(4, 8))
    whole = dist_loss(z_s, z_t, 1.0, 1.0, 4.0).item()
    mean_of_halves = sum(dist_loss(z_s[h], z_t[h], 1.0, 1.0, 4.0).item() for h in halves) / 2
    assert abs(whole - mean_of_halves) > 1e-3
    inter_whole = dist_loss(z_s, z_t, 1.0, 0.0, 4.0).item()
    inter_halves = sum(dist_loss(z_s[h], z_t[h], 1.0, 0.0, 4.0).item() for h in halves) / 2
    assert inter_whole == pytest.approx(inter_halves, rel=1e-12)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    z_s = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: dist_loss(s, t, 1.0, 2.0, 4.0), (z_s, z_t))


def test_bf16_inputs_give_an_fp32_loss_inside_and_outside_autocast() -> None:
    gen = torch.Generator().manual_seed(4)
    z_s = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    z_t = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    reference = dist_loss(z_s.float(), z_t.float(), 1.0, 1.0, 4.0)
    plain = dist_loss(z_s, z_t, 1.0, 1.0, 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = dist_loss(z_s, z_t, 1.0, 1.0, 4.0)
    for loss in (plain, autocast):
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "student_shape, teacher_shape, tau, message",
    [
        ((4, 5), (4, 6), 4.0, "same shape"),
        ((20,), (20,), 4.0, "(B, C) tensor"),
        ((4, 1), (4, 1), 4.0, "at least 2 classes"),
        ((4, 5), (4, 5), 0.0, "tau must be"),
        ((4, 5), (4, 5), float("nan"), "tau must be"),
    ],
)
def test_bad_inputs_give_one_line_errors(student_shape, teacher_shape, tau, message) -> None:
    with pytest.raises(MdistillerError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        dist_loss(torch.zeros(student_shape), torch.zeros(teacher_shape), 1.0, 1.0, tau)
    assert "\n" not in str(info.value) and str(info.value).startswith("DIST:")
