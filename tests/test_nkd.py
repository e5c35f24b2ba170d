"""NKD loss: a hand computation, the target term with a one-hot teacher, the label column's removal, the
cross-entropy (not KL) non-target term, soft labels, gradients (none to the teacher through p_t[y]), fp32 under
bf16, and bad inputs; the distiller on soft labels and its refusal of SDD's NKD configs (DKD.* keys)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.nkd import NKD, nkd_loss, nkd_terms
from mdistiller.engine.cfg import default_cfg
from mdistiller.engine.validate import check_recipe
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _hand_nkd(z_s, z_t, labels, temperature, gamma) -> tuple[float, float]:
    target_term, non_target = 0.0, 0.0
    for s, t, y in zip(z_s, z_t, labels):
        target_term += -_softmax(t)[y] * math.log(_softmax(s)[y])
        s_other = [v / temperature for c, v in enumerate(s) if c != y]
        t_other = [v / temperature for c, v in enumerate(t) if c != y]
        q, p = _softmax(t_other), _softmax(s_other)
        non_target += -gamma * temperature**2 * sum(qc * math.log(pc) for qc, pc in zip(q, p))
    return target_term / len(labels), non_target / len(labels)


Z_S = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [2.5, 0.1, 0.1, -0.7]]
Z_T = [[2.0, 0.0, 1.0, 0.3], [1.0, 1.5, 1.0, -2.0], [0.4, 3.0, -1.0, 0.0]]
LABELS = [0, 2, 3]


@pytest.mark.parametrize("temperature, gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_matches_hand_computation(temperature: float, gamma: float) -> None:
    expected_t, expected_n = _hand_nkd(Z_S, Z_T, LABELS, temperature, gamma)
    args = (torch.tensor(Z_S), torch.tensor(Z_T), torch.tensor(LABELS), temperature, gamma)
    target_term, non_target_term = nkd_terms(*args)
    assert target_term.item() == pytest.approx(expected_t, rel=1e-5)
    assert non_target_term.item() == pytest.approx(expected_n, rel=1e-5)
    loss = nkd_loss(*args)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected_t + expected_n, rel=1e-5)


def test_target_term_with_a_one_hot_teacher() -> None:
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(5, 6, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([0, 5, 2, 2, 3])
    on_label = torch.zeros(5, 6, dtype=torch.float64).scatter_(1, labels[:, None], 200.0)
    # p_t[y] = 1: the target term is the student's cross-entropy
    cross_entropy = -sum(math.log(torch.softmax(z_s[b], 0)[labels[b]].item()) for b in range(5)) / 5
    assert nkd_terms(z_s, on_label, labels, 1.0, 1.5)[0].item() == pytest.approx(cross_entropy, rel=1e-10)
    # the teacher sure of another class: p_t[y] = 0, no target term
    elsewhere = torch.zeros(5, 6, dtype=torch.float64).scatter_(1, ((labels + 1) % 6)[:, None], 200.0)
    assert nkd_terms(z_s, elsewhere, labels, 1.0, 1.5)[0].item() == pytest.approx(0.0, abs=1e-60)


def test_non_target_term_ignores_the_label_column() -> None:
    gen = torch.Generator().manual_seed(1)
    z_s = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    z_t = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, 6, 0, 3])
    base = nkd_terms(z_s, z_t, labels, 2.0, 1.5)[1].item()
    bump = torch.zeros(4, 7, dtype=torch.float64).scatter_(1, labels[:, None], 9.0)
    assert nkd_terms(z_s + bump, z_t - bump, labels, 2.0, 1.5)[1].item() == pytest.approx(base, rel=1e-12)
    # a non-label column does matter
    other = torch.zeros(4, 7, dtype=torch.float64).scatter_(1, ((labels + 1) % 7)[:, None], 9.0)
    assert abs(nkd_terms(z_s + other, z_t, labels, 2.0, 1.5)[1].item() - base) > 1e-3


@pytest.mark.parametrize("temperature, gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_non_target_term_is_a_cross_entropy_not_a_kl(temperature: float, gamma: float) -> None:
    # student == teacher with a flat non-target teacher: the term is gamma T^2 log(C - 1) (the entropy), not 0
    z = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, 3.0, -2.0, -2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    expected = gamma * temperature**2 * math.log(4)
    assert nkd_terms(z, z, labels, temperature, gamma)[1].item() == pytest.approx(expected, rel=1e-12)


def test_soft_labels_use_their_argmax() -> None:
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(4, 5, generator=gen)
    z_t = torch.randn(4, 5, generator=gen)
    labels = torch.tensor([3, 0, 4, 1])
    # mixup-like soft vectors whose largest entry is the label (and a tie resolved to the first class)
    soft = 0.3 * torch.nn.functional.one_hot((labels + 2) % 5, 5).float()
    soft = soft + 0.7 * torch.nn.functional.one_hot(labels, 5).float()
    expected = nkd_loss(z_s, z_t, labels, 2.0, 1.5).item()
    assert nkd_loss(z_s, z_t, soft, 2.0, 1.5).item() == pytest.approx(expected, rel=1e-6)
    tie = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    assert nkd_loss(z_s, z_t, tie, 2.0, 1.5).item() == pytest.approx(
        nkd_loss(z_s, z_t, torch.ones(4, dtype=torch.long), 2.0, 1.5).item(), rel=1e-6
    )


def test_gradcheck_float64_student() -> None:
    # student only: the detached p_t[y] makes the teacher's analytic gradient differ from finite differences
    gen = torch.Generator().manual_seed(3)
    z_s = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda s: nkd_loss(s, z_t, labels, 3.0, 3.5), (z_s,))


def test_teacher_target_probability_is_detached() -> None:
    gen = torch.Generator().manual_seed(4)
    z_s = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 4])
    target_term, non_target_term = nkd_terms(z_s, z_t, labels, 2.0, 1.5)
    grad_t, grad_s = torch.autograd.grad(target_term, (z_t, z_s), allow_unused=True)
    assert grad_t is None  # no path from the target term to the teacher
    # the student's target-term gradient is p_t[y] (p_s - onehot(y)) / B, p_t[y] a constant
    p_t_y = torch.softmax(z_t.detach(), 1).gather(1, labels[:, None])
    onehot = torch.nn.functional.one_hot(labels, 5).double()
    torch.testing.assert_close(grad_s, p_t_y * (torch.softmax(z_s.detach(), 1) - onehot) / 3)
    # the teacher is reached through the non-target term only, and never through its label column
    (grad_teacher,) = torch.autograd.grad(target_term + non_target_term, z_t)
    assert grad_teacher.gather(1, labels[:, None]).abs().max().item() == 0.0
    assert grad_teacher.abs().sum().item() > 0


def test_bf16_inputs_give_an_fp32_loss_inside_and_outside_autocast() -> None:
    gen = torch.Generator().manual_seed(5)
    z_s = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    z_t = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    labels = torch.randint(0, 10, (6,), generator=gen)
    reference = nkd_loss(z_s.float(), z_t.float(), labels, 1.0, 1.5)
    plain = nkd_loss(z_s, z_t, labels, 1.0, 1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = nkd_loss(z_s, z_t, labels, 1.0, 1.5)
    for loss in (plain, autocast):
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "target, temperature, message",
    [
        (torch.zeros(4), 1.0, "target must be"),  # float (B,) labels
        (torch.zeros(3, dtype=torch.long), 1.0, "target must be"),
        (torch.zeros(4, 6), 1.0, "target must be"),
        (torch.zeros(4, dtype=torch.long), 0.0, "temperature must be"),
    ],
)
def test_bad_inputs_give_one_line_errors(target, temperature, message) -> None:
    with pytest.raises(MdistillerError, match=message) as info:
        nkd_loss(torch.zeros(4, 5), torch.zeros(4, 5), target, temperature, 1.5)
    assert "\n" not in str(info.value) and str(info.value).startswith("NKD:")


# ---- the distiller ----
def _nkd_cfg(**dkd):
    cfg = default_cfg()
    cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT = "NKD", "resnet8", "resnet8"
    for key, value in dkd.items():
        cfg.DKD[key] = value
    return cfg


def test_dkd_keys_at_their_defaults_are_ours() -> None:
    cfg = _nkd_cfg(CE_WEIGHT=1.0, ALPHA=1.0, BETA=8.0, T=4.0, WARMUP=20)  # written out, but the defaults
    assert NKD.hparams(cfg) == {"ce_weight": 1.0, "temperature": 1.0, "gamma": 1.5}


@pytest.mark.parametrize("dkd, named", [
    ({"BETA": 1.5}, "DKD.BETA 1.5"),
    ({"T": 1.0, "WARMUP": 5}, "DKD.T 1.0, DKD.WARMUP 5"),
    ({"CE_WEIGHT": 0.5}, "DKD.CE_WEIGHT 0.5"),
])
def test_a_config_with_dkd_keys_is_sdds_nkd_and_refused_in_one_line(dkd, named) -> None:
    with pytest.raises(MdistillerError) as info:
        check_recipe(_nkd_cfg(**dkd))
    message = str(info.value)
    assert f"DISTILLER.TYPE NKD with {named} is SDD's NKD" in message and "\n" not in message
    assert "use DISTILLER.TYPE SDD_NKD with SDD.M [1], DKD.T 1.0, DKD.BETA 1.5" in message


def test_the_distiller_trains_on_soft_labels() -> None:
    torch.manual_seed(0)
    student, teacher = cifar_model_dict["resnet8"][0](num_classes=5), cifar_model_dict["resnet8"][0](num_classes=5)
    distiller = get_distiller_class("NKD")(student, teacher, ce_weight=1.0, temperature=2.0, gamma=1.5).train()
    image = torch.randn(4, 3, 32, 32)
    soft = torch.tensor([[0.7, 0.3, 0, 0, 0], [0, 0.2, 0.8, 0, 0], [0.1, 0, 0, 0.9, 0], [0, 0, 0.4, 0, 0.6]])
    with torch.no_grad():
        z_t = teacher.eval()(image)[0]
    z_s, losses = distiller(image=image, target=soft, teacher_logits=z_t, epoch=1)
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(z_s, soft), rtol=0, atol=0)  # CE with probabilities
    hard = torch.tensor([0, 2, 3, 4])
    torch.testing.assert_close(losses["loss_kd"], nkd_loss(z_s, z_t, hard, 2.0, 1.5), rtol=0, atol=0)
    cfg = _nkd_cfg()
    cfg.DATASET.MIXUP.MIXUP_ALPHA = 0.8
    check_recipe(cfg)  # DATASET.MIXUP is accepted for NKD
    cfg.DISTILLER.TYPE = "RLD"
    with pytest.raises(MdistillerError, match="soft labels, which RLD cannot train on"):
        check_recipe(cfg)  # RLD's masks index the label
