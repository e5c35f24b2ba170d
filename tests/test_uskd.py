"""USKD: the losses against a float64 hand computation, the Zipf soft labels and the log-probability rank quirk,
detached soft labels, gradients per input, bf16 inputs, bad inputs; the distiller (its loss is the pure function,
the weak head's input and gradients, its state names, no teacher, the refusals)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdistiller.distillers.uskd import USKD, uskd_loss, uskd_terms, zipf_table
from mdistiller.engine.build import apply_logit_stand_flags
from mdistiller.engine.cfg import load_cfg
from mdistiller.engine.validate import check_recipe
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _hand_uskd(z, w, y, mu, probability_rank=False):
    """USKD written out per sample in float64: (L_target, L_non_target, L_weak)."""
    batch, classes = len(z), len(z[0])
    log_p = [_log_softmax(row) for row in z]
    s_y_sq = [math.exp(log_p[b][y[b]]) ** 2 for b in range(batch)]
    mean_sq = sum(s_y_sq) / batch
    l_target = -sum((s_y_sq[b] + 1 - mean_sq) * log_p[b][y[b]] for b in range(batch)) / batch
    l_weak, l_non = 0.0, 0.0
    for b in range(batch):
        log_q = _log_softmax(w[b])
        for c in range(classes):
            q_target = (0.9 if c == y[b] else 0.0) + 0.1 / classes
            l_weak -= mu * q_target * log_q[c] / batch
        q = [math.exp(v) for v in log_q]
        student = [math.exp(v) for v in log_p[b]] if probability_rank else log_p[b]
        score = [q[c] / (1 - q[y[b]] + 1e-6) + student[c] / (1 - student[y[b]] + 1e-6) for c in range(classes)]
        ranked = sorted(range(classes), key=lambda c: -score[c])
        zipf = {c: 1.0 / (k + 1) for k, c in enumerate(ranked)}
        others = [c for c in range(classes) if c != y[b]]
        total = sum(zipf[c] for c in others)
        log_p_non = _log_softmax([z[b][c] for c in others])
        l_non -= sum(zipf[c] / total * log_p_non[i] for i, c in enumerate(others)) / batch
    return l_target, l_non, l_weak


def _case(seed=0, batch=3, classes=5):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2
    w = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, classes, (batch,), generator=gen)
    return z, w, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_terms_match_a_float64_hand_computation(seed):
    z, w, y = _case(seed)
    expected = _hand_uskd(z.tolist(), w.tolist(), y.tolist(), mu=0.1)
    got = uskd_terms(z.float(), w.float(), y, 0.1)
    assert [t.item() for t in got] == pytest.approx(expected, rel=1e-5)
    total = uskd_loss(z.float(), w.float(), y, 0.7, 0.2, 0.1)
    assert total.item() == pytest.approx(0.7 * expected[0] + 0.2 * expected[1] + expected[2], rel=1e-5)


def test_rank_score_uses_student_log_probabilities():
    # The weak head ranks class 1 first, the student class 2: summed with the student's log-probabilities (the
    # reference) class 1 comes first (0.09 vs 0.03), with its probabilities class 2 would (0.97 vs 0.90).
    z = torch.tensor([[0.0, 0.0, 2.0, -2.0]])
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    y = torch.tensor([0])
    with_log = _hand_uskd(z.tolist(), w.tolist(), y.tolist(), 1.0)[1]
    with_prob = _hand_uskd(z.tolist(), w.tolist(), y.tolist(), 1.0, probability_rank=True)[1]
    assert abs(with_log - with_prob) > 1e-3
    assert uskd_terms(z, w, y, 1.0)[1].item() == pytest.approx(with_log, rel=1e-6)


def test_zipf_weights_by_rank_over_all_classes_label_dropped():
    # Equal weak logits: the order is the student's. The label at rank 2 leaves ranks 0, 1, 3, 4 to the others.
    z = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    w = torch.zeros(1, 5)
    y = torch.tensor([2])
    weights = np.array([1, 1 / 2, 1 / 4, 1 / 5])
    weights /= weights.sum()
    others = np.array([5.0, 4.0, 2.0, 1.0])
    log_p = others - np.log(np.exp(others).sum())
    assert uskd_terms(z, w, y, 0.0)[1].item() == pytest.approx(-(weights * log_p).sum(), rel=1e-6)
    # the label ranked first: the others take ranks 1..4
    y0 = torch.tensor([0])
    weights0 = np.array([1 / 2, 1 / 3, 1 / 4, 1 / 5])
    weights0 /= weights0.sum()
    others0 = np.array([4.0, 3.0, 2.0, 1.0])
    log_p0 = others0 - np.log(np.exp(others0).sum())
    assert uskd_terms(z, w, y0, 0.0)[1].item() == pytest.approx(-(weights0 * log_p0).sum(), rel=1e-6)


def test_zipf_table_and_passing_it_changes_nothing():
    assert zipf_table(4).tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert zipf_table(4).dtype == torch.float32
    z, w, y = _case(3, 4, 6)
    default = uskd_terms(z.float(), w.float(), y, 0.1)
    given = uskd_terms(z.float(), w.float(), y, 0.1, zipf_table(6))
    assert all(torch.equal(a, b) for a, b in zip(default, given))


def test_soft_targets_average_to_one_over_the_batch():
    # sum_b w_y = sum_b s_y^2 + B - B * mean(s_y^2) = B: with equal label log-probabilities L_t = -log p_y exactly.
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1, 2])
    l_target = uskd_terms(z, torch.zeros(3, 3), y, 0.0)[0]
    assert l_target.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)


def test_weak_term_is_linear_in_mu():
    z, w, y = _case(4)
    one = uskd_terms(z.float(), w.float(), y, 1.0)[2]
    assert uskd_terms(z.float(), w.float(), y, 0.005)[2].item() == pytest.approx(0.005 * one.item(), rel=1e-6)


def test_gradients_soft_labels_detached_and_weak_head_only_through_l_weak():
    z, w, y = _case(5, 4, 6)
    z, w = z.float().requires_grad_(), w.float().requires_grad_()
    l_target, l_non, l_weak = uskd_terms(z, w, y, 0.3)
    (g_target,) = torch.autograd.grad(l_target, z, retain_graph=True)
    # with w_y a constant: d/dz of -mean_b w_y log p_y = -(w_y / B) (onehot - p)
    p = torch.softmax(z.detach(), 1)
    s_y_sq = p.gather(1, y[:, None]) ** 2
    soft = s_y_sq + 1 - s_y_sq.mean()
    onehot = torch.nn.functional.one_hot(y, 6).float()
    assert torch.allclose(g_target, -(soft / 4) * (onehot - p), atol=1e-6)
    # the non-target term: soft labels n constant, gradient only on the non-label columns, sums to 0 per row
    (g_non,) = torch.autograd.grad(l_non, z, retain_graph=True)
    assert torch.all(g_non.gather(1, y[:, None]) == 0)
    assert torch.allclose(g_non.sum(1), torch.zeros(4), atol=1e-6)
    assert torch.autograd.grad(l_target + l_non, w, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(l_weak, z, retain_graph=True, allow_unused=True)[0] is None
    (g_weak,) = torch.autograd.grad(l_weak, w)
    target = 0.9 * onehot + 0.1 / 6
    assert torch.allclose(g_weak, 0.3 * (torch.softmax(w.detach(), 1) - target) / 4, atol=1e-6)


def test_bf16_inputs_give_the_fp32_value():
    z, w, y = _case(6, 4, 8)
    z16, w16 = z.bfloat16(), w.bfloat16()
    expected = uskd_loss(z16.float(), w16.float(), y, 1.0, 0.1, 0.005)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = uskd_loss(z16, w16, y, 1.0, 0.1, 0.005)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_bad_inputs_are_refused_in_one_line():
    z = torch.randn(2, 5)
    with pytest.raises(MdistillerError, match="one shape"):
        uskd_loss(z, torch.randn(2, 4), torch.tensor([0, 1]), 1.0, 0.1, 0.1)
    with pytest.raises(MdistillerError, match="hard labels"):
        uskd_loss(z, torch.randn(2, 5), torch.softmax(torch.randn(2, 5), 1), 1.0, 0.1, 0.1)
    with pytest.raises(MdistillerError, match="at least 2 classes"):
        zipf_table(1)


# ---- the distiller ----

def _uskd(student: str = "resnet8x4", **hparams):
    torch.manual_seed(0)
    return USKD(cifar_model_dict[student][0](num_classes=100), None, **hparams)


def _batch(seed: int = 0, batch: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 100, (batch,), generator=gen)


def test_distiller_loss_is_the_pure_function_on_its_own_outputs():
    distiller = _uskd(ce_weight=0.5, alpha=0.1, beta=0.2, mu=0.1).train()
    image, target = _batch()
    logits, losses = distiller.forward_train(image, target, epoch=1)
    assert set(losses) == {"loss_ce", "loss_kd"}
    with torch.no_grad():
        z, feats = distiller.student(image)
        w = distiller.weak_fc(feats["feats"][-2].mean(dim=(2, 3)))
    assert torch.allclose(logits, z)
    assert torch.allclose(losses["loss_kd"], uskd_loss(z, w, target, 0.1, 0.2, 0.1), rtol=1e-6, atol=0)
    assert torch.allclose(losses["loss_ce"], 0.5 * torch.nn.functional.cross_entropy(z, target), rtol=1e-6, atol=0)


def test_weak_head_reads_the_stage_before_the_last():
    assert tuple(_uskd("resnet8x4").weak_fc.weight.shape) == (100, 128)  # layer2 of resnet8x4
    assert tuple(_uskd("wrn_16_2").weak_fc.weight.shape) == (100, 64)
    assert tuple(_uskd("ResNet18").weak_fc.weight.shape) == (100, 256)  # the authors' channel=256 (layer3)


def test_gradients_reach_the_student_and_the_weak_head_only():
    distiller = _uskd().train()
    assert distiller.teacher is None
    image, target = _batch(1)
    _, losses = distiller.forward_train(image, target, epoch=1)
    sum(losses.values()).backward()
    params = dict(distiller.named_parameters())
    assert {n for n in params if not n.startswith("student.")} == {"weak_fc.weight", "weak_fc.bias"}
    missing = [n for n, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert {id(p) for p in distiller.get_learnable_parameters()} == {id(p) for p in params.values()}


def test_state_dict_has_the_weak_head_and_no_zipf_table():
    distiller = _uskd()
    state = distiller.state_dict()
    assert {k for k in state if not k.startswith("student.")} == {"weak_fc.weight", "weak_fc.bias"}
    assert torch.equal(distiller.zipf, zipf_table(100))
    renamed = {k: torch.randn_like(v) if k.startswith("weak_fc.") else v for k, v in state.items()}
    _uskd().load_state_dict(renamed, strict=True)


def test_built_without_a_teacher_whatever_it_is_given():
    cfg = load_cfg(str(REPO / "configs/cifar100/uskd/resnet8x4.yaml"))
    distiller = USKD(cifar_model_dict["resnet8x4"][0](num_classes=100), cifar_model_dict["resnet8"][0](), cfg)
    assert distiller.teacher is None and not USKD.declares.requires_teacher
    assert (distiller.alpha, distiller.beta, distiller.mu, distiller.ce_weight) == (0.1, 0.1, 0.1, 1.0)
    assert USKD.declares.teacher_uses(USKD.hparams(cfg)) == {}


def test_logit_stand_and_mixup_are_refused_in_one_line():
    cfg = load_cfg(str(REPO / "configs/cifar100/uskd/resnet8x4.yaml"))
    with pytest.raises(MdistillerError, match="refused for USKD") as info:
        apply_logit_stand_flags(cfg, 2.0, 9.0)
    assert "\n" not in str(info.value)
    cfg.DATASET.MIXUP.MIXUP_ALPHA = 0.8
    with pytest.raises(MdistillerError, match="DATASET.MIXUP gives soft labels, which USKD cannot train on"):
        check_recipe(cfg)
