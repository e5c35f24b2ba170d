"""MLKD: temperatures, confidence masks, correlation terms, the reference's quirks, the two-view data path, LS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mdistiller.dataset import TRAIN_VIEWS, get_dataset
from mdistiller.dataset.augment import CUTOUT_FILL, FIXMATCH_OPS, FixMatchRandAugment
from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.mlkd import (
    MLKD,
    batch_correlation_loss,
    class_correlation_loss,
    confidence_masks,
    mlkd_losses,
    mlkd_temperatures,
)
from mdistiller.engine.cfg import default_cfg
from mdistiller.models import cifar_model_dict

from stand_ins import SlotLogits

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(seed: int, b: int = 16, c: int = 20, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_temperature_set() -> None:
    assert mlkd_temperatures(4.0) == (4.0, 3.0, 5.0, 2.0, 6.0)
    assert mlkd_temperatures(2) == (2.0, 3.0, 5.0, 2.0, 6.0)


def test_confidence_masks_keep_about_half() -> None:
    teacher = _logits(0, b=64, c=100)
    sample_mask, class_mask = confidence_masks(teacher)
    assert sample_mask.shape == (64,) and class_mask.shape == (100,)
    assert sample_mask.dtype == torch.bool
    assert abs(sample_mask.float().mean().item() - 0.5) <= 1 / 64
    assert abs(class_mask.float().mean().item() - 0.5) <= 1 / 100
    # the kept samples are the least confident ones (teacher max softmax at T = 1)
    confidence = torch.softmax(teacher, 1).max(1).values
    assert confidence[sample_mask].max() <= confidence[~sample_mask].min()
    # the threshold is numpy's 50th percentile, as the reference computes it
    assert int(sample_mask.sum()) == int((confidence.numpy() <= np.percentile(confidence.numpy(), 50)).sum())


def test_correlation_terms_vanish_when_student_matches_teacher() -> None:
    z = _logits(1)
    for t in (1.0, 4.0):
        assert batch_correlation_loss(z, z, t).item() == pytest.approx(0.0, abs=1e-12)
        assert class_correlation_loss(z, z, t).item() == pytest.approx(0.0, abs=1e-12)
    losses = mlkd_losses(z, z, z + 0.0, z + 0.0, 4.0, 0.9)
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in losses.values())
    assert batch_correlation_loss(_logits(2), z, 4.0).item() > 0
    assert class_correlation_loss(_logits(2), z, 4.0).item() > 0


def test_correlation_terms_match_their_definitions() -> None:
    z_s, z_t, t = _logits(3), _logits(4), 3.0
    p_s, p_t = torch.softmax(z_s / t, 1), torch.softmax(z_t / t, 1)
    bc = ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / z_s.shape[0]
    cc = ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / z_s.shape[1]
    assert batch_correlation_loss(z_s, z_t, t).item() == pytest.approx(bc.item(), rel=1e-5)
    assert class_correlation_loss(z_s, z_t, t).item() == pytest.approx(cc.item(), rel=1e-5)


def test_reference_quirks_by_default() -> None:
    s_w, t_w, s_s, t_s = _logits(5), _logits(6), _logits(7), _logits(8)
    w = 0.9
    losses = mlkd_losses(s_w, t_w, s_s, t_s, 4.0, w)
    kept = 0.5  # 16 samples and 20 classes with distinct confidences: exactly half kept
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    weak = sum(w * kept * kd_loss(s_w, t_w, t) for t in temps)
    strong = sum(w * kd_loss(s_s, t_s, t) for t in (4.0, 3.0, 5.0)) + sum(w * kd_loss(s_w, t_w, t) for t in (2.0, 6.0))
    assert losses["loss_kd"].item() == pytest.approx((weak + strong).item(), rel=1e-5)
    bc = sum(w * kept * batch_correlation_loss(s_w, t_w, t) for t in temps)
    cc = sum(w * kept * class_correlation_loss(s_w, t_w, t) for t in temps)
    assert losses["loss_bc"].item() == pytest.approx(bc.item(), rel=1e-5)
    assert losses["loss_cc"].item() == pytest.approx(cc.item(), rel=1e-5)
    # the strong view's correlation terms do not reach the losses
    assert mlkd_losses(s_w, t_w, s_s * 3, t_s, 4.0, w)["loss_bc"].item() == pytest.approx(bc.item(), rel=1e-6)
    # the quirk is tied to the positions of 2 and 6 in the set, not to the value of T
    at_t2 = mlkd_losses(s_w, t_w, s_s, t_s, 2.0, w)["loss_kd"]
    strong_t2 = sum(w * kd_loss(s_s, t_s, t) for t in (2.0, 3.0, 5.0))
    strong_t2 = strong_t2 + sum(w * kd_loss(s_w, t_w, t) for t in (2.0, 6.0))
    weak_t2 = sum(w * kept * kd_loss(s_w, t_w, t) for t in (2.0, 3.0, 5.0, 2.0, 6.0))
    assert at_t2.item() == pytest.approx((weak_t2 + strong_t2).item(), rel=1e-5)


def test_per_sample_mask_switch_gives_finite_different_losses() -> None:
    s_w, t_w, s_s, t_s = _logits(9), _logits(10), _logits(11), _logits(12)
    reference = mlkd_losses(s_w, t_w, s_s, t_s, 4.0, 0.9, per_sample_mask=False)
    paper = mlkd_losses(s_w, t_w, s_s, t_s, 4.0, 0.9, per_sample_mask=True)
    for name in ("loss_kd", "loss_cc", "loss_bc"):
        assert torch.isfinite(reference[name]) and torch.isfinite(paper[name])
        assert abs(reference[name].item() - paper[name].item()) > 1e-6, name


def _mlkd_cfg(**overrides):
    cfg = default_cfg()
    for key, value in overrides.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    return cfg


@pytest.mark.parametrize("per_sample", [False, True])
def test_distiller_four_forwards_and_gradients(per_sample: bool) -> None:
    torch.manual_seed(0)
    student = cifar_model_dict["resnet8"][0](num_classes=100)
    teacher = cifar_model_dict["resnet8"][0](num_classes=100)
    distiller = MLKD(student, teacher, _mlkd_cfg(MLKD__PER_SAMPLE_MASK=per_sample))
    distiller.train()
    weak, strong = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    logits, losses = distiller(image_weak=weak, image_strong=strong, target=torch.tensor([0, 1, 2, 3]), epoch=1)
    assert logits.shape == (4, 100)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_cc", "loss_bc"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    with pytest.raises(Exception, match="image_weak"):
        distiller.forward_train(image=weak, target=torch.tensor([0, 1, 2, 3]), epoch=1)


def test_kd_ours_is_an_alias_of_mlkd(capsys) -> None:
    assert get_distiller_class("KD_ours") is MLKD
    assert "warning: DISTILLER.TYPE KD_ours is read as MLKD" in capsys.readouterr().err
    assert MLKD.declares.train_views == {"image_weak": "standard", "image_strong": "strong"}
    assert MLKD.declares.logit_stand is not None


def test_two_view_batches_from_the_data_path(cifar100_root: str) -> None:
    cfg = default_cfg()
    cfg.DATASET.ROOT = cifar100_root
    cfg.DATASET.NUM_WORKERS = 0
    cfg.SOLVER.BATCH_SIZE = 8
    torch.manual_seed(0)
    train_loader, val_loader, num_train, num_classes = get_dataset(cfg, MLKD.declares.train_views, seed=0)
    batch = next(iter(train_loader))
    assert {"image_weak", "image_strong", "target", "index"} <= set(batch)
    assert "image" not in batch
    assert batch["image_weak"].shape == batch["image_strong"].shape == (8, 3, 32, 32)
    assert batch["target"].shape == (8,)
    assert not torch.equal(batch["image_weak"], batch["image_strong"])
    assert set(next(iter(val_loader))) >= {"image", "target"}
    assert (num_train, num_classes) == (256, 100)


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def test_strong_view_is_seeded_by_torch_and_differs_from_weak() -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    strong, weak = TRAIN_VIEWS["strong"](mean, std), TRAIN_VIEWS["standard"](mean, std)
    img = _image()
    torch.manual_seed(3)
    first = torch.stack([strong(img) for _ in range(8)])
    torch.manual_seed(3)
    second = torch.stack([strong(img) for _ in range(8)])
    torch.manual_seed(3)
    weak_views = torch.stack([weak(img) for _ in range(8)])
    assert first.shape == (8, 3, 32, 32)
    assert torch.equal(first, second)
    assert not torch.equal(first, weak_views)


def test_fixmatch_ops_and_grey_cutout() -> None:
    assert len(FIXMATCH_OPS) == 14
    img = _image(1)
    torch.manual_seed(0)
    for op in FIXMATCH_OPS:
        for level in (1, 9):
            out = op(img, level)
            assert out.size == (32, 32) and out.mode == "RGB"
    black = Image.new("RGB", (32, 32))
    torch.manual_seed(0)
    for _ in range(20):
        out = np.asarray(FixMatchRandAugment(n=0, m=10)(black))  # no ops: Cutout only
        grey = (out == np.array(CUTOUT_FILL)).all(-1)
        assert 0 < grey.sum() <= 17 * 17  # half the side, clipped at the border (PIL's box includes its end)
        assert grey.sum() + (out == 0).all(-1).sum() == 32 * 32


def test_logit_stand_applies_to_the_instance_terms_only() -> None:
    gen = torch.Generator().manual_seed(4)
    s_w, t_w, s_s, t_s = (torch.randn(16, 20, generator=gen) * 3 for _ in range(4))

    def affine(z: torch.Tensor) -> torch.Tensor:
        return (torch.rand(z.shape[0], 1, generator=gen) * 3 + 0.3) * z + torch.randn(z.shape[0], 1, generator=gen) * 5

    def losses(logit_stand: bool, weak, strong) -> dict:
        cfg = _mlkd_cfg(KD__TEMPERATURE=2.0)
        cfg.KD.LOSS.KD_WEIGHT = 9.0
        cfg.EXPERIMENT.LOGIT_STAND = logit_stand
        distiller = MLKD(SlotLogits(0), SlotLogits(1), cfg)
        target = torch.arange(16) % 20
        return distiller.forward_train(
            image_weak=torch.stack(weak, 1), image_strong=torch.stack(strong, 1), target=target, epoch=1
        )[1]

    base_ls, base_raw = losses(True, (s_w, t_w), (s_s, t_s)), losses(False, (s_w, t_w), (s_s, t_s))
    variants = (
        ((affine(s_w), t_w), (affine(s_s), t_s)),
        ((s_w, affine(t_w)), (s_s, affine(t_s))),
        ((affine(s_w), affine(t_w)), (affine(s_s), affine(t_s))),
    )
    for weak, strong in variants:
        with_ls = losses(True, weak, strong)
        assert with_ls["loss_kd"].item() == pytest.approx(base_ls["loss_kd"].item(), rel=1e-5, abs=1e-5)
        assert abs(losses(False, weak, strong)["loss_kd"].item() - base_raw["loss_kd"].item()) > 1e-3
    # the correlation terms compare raw softmaxes, LS or not
    assert base_ls["loss_bc"].item() == pytest.approx(base_raw["loss_bc"].item(), rel=1e-6)
    assert base_ls["loss_cc"].item() == pytest.approx(base_raw["loss_cc"].item(), rel=1e-6)
