"""The DeiT-recipe pieces of the trainer: the per-step cosine LR schedule and DATASET.MIXUP (timm's Mixup / CutMix /
label smoothing on training batches, soft labels only for distillers that can train on them)."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from test_speed import batch_of, make_cfg, make_trainer

from mdistiller.dataset.mixing import build_batch_mixer, hard_labels
from mdistiller.engine.cfg import validate_cfg
from mdistiller.engine.optim import learning_rate
from mdistiller.engine.validate import check_recipe
from mdistiller.errors import MdistillerError

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason='timm is the optional [vit] extra: pip install -e ".[vit]"')


def test_cosine_schedule_follows_the_closed_form_with_warmup():
    cfg = make_cfg(LR_SCHEDULE="cosine", LR=5e-4, LR_MIN=5e-6, EPOCHS=300, LR_WARMUP_EPOCHS=5.0)

    def cosine(done: float) -> float:
        return 5e-6 + (5e-4 - 5e-6) * 0.5 * (1 + math.cos(math.pi * done / 300))

    assert learning_rate(cfg, 1, 0.5) == pytest.approx(cosine(0.5) * 0.5 / 5)
    assert learning_rate(cfg, 6, 0.0) == pytest.approx(cosine(5.0))
    assert learning_rate(cfg, 150, 1.0) == pytest.approx((5e-4 + 5e-6) / 2)
    assert learning_rate(cfg, 300, 1.0) == pytest.approx(5e-6)


def test_trainer_sets_the_cosine_lr_before_every_step(tmp_path):
    cfg = make_cfg(LR_SCHEDULE="cosine", LR=0.1, LR_MIN=0.0, EPOCHS=2)
    trainer = make_trainer(tmp_path, cfg, "NONE", loader=[batch_of(4, seed=s) for s in range(4)])
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    trainer.train_epoch(2)
    assert seen == pytest.approx([0.05 * (1 + math.cos(math.pi * (1 + k / 4) / 2)) for k in range(1, 5)])


def test_an_unknown_schedule_is_a_one_line_error():
    with pytest.raises(MdistillerError, match="SOLVER.LR_SCHEDULE 'poly' is not supported; use one of step, cosine"):
        validate_cfg(make_cfg(LR_SCHEDULE="poly"))


def _mix_cfg(mixup: float = 0.8, cutmix: float = 1.0, smoothing: float = 0.1, batch: int = 8):
    cfg = make_cfg(BATCH_SIZE=batch)
    cfg.DATASET.MIXUP.MIXUP_ALPHA, cfg.DATASET.MIXUP.CUTMIX_ALPHA = mixup, cutmix
    cfg.DATASET.MIXUP.LABEL_SMOOTHING = smoothing
    return cfg


def test_mixing_is_off_by_default():
    assert build_batch_mixer(make_cfg(), 10) is None


@needs_timm
def test_mixup_mixes_images_and_gives_soft_labels_that_sum_to_one():
    batch = batch_of(8)
    original = batch["image"].clone()
    mixed = build_batch_mixer(_mix_cfg(), 10)({**batch, "image": batch["image"].clone()})
    assert mixed["target"].shape == (8, 10) and mixed["target"].dtype == torch.float32
    torch.testing.assert_close(mixed["target"].sum(1), torch.ones(8))
    assert not torch.equal(mixed["image"], original)
    # each label keeps mass on the sample's own class beyond the smoothing share (0.1 / 10)
    own = mixed["target"][torch.arange(8), batch["target"]]
    assert (own > 0.01 + 1e-6).all()


@needs_timm
def test_label_smoothing_alone_and_an_odd_last_batch_give_smoothed_one_hot_labels():
    batch = batch_of(7)
    for cfg in (_mix_cfg(0.0, 0.0, 0.1), _mix_cfg(0.8, 1.0, 0.1)):
        out = build_batch_mixer(cfg, 10)({**batch, "image": batch["image"].clone()})
        expected = torch.full((7, 10), 0.01)
        expected[torch.arange(7), batch["target"]] = 0.91
        torch.testing.assert_close(out["target"], expected)
        assert torch.equal(out["image"], batch["image"])  # an odd batch is not mixed
        assert torch.equal(hard_labels(out["target"]), batch["target"])


@needs_timm
def test_mixup_trains_a_soft_label_method_and_refuses_an_index_based_one(tmp_path):
    trainer = make_trainer(tmp_path / "kd", _mix_cfg(), "KD", loader=[batch_of(8)])
    logits, losses = trainer.train_step(batch_of(8), 1)
    assert all(torch.isfinite(term) for term in losses.values())
    metrics = trainer.train_epoch(1)
    assert 0.0 <= metrics["train_acc"] <= 100.0
    cfg = _mix_cfg()
    cfg.DISTILLER.TYPE = "DKD"
    with pytest.raises(MdistillerError, match="DATASET.MIXUP gives soft labels, which DKD cannot train on"):
        check_recipe(cfg)  # the run's validation, before anything is built


def test_mixup_without_timm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.data", None)
    with pytest.raises(MdistillerError, match=r'install it with pip install -e "\.\[vit\]"'):
        build_batch_mixer(_mix_cfg(), 10)


@needs_timm
def test_mixup_needs_an_even_batch():
    with pytest.raises(MdistillerError, match="SOLVER.BATCH_SIZE must be even, got 9"):
        build_batch_mixer(_mix_cfg(batch=9), 10)
