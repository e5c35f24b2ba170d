"""The shared feature probe (distillers/probe.py): the clean probe changes nothing, the upstream one moves every BN
running statistic 10% toward one noise image and draws once from the global RNG; FitNet / VID pick by switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdistiller.distillers.probe import Setting, map_shapes, probe_features, probe_input_size
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from classic_pairs import build_classic


def _models():
    torch.manual_seed(0)
    student = cifar_model_dict["resnet8"][0](num_classes=10).train()
    teacher = cifar_model_dict["wrn_16_1"][0](num_classes=10).eval()
    return student, teacher


def _buffers(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_clean_probe_changes_nothing_and_draws_nothing(one_thread):
    student, teacher = _models()
    before = [_buffers(student), _buffers(teacher)]
    rng = torch.get_rng_state()
    feats_s, feats_t = probe_features((student, teacher), (32, 32))
    assert torch.equal(torch.get_rng_state(), rng)
    for model, saved in zip((student, teacher), before):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert student.training and not teacher.training  # modes restored
    assert map_shapes(feats_s) == [(1, 16, 32, 32), (1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
    assert map_shapes(feats_t, "preact_feats")[-1] == (1, 64, 8, 8)


def test_upstream_probe_moves_every_bn_ten_percent_toward_one_noise_image(one_thread):
    student, teacher = _models()
    before = [_buffers(student), _buffers(teacher)]
    torch.manual_seed(123)
    noise = torch.randn(1, 3, 32, 32)  # what the probe draws, from the same RNG state
    after_draw = torch.get_rng_state()
    torch.manual_seed(123)
    probe_features((student, teacher), (32, 32), upstream=True)
    assert torch.equal(torch.get_rng_state(), after_draw)  # exactly one draw of one image
    assert student.training and not teacher.training
    for model, saved in zip((student, teacher), before):
        counts = [k for k in saved if k.endswith("num_batches_tracked")]
        assert counts and all(model.state_dict()[k] == saved[k] + 1 for k in counts)
    # the first BN of each model, by hand: running <- 0.9 running + 0.1 batch statistic (unbiased variance)
    with torch.no_grad():
        stem = F.conv2d(noise, student.conv1.weight, padding=1)
    mean, var = stem.mean(dim=(0, 2, 3)), stem.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(student.bn1.running_mean, 0.9 * before[0]["bn1.running_mean"] + 0.1 * mean)
    torch.testing.assert_close(student.bn1.running_var, 0.9 * before[0]["bn1.running_var"] + 0.1 * var)
    assert not torch.equal(teacher.block1.layer[0].bn1.running_mean, before[1]["block1.layer.0.bn1.running_mean"])


@pytest.mark.parametrize("method", ["FITNET", "VID"])
def test_fitnet_and_vid_probe_is_clean_by_default_and_upstream_behind_the_switch(method, one_thread):
    clean = build_classic(method)
    assert int(clean.teacher.bn1.num_batches_tracked) == 0 and int(clean.student.bn1.num_batches_tracked) == 0
    upstream = build_classic(method, opts=[f"{method}.UPSTREAM_PROBE", "True"])
    assert int(upstream.teacher.bn1.num_batches_tracked) == 1 and int(upstream.student.bn1.num_batches_tracked) == 1
    assert not torch.equal(upstream.teacher.bn1.running_var, clean.teacher.bn1.running_var)


def test_probe_input_size_follows_the_data_set():
    cfg = default_cfg()
    assert probe_input_size(Setting.from_cfg(cfg), (32, 32)) == (32, 32)
    cfg.DATASET.TYPE, cfg.DATASET.IMAGE_SIZE = "imagenet", 160
    assert probe_input_size(Setting.from_cfg(cfg), (32, 32)) == (160, 160)
    with pytest.raises(MdistillerError, match=r"FITNET.INPUT_SIZE \(224, 224\) differs from the training size 160"):
        probe_input_size(Setting.from_cfg(cfg), (224, 224), "FITNET.INPUT_SIZE")
