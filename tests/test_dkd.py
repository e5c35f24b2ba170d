"""DKD: the TCKD/NCKD decomposition of KD, a hand-computed example, the warm-up, gradients, and LS invariance."""

from __future__ import annotations

import math

import pytest
import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.dkd import dkd_loss, dkd_terms, dkd_warmup
from mdistiller.distillers.kd import kd_loss
from mdistiller.engine.cfg import default_cfg
from mdistiller.models import cifar_model_dict

from stand_ins import SlotLogits

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**dkd):
    cfg = default_cfg()
    for key, value in dkd.items():
        cfg.DKD[key] = value
    return cfg


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_tckd_plus_target_weighted_nckd_is_kd_per_sample(temperature: float) -> None:
    # DKD paper, eq. (7): KD = TCKD + (1 - p_t[target]) * NCKD, per sample
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=gen) * 3
    teacher = torch.randn(6, 10, generator=gen) * 3
    target = torch.randint(0, 10, (6,), generator=gen)
    p_target = torch.softmax(teacher / temperature, dim=1).gather(1, target[:, None]).squeeze(1)
    for i in range(6):
        one = slice(i, i + 1)
        dkd = dkd_loss(student[one], teacher[one], target[one], 1.0, float(1 - p_target[i]), temperature)
        kd = kd_loss(student[one], teacher[one], temperature)
        assert dkd.item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)


def test_dkd_hand_computation_2x3() -> None:
    p_s = [[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]
    p_t = [[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]
    target = torch.tensor([0, 2])
    # row 1 (target 0): binary s (0.5, 0.5), t (0.25, 0.75); non-target s (1/2, 1/2), t (2/3, 1/3)
    tckd1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    nckd1 = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    # row 2 (target 2): binary s (0.5, 0.5), t (0.8, 0.2); non-target s (0.4, 0.6), t (0.5, 0.5)
    tckd2 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    nckd2 = 0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6)
    alpha, beta = 1.0, 8.0
    expected = ((alpha * tckd1 + beta * nckd1) + (alpha * tckd2 + beta * nckd2)) / 2
    z_s, z_t = torch.tensor(p_s).log(), torch.tensor(p_t).log()
    assert dkd_loss(z_s, z_t, target, alpha, beta, 1.0).item() == pytest.approx(expected, rel=1e-5)
    tckd, nckd = dkd_terms(z_s, z_t, target, 1.0)
    assert tckd.tolist() == pytest.approx([tckd1, tckd2], rel=1e-5)
    assert nckd.tolist() == pytest.approx([nckd1, nckd2], rel=1e-5)
    # same distributions at T = 2 (logits doubled): the T^2 factor multiplies by 4
    assert dkd_loss(2 * z_s, 2 * z_t, target, alpha, beta, 2.0).item() == pytest.approx(4 * expected, rel=1e-5)


def test_warmup_factor_over_epochs() -> None:
    assert [dkd_warmup(e, 20) for e in (1, 5, 10, 19, 20, 21, 240)] == pytest.approx(
        [0.05, 0.25, 0.5, 0.95, 1.0, 1.0, 1.0]
    )
    distiller = get_distiller_class("DKD")(SlotLogits(0), SlotLogits(1), _cfg(WARMUP=20))
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(4, 2, 10, generator=gen)
    target = torch.tensor([0, 3, 5, 9])
    full = dkd_loss(batch[:, 0], batch[:, 1], target, 1.0, 8.0, 4.0)
    for epoch, factor in ((1, 0.05), (10, 0.5), (20, 1.0), (100, 1.0)):
        _, losses = distiller.forward_train(image=batch, target=target, epoch=epoch)
        assert losses["loss_kd"].item() == pytest.approx(factor * full.item(), rel=1e-5)
        assert set(losses) == {"loss_ce", "loss_kd"}


def test_gradients_reach_the_student_only() -> None:
    torch.manual_seed(0)
    student = cifar_model_dict["resnet8"][0](num_classes=100)
    teacher = cifar_model_dict["resnet8"][0](num_classes=100)
    distiller = get_distiller_class("DKD")(student, teacher, _cfg())
    distiller.train()
    _, losses = distiller(image=torch.randn(2, 3, 32, 32), target=torch.tensor([1, 2]), epoch=30)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.requires_grad is False for p in teacher.parameters())
    assert {id(p) for p in distiller.get_learnable_parameters()} == {id(p) for p in student.parameters()}


def _affine(z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    a = torch.rand(z.shape[0], 1, generator=gen) * 3 + 0.3
    b = torch.randn(z.shape[0], 1, generator=gen) * 5
    return a * z + b


def test_logit_stand_makes_dkd_invariant_to_per_sample_affine_maps() -> None:
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(8, 20, generator=gen) * 2
    z_t = torch.randn(8, 20, generator=gen) * 4
    target = torch.randint(0, 20, (8,), generator=gen)

    def loss_kd(logit_stand: bool, s: torch.Tensor, t: torch.Tensor) -> float:
        cfg = _cfg(T=2.0, ALPHA=9.0, BETA=18.0)
        cfg.EXPERIMENT.LOGIT_STAND = logit_stand
        distiller = get_distiller_class("DKD")(SlotLogits(0), SlotLogits(1), cfg)
        return distiller.forward_train(image=torch.stack([s, t], 1), target=target, epoch=40)[1]["loss_kd"].item()

    base = loss_kd(True, z_s, z_t)
    for s, t in ((_affine(z_s, gen), z_t), (z_s, _affine(z_t, gen)), (_affine(z_s, gen), _affine(z_t, gen))):
        assert loss_kd(True, s, t) == pytest.approx(base, rel=1e-5, abs=1e-5)
        assert abs(loss_kd(False, s, t) - loss_kd(False, z_s, z_t)) > 1e-3
