"""AT, NST, SP, PKT, RKD, KDSVD losses against hand computations (numpy loops written from the spec, float64),
their invariances, gradients, shapes and fp32 behaviour under bf16 autocast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdistiller.distillers.at import at_loss
from mdistiller.distillers.kdsvd import align_to_teacher, kdsvd_loss, leading_singular
from mdistiller.distillers.nst import nst_loss
from mdistiller.distillers.pkt import pkt_loss
from mdistiller.distillers.rkd import rkd_loss
from mdistiller.distillers.sp import sp_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0, relu=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x.clamp(min=0) if relu else x


# ---- hand computations (numpy, explicit loops) ----

def _np_pool(f: np.ndarray, h: int) -> np.ndarray:
    """Average pooling of (B, C, H, H) to (B, C, h, h) when h divides H (what adaptive pooling does then)."""
    b, c, big, _ = f.shape
    k = big // h
    out = np.zeros((b, c, h, h))
    for i in range(h):
        for j in range(h):
            out[:, :, i, j] = f[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(2, 3))
    return out


def _np_match(f_s, f_t):
    if f_s.shape[2] > f_t.shape[2]:
        f_s = _np_pool(f_s, f_t.shape[2])
    elif f_s.shape[2] < f_t.shape[2]:
        f_t = _np_pool(f_t, f_s.shape[2])
    return f_s, f_t


def _np_at_stage(f_s, f_t, p):
    f_s, f_t = _np_match(f_s, f_t)
    b = f_s.shape[0]
    total, count = 0.0, 0
    for n in range(b):
        maps = []
        for f in (f_s, f_t):
            a = np.array([sum(f[n, c, i, j] ** p for c in range(f.shape[1])) / f.shape[1]
                          for i in range(f.shape[2]) for j in range(f.shape[3])])
            maps.append(a / max(math.sqrt(sum(v * v for v in a)), 1e-12))
        for x, y in zip(*maps):
            total += (x - y) ** 2
            count += 1
    return total / count


def _np_nst_stage(f_s, f_t):
    f_s, f_t = _np_match(f_s, f_t)
    b = f_s.shape[0]

    def unit(f):
        flat = f.reshape(b, f.shape[1], -1)
        return flat / np.maximum(np.sqrt((flat ** 2).sum(axis=2, keepdims=True)), 1e-12)

    s, t = unit(f_s), unit(f_t)

    def mean_kernel(x, y):
        values = [sum(x[n, i, k] * y[n, j, k] for k in range(x.shape[2])) ** 2
                  for n in range(b) for i in range(x.shape[1]) for j in range(y.shape[1])]
        return sum(values) / len(values)

    return mean_kernel(t, t) + mean_kernel(s, s) - 2 * mean_kernel(s, t)


def _np_sp(f_s, f_t):
    b = f_s.shape[0]

    def gram(f):
        flat = f.reshape(b, -1)
        g = np.array([[sum(flat[i] * flat[j]) for j in range(b)] for i in range(b)])
        return np.array([row / max(math.sqrt(sum(row ** 2)), 1e-12) for row in g])

    diff = gram(f_t) - gram(f_s)
    return sum(diff[i, j] ** 2 for i in range(b) for j in range(b)) / (b * b)


def _np_pkt(f_s, f_t, eps=1e-7):
    b = f_s.shape[0]

    def probs(f):
        unit = np.array([row / (math.sqrt(sum(row ** 2)) + eps) for row in f])
        sim = np.array([[(sum(unit[i] * unit[j]) + 1) / 2 for j in range(b)] for i in range(b)])
        return np.array([row / sum(row) for row in sim])

    p_s, p_t = probs(f_s), probs(f_t)
    return sum(p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps)) for i in range(b) for j in range(b)) / b**2


def _smooth_l1(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def _np_rkd(f_s, f_t, squared=False, eps=1e-12, wd=25.0, wa=50.0):
    b = f_s.shape[0]

    def distances(e):
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    sq = max(sum((e[i] - e[j]) ** 2), eps)
                    d[i, j] = sq if squared else math.sqrt(sq)
        positive = [d[i, j] for i in range(b) for j in range(b) if d[i, j] > 0]
        return d / (sum(positive) / len(positive))

    def angles(e):
        out = []
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u, v = e[j] - e[i], e[k] - e[i]
                    u = u / max(np.linalg.norm(u), 1e-12)
                    v = v / max(np.linalg.norm(v), 1e-12)
                    out.append(float(u @ v))
        return out

    ds, dt = distances(f_s), distances(f_t)
    loss_d = sum(_smooth_l1(ds[i, j], dt[i, j]) for i in range(b) for j in range(b)) / b**2
    a_s, a_t = angles(f_s), angles(f_t)
    loss_a = sum(_smooth_l1(x, y) for x, y in zip(a_s, a_t)) / len(a_s)
    return wd * loss_d + wa * loss_a


def _np_kdsvd(maps_s, maps_t, k, torch_v_sign):
    """KDSVD by hand; the SVD's sign convention is the library's, so numpy's vectors are flipped to torch's."""
    def leading(f, n):
        b, c, h, w = f.shape
        vs, ss = [], []
        for i in range(b):
            _, s, vh = np.linalg.svd(f[i].reshape(c * h, w), full_matrices=False)
            v = vh.T[:, :n]
            ref = torch_v_sign(f[i], n)
            v = v * np.sign((v * ref).sum(axis=0))  # the same vectors as torch's, with its signs
            vs.append(v / np.linalg.norm(v, axis=0))
            ss.append(s[:n] / np.linalg.norm(s[:n]))
        return np.stack(vs), np.stack(ss)

    terms, prev = [], None
    for f_s, f_t in zip(maps_s, maps_t):
        v_t, s_t = leading(f_t, k)
        v_s, _ = leading(f_s, k + 3)
        b, w = v_t.shape[0], v_t.shape[1]
        aligned = np.zeros((b, w, k))
        for n in range(b):
            cos = v_s[n].T @ v_t[n]
            for col in range(k):
                best = max(abs(cos[r, col]) for r in range(cos.shape[0]))
                for r in range(cos.shape[0]):
                    if abs(cos[r, col]) == best:
                        aligned[n, :, col] += np.sign(cos[r, col]) * v_s[n][:, r]
        v_s = aligned * s_t[:, None, :]
        v_t = v_t * s_t[:, None, :]
        if prev is not None:
            ps, pt = prev
            total = 0.0
            for n in range(b):
                for a in range(v_s.shape[1]):
                    for c in range(ps.shape[1]):
                        for q in range(k):
                            r_s = math.exp(-((v_s[n, a, q] - ps[n, c, q]) ** 2) / 8)
                            r_t = math.exp(-((v_t[n, a, q] - pt[n, c, q]) ** 2) / 8)
                            total += (r_s - r_t) ** 2
            terms.append(total / b)
        prev = (v_s, v_t)
    return sum(terms)


def _torch_v(f: np.ndarray, n: int) -> np.ndarray:
    c, h, w = f.shape
    _, _, vh = torch.linalg.svd(torch.from_numpy(f.reshape(c * h, w)).float(), full_matrices=False)
    return vh.T[:, :n].double().numpy()


# ---- values ----

@pytest.mark.parametrize("p", [2, 3])
def test_at_matches_hand_computation_with_pooling_truncation_and_no_abs(p):
    # student 3 maps, teacher 2: the zip stops at 2; stage 1 pools the teacher (4 -> 2), stage 2 the student
    maps_s = [_rand(2, 3, 2, 2, seed=1), _rand(2, 2, 4, 4, seed=2), _rand(2, 2, 2, 2, seed=3)]
    maps_t = [_rand(2, 4, 4, 4, seed=4), _rand(2, 3, 2, 2, seed=5)]
    got = at_loss(maps_s, maps_t, p)
    hand = sum(_np_at_stage(s.double().numpy(), t.double().numpy(), p) for s, t in zip(maps_s[:2], maps_t))
    assert got.shape == () and got.item() == pytest.approx(hand, rel=1e-5)
    if p == 3:  # negative entries keep their sign under f^3: with |f|^3 the value would differ
        with_abs = sum(_np_at_stage(abs(s.double().numpy()), abs(t.double().numpy()), p)
                       for s, t in zip(maps_s[:2], maps_t))
        assert abs(with_abs - hand) > 1e-3


def test_nst_matches_hand_computation_with_different_channel_counts():
    maps_s = [_rand(2, 3, 4, 4, seed=1), _rand(2, 2, 2, 2, seed=2)]
    maps_t = [_rand(2, 5, 2, 2, seed=3), _rand(2, 4, 2, 2, seed=4)]
    hand = sum(_np_nst_stage(s.double().numpy(), t.double().numpy()) for s, t in zip(maps_s, maps_t))
    assert nst_loss(maps_s, maps_t).item() == pytest.approx(hand, rel=1e-5)


def test_sp_matches_hand_computation_and_has_shape_one():
    f_s, f_t = _rand(4, 3, 2, 2, seed=1), _rand(4, 5, 2, 2, seed=2)
    got = sp_loss(f_s, f_t)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(_np_sp(f_s.double().numpy(), f_t.double().numpy()), rel=1e-5)


def test_pkt_matches_hand_computation_mean_over_b_squared():
    f_s, f_t = _rand(5, 6, seed=1, relu=True), _rand(5, 3, seed=2, relu=True)
    got = pkt_loss(f_s, f_t)
    assert got.shape == ()
    assert got.item() == pytest.approx(_np_pkt(f_s.double().numpy(), f_t.double().numpy()), rel=1e-4)


def test_pkt_zero_row_stays_finite_and_nan_rows_become_zero():
    f_s = _rand(4, 6, seed=1)
    f_t = _rand(4, 6, seed=2)
    f_s[1] = 0.0  # norm 0: 0 / eps = 0, no NaN
    assert torch.isfinite(pkt_loss(f_s, f_t))
    nan_s = f_s.clone()
    nan_s[2, 0] = float("nan")  # that row's NaN entry is set to 0, the others divided by a NaN norm -> 0 too
    zero_row = f_s.clone()
    zero_row[2] = 0.0
    assert pkt_loss(nan_s, f_t).item() == pytest.approx(pkt_loss(zero_row, f_t).item(), rel=1e-6)


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_matches_hand_computation(squared):
    f_s, f_t = _rand(4, 3, seed=1), _rand(4, 5, seed=2)
    got = rkd_loss(f_s, f_t, squared, 1e-12, 25.0, 50.0)
    hand = _np_rkd(f_s.double().numpy(), f_t.double().numpy(), squared)
    assert got.shape == () and got.item() == pytest.approx(hand, rel=1e-4)


def test_rkd_keeps_the_expanded_distance_form_and_degenerate_triples():
    # duplicated samples: distance clamped to sqrt(eps), zero difference vectors give angle 0 (not NaN)
    f_s = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0]])
    f_t = torch.tensor([[0.5, 0.0], [2.0, 1.0], [2.0, 1.0]])
    got = rkd_loss(f_s, f_t, False, 1e-12, 25.0, 50.0)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(_np_rkd(f_s.double().numpy(), f_t.double().numpy()), rel=1e-4)


def test_rkd_float32_rounding_of_nearly_collinear_features_is_upstreams():
    # nearly collinear large features: |a|^2 + |b|^2 - 2ab cancels in float32, which cdist would not reproduce
    base = torch.full((4, 64), 30.0)
    f_s = base + 1e-3 * _rand(4, 64, seed=1)
    student = f_s.reshape(4, -1)
    sq = student.pow(2).sum(1)
    expanded = (sq[:, None] + sq[None, :] - 2 * student @ student.t()).clamp(min=1e-12).sqrt()
    exact = torch.cdist(f_s.double(), f_s.double()).float()
    assert not torch.allclose(expanded.fill_diagonal_(0), exact, rtol=1e-2)  # the cancellation is real
    f_t = _rand(4, 8, seed=2)
    with torch.no_grad():
        t_sq = f_t.pow(2).sum(1)
        t_d = (t_sq[:, None] + t_sq[None, :] - 2 * f_t @ f_t.t()).clamp(min=1e-12).sqrt().fill_diagonal_(0)
        t_d = t_d / t_d[t_d > 0].mean()
        s_d = expanded / expanded[expanded > 0].mean()
    got = rkd_loss(f_s, f_t, False, 1e-12, 1.0, 0.0)
    assert got.item() == torch.nn.functional.smooth_l1_loss(s_d, t_d).item()


def test_kdsvd_matches_hand_computation():
    maps_s = [_rand(2, 3, 4, 6, seed=1, relu=True), _rand(2, 4, 3, 5, seed=2, relu=True),
              _rand(2, 2, 4, 4, seed=3, relu=True)]
    maps_t = [_rand(2, 5, 3, 6, seed=4, relu=True), _rand(2, 2, 4, 5, seed=5, relu=True),
              _rand(2, 3, 3, 4, seed=6, relu=True)]
    for k in (1, 2):
        got = kdsvd_loss(maps_s, maps_t, k)
        hand = _np_kdsvd([m.double().numpy() for m in maps_s], [m.double().numpy() for m in maps_t], k, _torch_v)
        assert got.shape == () and got.item() == pytest.approx(hand, rel=1e-4, abs=1e-9)
        assert got.item() > 0


def test_kdsvd_singular_vectors_are_float32_normalised_and_truncated():
    f = _rand(3, 2, 4, 5, seed=1).double()
    v, s = leading_singular(f, 4)
    assert v.dtype == torch.float32 and v.shape == (3, 5, 4) and s.shape == (3, 4)
    assert torch.allclose(v.norm(dim=1), torch.ones(3, 4), atol=1e-5)
    assert torch.allclose(s.norm(dim=1), torch.ones(3), atol=1e-6)
    _, s_full, _ = np.linalg.svd(f.numpy().reshape(3, 8, 5))
    assert np.allclose(s.numpy(), s_full[:, :4] / np.linalg.norm(s_full[:, :4], axis=1, keepdims=True), atol=1e-5)


def test_kdsvd_alignment_takes_the_signed_max_and_keeps_ties():
    v_s = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, W=3, 3 student vectors)
    v_t = torch.tensor([[[0.0, 0.6], [-0.8, 0.6], [0.0, 0.0]]])  # (1, W=3, K=2); column 1 ties rows 0 and 1
    aligned = align_to_teacher(v_s, v_t)
    expected = torch.tensor([[[0.0, 1.0], [-1.0, 1.0], [0.0, 0.0]]])
    assert torch.equal(aligned, expected)


# ---- invariances ----

def test_zero_when_the_student_equals_the_teacher():
    maps = [_rand(3, 4, 8, 8, seed=1, relu=True), _rand(3, 6, 4, 4, seed=2, relu=True)]
    pooled = _rand(6, 10, seed=3, relu=True)
    assert at_loss(maps, maps, 2).item() == 0.0
    assert nst_loss(maps, maps).item() == pytest.approx(0.0, abs=1e-6)
    assert sp_loss(maps[-1], maps[-1]).item() == 0.0
    assert pkt_loss(pooled, pooled).item() == pytest.approx(0.0, abs=1e-9)
    assert rkd_loss(pooled, pooled).item() == 0.0
    assert kdsvd_loss(maps, maps, 1).item() == pytest.approx(0.0, abs=1e-10)


def test_at_and_sp_ignore_a_positive_rescaling_of_the_student():
    maps_s = [_rand(2, 3, 4, 4, seed=1, relu=True)]
    maps_t = [_rand(2, 5, 4, 4, seed=2, relu=True)]
    assert at_loss([3.0 * maps_s[0]], maps_t, 2).item() == pytest.approx(at_loss(maps_s, maps_t, 2).item(), rel=1e-5)
    assert sp_loss(3.0 * maps_s[0], maps_t[0]).item() == pytest.approx(sp_loss(maps_s[0], maps_t[0]).item(), rel=1e-5)


# ---- gradients, shapes, precision ----

def _cases():
    maps_s = [_rand(4, 3, 8, 8, seed=1, relu=True), _rand(4, 4, 4, 4, seed=2, relu=True)]
    maps_t = [_rand(4, 5, 8, 8, seed=3, relu=True), _rand(4, 6, 4, 4, seed=4, relu=True)]
    pooled_s, pooled_t = _rand(4, 6, seed=5, relu=True), _rand(4, 9, seed=6, relu=True)
    return {
        "at": (lambda s, t: at_loss(s, t, 2), maps_s, maps_t),
        "nst": (nst_loss, maps_s, maps_t),
        "sp": (lambda s, t: sp_loss(s[-1], t[-1]), maps_s, maps_t),
        "pkt": (pkt_loss, pooled_s, pooled_t),
        "rkd": (rkd_loss, pooled_s, pooled_t),
        "kdsvd": (lambda s, t: kdsvd_loss(s, t, 1), maps_s, maps_t),
    }


def _leaves(x, grad: bool):
    if isinstance(x, list):
        return [v.clone().requires_grad_(grad) for v in x]
    return x.clone().requires_grad_(grad)


def _flat(x):
    return x if isinstance(x, list) else [x]


@pytest.mark.parametrize("name", ["at", "nst", "sp", "pkt", "rkd", "kdsvd"])
def test_gradient_reaches_the_student_and_never_the_teacher(name):
    fn, s, t = _cases()[name]
    s, t = _leaves(s, True), _leaves(t, True)
    loss = fn(s, t)
    assert loss.shape == ((1,) if name == "sp" else ())
    loss.sum().backward()
    used = _flat(s)[-1:] if name == "sp" else _flat(s)  # SP reads the last map only
    grads = [v.grad for v in used]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(v.grad is None for v in _flat(t))


@pytest.mark.parametrize("name", ["at", "nst", "sp", "pkt", "rkd", "kdsvd"])
def test_bf16_autocast_gives_the_fp32_value(name):
    fn, s, t = _cases()[name]

    def bf16(x):
        return [v.bfloat16() for v in x] if isinstance(x, list) else x.bfloat16()

    def fp32(x):
        return [v.float() for v in x] if isinstance(x, list) else x.float()

    s16, t16 = bf16(s), bf16(t)
    expected = fn(fp32(s16), fp32(t16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(s16, t16)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_empty_pairings_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        at_loss([], [_rand(1, 1, 2, 2)], 2)
    with pytest.raises(ValueError, match="at least two"):
        kdsvd_loss([_rand(2, 1, 4, 4)], [_rand(2, 1, 4, 4)], 1)
