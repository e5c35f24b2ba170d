"""CTKD: temperature range, the cosine lambda schedule, gradient reversal onto theta, the instance variant, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.ctkd import (
    CTKD,
    GlobalTemperature,
    InstanceTemperature,
    ctkd_lambda,
    gradient_reversal,
    temperature_from,
)
from mdistiller.distillers.dkd import dkd_loss
from mdistiller.distillers.kd import kd_loss
from mdistiller.engine.cfg import default_cfg
from mdistiller.models import cifar_model_dict

from stand_ins import SlotLogits

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**ctkd):
    cfg = default_cfg()
    for key, value in ctkd.items():
        cfg.CTKD[key] = value
    return cfg


def _logits(seed: int, b: int = 8, c: int = 10, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_cfg_defaults() -> None:
    cfg = default_cfg()
    assert (cfg.CTKD.BASE, cfg.CTKD.T_START, cfg.CTKD.T_END, cfg.CTKD.COSINE_EPOCHS) == ("KD", 1.0, 20.0, 10)
    assert cfg.CTKD.INSTANCE is False and cfg.MLKD.PER_SAMPLE_MASK is False
    assert isinstance(cfg.CTKD.INIT, float) and isinstance(cfg.CTKD.LAMBDA_MAX, float)


def test_global_temperature_stays_in_range() -> None:
    module = GlobalTemperature(t_start=1.0, t_end=20.0)
    assert module.theta.item() == 1.0
    assert module(0.0).item() == pytest.approx(1 + 20 * (1 / (1 + math.exp(-1))))
    for theta in (-50.0, -3.0, 0.0, 3.0, 50.0):
        with torch.no_grad():
            module.theta.fill_(theta)
        value = module(-1.0)
        assert value.shape == ()
        assert 1.0 <= value.item() <= 21.0
        assert module.value() == pytest.approx(value.item())


def test_lambda_schedule() -> None:
    assert ctkd_lambda(0, 10) == 0.0
    assert ctkd_lambda(5, 10) == pytest.approx(-0.5)
    assert ctkd_lambda(10, 10) == pytest.approx(-1.0)
    assert ctkd_lambda(240, 10) == pytest.approx(-1.0)
    assert ctkd_lambda(-3, 10) == 0.0
    assert ctkd_lambda(2.5, 5) == pytest.approx(-0.5)  # ImageNet's N = 5
    values = [ctkd_lambda(e, 10) for e in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))  # monotone ramp from 0 to -1


def test_gradient_reversal_layer() -> None:
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    y = gradient_reversal(x, -0.3)
    assert torch.equal(y, x)
    (y * torch.tensor([2.0, 5.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([-0.6, -1.5])


@pytest.mark.parametrize("epoch", [1, 3, 5, 12])
def test_theta_gradient_is_plain_temperature_gradient_times_lambda(epoch: int) -> None:
    z_s, z_t = _logits(0), _logits(1)
    target = torch.arange(8) % 10
    distiller = CTKD(SlotLogits(0), SlotLogits(1), _cfg())
    distiller.train()
    _, losses = distiller(image=torch.stack([z_s, z_t], 1), target=target, epoch=epoch)
    sum(losses.values()).backward()
    theta_grad = distiller.temperature_module.theta.grad.item()

    theta = torch.tensor(1.0, requires_grad=True)
    tau = temperature_from(theta, 1.0, 20.0)
    (0.9 * kd_loss(z_s, z_t, tau)).backward()
    plain = theta.grad.item()
    lam = ctkd_lambda(epoch, 10)
    assert lam < 0 and plain != 0
    assert theta_grad == pytest.approx(lam * plain, rel=1e-5)
    assert math.copysign(1, theta_grad) == -math.copysign(1, plain)  # the temperature ascends the loss
    # the student's gradient is the plain KD one: the reversal touches the temperature only
    student_in = z_s.clone().requires_grad_(True)
    (0.1 * nn.functional.cross_entropy(student_in, target) + 0.9 * kd_loss(student_in, z_t, tau.detach())).backward()
    logits_in = torch.stack([z_s, z_t], 1).requires_grad_(True)
    _, losses = distiller(image=logits_in, target=target, epoch=epoch)
    sum(losses.values()).backward()
    assert torch.allclose(logits_in.grad[:, 0], student_in.grad, rtol=1e-5, atol=1e-7)


def test_theta_is_learnable_and_logged() -> None:
    distiller = CTKD(SlotLogits(0), SlotLogits(1), _cfg())
    params = {id(p) for p in distiller.get_learnable_parameters()}
    assert id(distiller.temperature_module.theta) in params
    assert distiller.get_extra_parameters() == 1
    distiller.train()
    distiller(image=torch.stack([_logits(2), _logits(3)], 1), target=torch.arange(8) % 10, epoch=5)
    metrics = distiller.epoch_metrics()
    assert metrics["ctkd_lambda"] == pytest.approx(-0.5)
    assert metrics["ctkd_temperature"] == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)


def test_instance_temperature_shapes_and_reversal() -> None:
    torch.manual_seed(0)
    module = InstanceTemperature(num_classes=10, hidden=16, t_start=1.0, t_end=20.0)
    z_t = _logits(4)
    z_s = _logits(5).requires_grad_(True)
    temps = module(z_t, z_s, -0.4)
    assert temps.shape == (8,)
    assert bool(((temps >= 1.0) & (temps <= 21.0)).all())
    temps.pow(2).sum().backward()
    reversed_grads = [p.grad.clone() for p in module.parameters()]
    assert z_s.grad is None  # the MLP reads detached logits: no reversed gradient into the student
    module.zero_grad()
    module(z_t, z_s, 1.0).pow(2).sum().backward()  # lambda 1: the plain gradient
    for reversed_grad, p in zip(reversed_grads, module.parameters()):
        scale = p.grad.abs().max().item()
        assert torch.allclose(reversed_grad, -0.4 * p.grad, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("base", ["KD", "DKD"])
def test_instance_variant_in_the_distiller(base: str) -> None:
    torch.manual_seed(0)
    student = cifar_model_dict["resnet8"][0](num_classes=100)
    teacher = cifar_model_dict["resnet8"][0](num_classes=100)
    distiller = CTKD(student, teacher, _cfg(INSTANCE=True, MLP_HIDDEN=32, BASE=base))
    distiller.train()
    logits, losses = distiller(image=torch.randn(4, 3, 32, 32), target=torch.tensor([0, 1, 2, 3]), epoch=4)
    assert logits.shape == (4, 100) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.temperature_module.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    metrics = distiller.epoch_metrics()
    assert 1.0 <= metrics["ctkd_temperature"] <= 21.0
    assert metrics["ctkd_lambda"] == pytest.approx(ctkd_lambda(4, 10))


def test_dkd_base_uses_the_learned_temperature_without_warmup() -> None:
    z_s, z_t = _logits(6), _logits(7)
    target = torch.arange(8) % 10
    cfg = _cfg(BASE="DKD")
    cfg.DKD.BETA = 2.0
    distiller = CTKD(SlotLogits(0), SlotLogits(1), cfg)
    _, losses = distiller.forward_train(image=torch.stack([z_s, z_t], 1), target=target, epoch=1)
    tau = distiller.temperature_module.value()
    assert losses["loss_kd"].item() == pytest.approx(dkd_loss(z_s, z_t, target, 1.0, 2.0, tau).item(), rel=1e-5)
    with pytest.raises(Exception, match="CTKD.BASE"):
        CTKD(SlotLogits(0), SlotLogits(1), _cfg(BASE="RKD"))


def test_registered() -> None:
    assert get_distiller_class("CTKD") is CTKD and CTKD.declares.logit_stand is not None


@pytest.mark.parametrize("base", ["KD", "DKD"])
def test_logit_stand_makes_ctkd_invariant_to_per_sample_affine_maps(base: str) -> None:
    gen = torch.Generator().manual_seed(8)
    z_s, z_t = torch.randn(8, 20, generator=gen) * 2, torch.randn(8, 20, generator=gen) * 4
    target = torch.arange(8) % 20

    def affine(z: torch.Tensor) -> torch.Tensor:
        return (torch.rand(8, 1, generator=gen) * 3 + 0.3) * z + torch.randn(8, 1, generator=gen) * 5

    def loss_kd(logit_stand: bool, s: torch.Tensor, t: torch.Tensor) -> float:
        cfg = _cfg(BASE=base)
        cfg.EXPERIMENT.LOGIT_STAND = logit_stand
        cfg.KD.LOSS.KD_WEIGHT = 9.0
        distiller = CTKD(SlotLogits(0), SlotLogits(1), cfg)
        return distiller.forward_train(image=torch.stack([s, t], 1), target=target, epoch=3)[1]["loss_kd"].item()

    base_value = loss_kd(True, z_s, z_t)
    for s, t in ((affine(z_s), z_t), (z_s, affine(z_t)), (affine(z_s), affine(z_t))):
        assert loss_kd(True, s, t) == pytest.approx(base_value, rel=1e-5, abs=1e-5)
        assert abs(loss_kd(False, s, t) - loss_kd(False, z_s, z_t)) > 1e-3
