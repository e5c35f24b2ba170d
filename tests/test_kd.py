"""KD loss and logit standardisation against hand computations and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.logit_stand import standardize_logits
from mdistiller.engine.cfg import default_cfg


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    z_s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    z_t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    temperature = 2.0
    expected = 0.0
    for s, t in zip(z_s, z_t):
        p_s = _softmax([v / temperature for v in s])
        p_t = _softmax([v / temperature for v in t])
        expected += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = expected / 2 * temperature**2
    got = kd_loss(torch.tensor(z_s), torch.tensor(z_t), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_gradient_is_closed_form():
    """d/dz_s of T^2 KL(p_t || p_s) averaged over B is T (p_s - p_t) / B."""
    torch.manual_seed(0)
    z_s = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 7, dtype=torch.float64)
    temperature = 3.0
    kd_loss(z_s, z_t, temperature).backward()
    expected = temperature * (torch.softmax(z_s / temperature, 1) - torch.softmax(z_t / temperature, 1)) / 4
    torch.testing.assert_close(z_s.grad, expected.to(z_s.grad.dtype), rtol=1e-5, atol=1e-6)


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(5, 10)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z, torch.randn(5, 10), 4.0).item() > 0


def test_standardize_uses_unbiased_std():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean = 3.0
    std = math.sqrt(sum((v - mean) ** 2 for v in [1, 2, 3, 6]) / 3)  # divides by C - 1
    expected = torch.tensor([[(v - mean) / (std + 1e-7) for v in [1.0, 2.0, 3.0, 6.0]]])
    torch.testing.assert_close(standardize_logits(z), expected)
    out = standardize_logits(torch.randn(8, 100) * 5 + 3)
    torch.testing.assert_close(out.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1), torch.ones(8), atol=1e-5, rtol=0)


def _kd_distiller(logit_stand: bool):
    cfg = default_cfg()
    cfg.EXPERIMENT.LOGIT_STAND = logit_stand
    cfg.KD.TEMPERATURE = 2.0

    class Fixed(torch.nn.Module):
        """A 'model' that returns given logits, so the distiller's loss can be probed directly."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.logits = None

        def forward(self, image):
            return self.logits + 0 * self.weight, {}

    return get_distiller_class("KD")(Fixed(), Fixed(), cfg)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_logit_stand_makes_kd_invariant_to_per_sample_affine_maps(which):
    torch.manual_seed(1)
    z_s, z_t = torch.randn(6, 10), torch.randn(6, 10)
    scale = torch.rand(6, 1) * 4 + 0.5
    shift = torch.randn(6, 1) * 10
    target = torch.randint(0, 10, (6,))

    def kd_term(distiller, s, t):
        distiller.student.logits, distiller.teacher.logits = s, t
        return distiller.forward_train(image=torch.zeros(6, 3, 32, 32), target=target)[1]["loss_kd"]

    for logit_stand, invariant in ((True, True), (False, False)):
        distiller = _kd_distiller(logit_stand)
        base = kd_term(distiller, z_s, z_t)
        moved = kd_term(distiller, z_s * scale + shift, z_t) if which == "student" else kd_term(
            distiller, z_s, z_t * scale + shift)
        assert torch.isclose(base, moved, atol=1e-5).item() is invariant


def test_kd_distiller_total_is_weighted_sum():
    distiller = _kd_distiller(False)
    torch.manual_seed(2)
    z_s, z_t = torch.randn(3, 5), torch.randn(3, 5)
    target = torch.tensor([0, 4, 2])
    distiller.student.logits, distiller.teacher.logits = z_s, z_t
    _, losses = distiller.forward_train(image=torch.zeros(3, 3, 32, 32), target=target)
    ce = torch.nn.functional.cross_entropy(z_s, target)
    assert losses["loss_ce"].item() == pytest.approx(0.1 * ce.item(), rel=1e-6)
    assert losses["loss_kd"].item() == pytest.approx(0.9 * kd_loss(z_s, z_t, 2.0).item(), rel=1e-6)


def test_teacher_receives_no_gradient_and_stays_in_eval():
    from mdistiller.models import cifar_model_dict

    cfg = default_cfg()
    student, teacher = cifar_model_dict["resnet8"][0](num_classes=10), cifar_model_dict["resnet8"][0](num_classes=10)
    distiller = get_distiller_class("KD")(student, teacher, cfg).train()
    assert not teacher.training
    _, losses = distiller(image=torch.randn(4, 3, 32, 32), target=torch.tensor([0, 1, 2, 3]), epoch=1)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert distiller.get_extra_parameters() == 0
    assert not any(p is q for p in distiller.get_learnable_parameters() for q in teacher.parameters())
