"""VID: the Gaussian NLL by hand with upstream's constant variance 5.00000048, the 0.5 ln 5 per stage, pooling, the
learnable-variance switch, and the stage-count check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdistiller.distillers._stages import pool_to_smaller as match_sizes
from mdistiller.distillers.vid import initial_log_scale, vid_loss
from mdistiller.errors import MdistillerError

from classic_pairs import batch, build_classic

VAR = np.float32(5.00000048)  # softplus(log(exp(5 - 1e-5) - 1)) + 1e-5 in float32


def test_initial_log_scale_gives_the_constant_variance_upstream_trains_with():
    log_scale = initial_log_scale(5.0, 1e-5, 3)
    assert log_scale.dtype == torch.float32
    var = torch.log(1.0 + torch.exp(log_scale)) + 1e-5
    assert np.float32(var[0].item()) == VAR and var[0].item() == pytest.approx(5.0000004768, abs=1e-9)


def test_vid_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    mu, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    log_scale = initial_log_scale(5.0, 1e-5, 3)
    var = float(VAR)
    expected = np.mean(0.5 * ((mu.double().numpy() - t.double().numpy()) ** 2 / var + math.log(var)))
    assert vid_loss(mu, t, log_scale, 1e-5).item() == pytest.approx(expected, rel=1e-6)
    # perfect regression leaves the constant 0.5 ln var
    assert vid_loss(t, t, log_scale, 1e-5).item() == pytest.approx(0.5 * math.log(5.00000048), rel=1e-6)
    # per-channel variances: channel 1 at variance 1 (log-scale log(e - 1))
    scales = log_scale.clone()
    scales[1] = math.log(math.e - 1.0)
    per_channel = np.array([var, 1.0 + 1e-5, var]).reshape(1, 3, 1, 1)
    expected = np.mean(0.5 * ((mu.double().numpy() - t.double().numpy()) ** 2 / per_channel + np.log(per_channel)))
    assert vid_loss(mu, t, scales, 1e-5).item() == pytest.approx(expected, rel=1e-6)


def test_the_larger_map_is_pooled_to_the_smaller():
    big, small = torch.arange(16.0).view(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)
    pooled, same = match_sizes(big, small)
    torch.testing.assert_close(pooled, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert same is small
    same, pooled = match_sizes(small, big)
    assert same is small and pooled.shape == (1, 1, 2, 2)


def test_distiller_is_mse_over_ten_plus_half_log_five_per_stage(one_thread):
    distiller = build_classic("VID")
    assert [tuple(r[0].weight.shape) for r in distiller.regressors] == [(32, 16, 1, 1), (64, 32, 1, 1), (128, 64, 1, 1)]
    data = batch()
    _, losses = distiller.forward_train(**data)
    with torch.no_grad():
        f_s = distiller.student(data["image"])[1]["feats"][1:]
        f_t = distiller.teacher(data["image"])[1]["feats"][1:]
        mse = sum(((r(s) - t) ** 2).mean().item() for r, s, t in zip(distiller.regressors, f_s, f_t))
    expected = mse / (2 * 5.00000048) + 3 * 0.5 * math.log(5.00000048)  # 3 stages: + 2.414
    assert losses["loss_kd"].item() == pytest.approx(expected, rel=1e-5)


def test_constant_variances_are_neither_saved_nor_trained_by_default(one_thread):
    distiller = build_classic("VID")
    assert not any("log_scale" in k for k in distiller.state_dict())
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert all(id(s) not in learnable for s in distiller.stage_log_scales())
    assert [s.shape[0] for s in distiller.stage_log_scales()] == [32, 64, 128]
    assert all(not s.requires_grad for s in distiller.stage_log_scales())


def test_learnable_variances_are_parameters_trained_and_saved(one_thread):
    distiller = build_classic("VID", opts=["VID.LEARN_VARIANCE", "True"])
    keys = [k for k in distiller.state_dict() if "log_scale" in k]
    assert keys == ["log_scales.0", "log_scales.1", "log_scales.2"]
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert all(id(s) in learnable for s in distiller.stage_log_scales())
    before = [s.detach().clone() for s in distiller.stage_log_scales()]
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.1)
    _, losses = distiller.forward_train(**batch())
    losses["loss_kd"].backward()
    optimizer.step()
    assert all(not torch.equal(b, s) for b, s in zip(before, distiller.stage_log_scales()))


def test_a_student_with_more_stages_than_the_teacher_is_refused(one_thread):
    with pytest.raises(MdistillerError, match=r"^VID pairs each of student vgg8's 4 stages .* teacher wrn_16_2 has 3"):
        build_classic("VID", student="vgg8")
