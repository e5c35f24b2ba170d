"""CAT-KD: the CAM loss against a hand computation, zero for equal CAMs, normalisation invariance, binarisation, the
partial-CAM selection quirks (strictness, the hard-coded 100, packing across samples, the skip), gradients, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdistiller.distillers.cat_kd import binarize_cams, cat_loss, partial_cam_mask, select_partial_cams
from mdistiller.errors import MdistillerError

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _np_pool(x: np.ndarray, r: int) -> np.ndarray:
    """(H, W) -> (r, r) mean over equal blocks (H, W multiples of r)."""
    h, w = x.shape[0] // r, x.shape[1] // r
    return np.array([[x[i * h : (i + 1) * h, j * w : (j + 1) * w].mean() for j in range(r)] for i in range(r)])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("resolution", [1, 2, 4])
def test_loss_matches_a_hand_computation(normalize, resolution):
    s, t = _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 4, 4, seed=2)  # the student's maps may be larger
    total = 0.0
    for b in range(2):
        for c in range(3):
            ps = _np_pool(s[b, c].double().numpy(), resolution)
            pt = _np_pool(t[b, c].double().numpy(), resolution)
            if normalize:
                ps = ps / max(np.sqrt((ps**2).sum()), 1e-12)
                pt = pt / max(np.sqrt((pt**2).sum()), 1e-12)
            total += ((ps - pt) ** 2).sum()
    expected = total / (2 * 3 * resolution * resolution)
    assert cat_loss(s, t, resolution, normalize).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_equal_cams_give_zero(normalize):
    t = _rand(3, 5, 4, 4)
    assert cat_loss(t.clone(), t, 2, normalize).item() == 0.0


def test_normalisation_makes_the_loss_blind_to_per_map_positive_scale():
    s, t = _rand(2, 4, 4, 4, seed=3), _rand(2, 4, 4, 4, seed=4)
    scale = torch.rand(2, 4, 1, 1, generator=torch.Generator().manual_seed(5)) * 5 + 0.1
    assert cat_loss(s * scale, t, 2, True).item() == pytest.approx(cat_loss(s, t, 2, True).item(), rel=1e-5)
    assert abs(cat_loss(s * scale, t, 2, False).item() - cat_loss(s, t, 2, False).item()) > 1e-3


def test_binarisation_is_strictly_above_the_mean_absolute_value():
    t = torch.tensor([[[[1.0, -1.0], [3.0, 1.0]], [[-4.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    # means of |x|: 1.5, 1.0, 2.0 -> only 3 passes; -4 is below its threshold; equal values are not above theirs
    expected = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(binarize_cams(t), expected)
    s = _rand(1, 3, 2, 2, seed=6)
    assert cat_loss(s, t, 1, False, binarize=True).item() == pytest.approx(
        cat_loss(s, expected, 1, False).item(), rel=1e-6
    )


def test_strategy_0_keeps_classes_strictly_above_the_nth_largest():
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0, 1.0]])
    assert partial_cam_mask(logits, 3, 0).tolist() == [
        [True, False, True, False, False],
        [False, True, True, False, False],
    ]
    # a tie at the n-th largest keeps fewer
    tied = torch.tensor([[5.0, 4.0, 4.0, 1.0, 0.0]])
    assert partial_cam_mask(tied, 3, 0).tolist() == [[True, False, False, False, False]]


def test_strategy_1_uses_the_hard_coded_100():
    logits = _rand(2, 100, seed=7)
    mask = partial_cam_mask(logits, 10, 1)
    assert mask.sum(1).tolist() == [11, 11]  # n + 1 at C = 100
    lowest = logits.argsort(1)[:, :11]
    assert all(set(lowest[b].tolist()) == set(mask[b].nonzero().flatten().tolist()) for b in range(2))
    # at C = 1000 the index is still 99 - n: keep all but the 89 highest
    big = _rand(1, 1000, seed=8)
    assert partial_cam_mask(big, 10, 1).sum().item() == 1000 - 89


def test_selection_packs_the_whole_batch_and_mixes_samples():
    cams = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1).expand(2, 4, 3, 3).contiguous()
    # sample 0 keeps classes 0, 1, 2 (above 0.0); sample 1 keeps class 3 only: 4 maps, a multiple of B = 2
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    picked = select_partial_cams(cams, logits, 4, 0)
    assert picked.shape == (2, 2, 3, 3)
    assert picked[:, :, 0, 0].tolist() == [[0.0, 1.0], [2.0, 7.0]]  # row 1 holds sample 0's third map
    # 3 kept maps do not divide B = 2: everything is kept, unchanged
    odd = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert select_partial_cams(cams, odd, 3, 0) is cams


def test_selection_keeps_gradients_to_the_student():
    s = _rand(2, 6, 4, 4, seed=9).requires_grad_()
    t = _rand(2, 6, 4, 4, seed=10)
    logits = _rand(2, 6, seed=11)
    loss = cat_loss(select_partial_cams(s, logits, 4, 0), select_partial_cams(t, logits, 4, 0), 2, True)
    loss.backward()
    kept = partial_cam_mask(logits, 4, 0)
    assert (s.grad.abs().sum(dim=(2, 3)) > 0).tolist() == kept.tolist()


def test_gradients_reach_the_student_only():
    s = _rand(2, 3, 4, 4, seed=12).requires_grad_()
    t = _rand(2, 3, 4, 4, seed=13).requires_grad_()
    loss = cat_loss(s, t, 2, True, binarize=True)
    assert loss.shape == ()
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bf16_inputs_give_the_fp32_value():
    s, t = _rand(2, 3, 8, 8, seed=14).bfloat16(), _rand(2, 3, 8, 8, seed=15).bfloat16()
    expected = cat_loss(s.float(), t.float(), 2, True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = cat_loss(s, t, 2, True)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_bad_inputs_are_refused_in_one_line():
    cams = _rand(2, 4, 2, 2)
    with pytest.raises(MdistillerError, match="Strategy must be 0 or 1"):
        select_partial_cams(cams, _rand(2, 4), 2, 2)
    with pytest.raises(MdistillerError, match="indexes sorted position"):
        partial_cam_mask(_rand(2, 4), 10, 0)
    with pytest.raises(MdistillerError, match="indexes sorted position"):
        partial_cam_mask(_rand(2, 50), 10, 1)  # 99 - 10 is past 50 classes
    with pytest.raises(MdistillerError, match="kept no CAM"):
        select_partial_cams(cams, _rand(2, 4), 1, 0)  # nothing is strictly above the largest
    with pytest.raises(MdistillerError, match="do not match"):
        select_partial_cams(cams, _rand(2, 5), 2, 0)
    with pytest.raises(MdistillerError, match=r"\(B, C, H, W\)"):
        cat_loss(_rand(2, 4), cams, 2, True)
    with pytest.raises(MdistillerError, match="differ in"):
        cat_loss(_rand(2, 3, 2, 2), cams, 2, True)
    with pytest.raises(MdistillerError, match="CAM_RESOLUTION"):
        cat_loss(cams, cams, 0, True)
