"""OFD: margins against the erfc closed form, the partial L2 region by region, stage weights, the teacher kept in
train mode (its BN running statistics drift, its weights never change), the R50 -> MobileNetV1 pairing, and the
models that cannot serve."""

from __future__ import annotations

import math

import pytest
import torch

from mdistiller.distillers.ofd import ofd_loss, ofd_margins, ofd_partial_l2
from mdistiller.errors import MdistillerError

from classic_pairs import batch, build_classic


def _margin_by_hand(gamma: float, beta: float) -> float:
    s, m = abs(gamma), beta
    below = 0.5 * math.erfc((m / s) / math.sqrt(2.0))  # Phi(-m / s)
    if below > 0.001:
        return m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / below
    return -3 * s


def test_margins_match_the_closed_form_in_both_branches():
    gamma = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.3])
    beta = torch.tensor([0.0, 1.0, -0.2, 4.0, 1.5])  # 4 / 1 and 1.5 / 0.3: Phi(-m/s) < 0.001 -> -3 |gamma|
    margins = ofd_margins(gamma, beta)
    assert margins.shape == (1, 5, 1, 1) and margins.dtype == torch.float32
    expected = [_margin_by_hand(g, b) for g, b in zip(gamma.tolist(), beta.tolist())]
    torch.testing.assert_close(margins.flatten(), torch.tensor(expected))
    assert margins.flatten()[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal mean
    assert margins.flatten()[3].item() == -3.0 and margins.flatten()[4].item() == pytest.approx(-0.9)
    # a zero gamma (upstream divides by zero) takes the limit: beta below 0, else 0
    torch.testing.assert_close(ofd_margins(torch.zeros(3), torch.tensor([-0.5, 0.0, 0.5])).flatten(),
                               torch.tensor([-0.5, 0.0, 0.0]))


def test_partial_l2_region_by_region():
    margin = torch.full((1, 1, 1, 1), -1.0)
    # (source, target): t <= m with s > m; t <= m with s <= m; m < t <= 0 with s > t; m < t <= 0 with s <= t; t > 0
    pairs = [(0.5, -2.0), (-1.5, -2.0), (0.2, -0.5), (-0.8, -0.5), (-1.0, 2.0)]
    source = torch.tensor([[[[s for s, _ in pairs]]]])
    target = torch.tensor([[[[t for _, t in pairs]]]])
    by_hand = [(0.5 + 1.0) ** 2, 0.0, (0.2 + 0.5) ** 2, 0.0, (-1.0 - 2.0) ** 2]
    assert ofd_partial_l2(source, target, margin).item() == pytest.approx(sum(by_hand))
    # batch mean then sum over C, H, W: two samples, the second all zero loss
    two = ofd_partial_l2(torch.cat([source, target]), torch.cat([target, target]), margin)
    assert two.item() == pytest.approx(sum(by_hand) / 2)


def test_zero_loss_where_the_student_matches_or_stays_below_the_margin():
    margin = torch.full((1, 2, 1, 1), -0.5)
    target = torch.tensor([[[[1.0, -2.0]], [[0.3, -0.7]]]])
    assert ofd_partial_l2(target.clone(), target, margin).item() == 0.0
    below = torch.where(target > 0, target, torch.full_like(target, -3.0))  # s <= m wherever t <= m
    assert ofd_partial_l2(below, target, margin).item() == 0.0


def test_stages_are_weighted_from_the_deepest_and_the_teacher_pooled_to_the_student():
    g = torch.Generator().manual_seed(3)
    sources = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    targets = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    margins = [torch.full((1, 3, 1, 1), -0.3), torch.full((1, 3, 1, 1), -0.6)]
    pooled0 = targets[0].view(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    expected = ofd_partial_l2(sources[0], pooled0, margins[0]) / 2 + ofd_partial_l2(sources[1], targets[1], margins[1])
    torch.testing.assert_close(ofd_loss(sources, targets, margins), expected)


def test_connectors_and_margins_of_the_pair(one_thread):
    distiller = build_classic("OFD")
    shapes = [tuple(c[0].weight.shape) for c in distiller.connectors.connectors]
    assert shapes == [(32, 16, 1, 1), (64, 32, 1, 1), (128, 64, 1, 1)]  # resnet8 -> wrn_16_2, no stem
    for margin, bn in zip(distiller.margins(), distiller.teacher.get_bn_before_relu()):
        torch.testing.assert_close(margin, ofd_margins(bn.weight, bn.bias))
    assert not any("margin" in k for k in distiller.state_dict())
    std = [c[0].weight.std().item() for c in distiller.connectors.connectors]
    assert std == pytest.approx([math.sqrt(2 / 32), math.sqrt(2 / 64), math.sqrt(2 / 128)], rel=0.15)


def test_teacher_trains_in_train_mode_its_bn_statistics_drift_its_weights_never_change(one_thread):
    distiller = build_classic("OFD")
    teacher = distiller.teacher
    assert teacher.training  # after train()
    weights = {k: v.clone() for k, v in teacher.named_parameters()}
    stats = teacher.block1.layer[0].bn1.running_mean.clone()
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.1, momentum=0.9)
    for seed in (1, 2):
        _, losses = distiller.forward_train(**batch(seed=seed))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert int(teacher.block1.layer[0].bn1.num_batches_tracked) == 2
    assert not torch.equal(teacher.block1.layer[0].bn1.running_mean, stats)
    assert all(torch.equal(p, weights[k]) and p.grad is None for k, p in teacher.named_parameters())
    distiller.eval()
    assert not teacher.training
    distiller.train()
    assert teacher.training


def test_teacher_eval_switch_freezes_its_statistics(one_thread):
    distiller = build_classic("OFD", opts=["OFD.TEACHER_EVAL", "True"])
    assert not distiller.teacher.training
    stats = distiller.teacher.bn1.running_var.clone()
    distiller.forward_train(**batch())
    assert torch.equal(distiller.teacher.bn1.running_var, stats)
    assert int(distiller.teacher.bn1.num_batches_tracked) == 0


def test_imagenet_r50_to_mobilenetv1_has_upstream_s_three_connectors(one_thread):
    distiller = build_classic("OFD", student="MobileNetV1", teacher="ResNet50", dataset="imagenet", num_classes=10,
                              opts=["DATASET.IMAGE_SIZE", "32"])
    shapes = [tuple(c[0].weight.shape[:2]) for c in distiller.connectors.connectors]
    assert shapes == [(512, 256), (1024, 512), (2048, 1024)]
    bns = distiller.teacher.get_bn_before_relu()[1:]  # layers 2-4: upstream's three BNs
    assert [m.shape[1] for m in distiller.margins()] == [512, 1024, 2048]
    for margin, bn in zip(distiller.margins(), bns):
        torch.testing.assert_close(margin, ofd_margins(bn.weight, bn.bias))
    _, losses = distiller.forward_train(**batch(n=2, classes=10))
    assert torch.isfinite(losses["loss_kd"])


@pytest.mark.parametrize("student, teacher, message", [
    ("resnet8", "ShuffleV1", r"^OFD cannot distil student resnet8 from teacher ShuffleV1: teacher ShuffleV1 has no "
                             r"single BN before its stage ReLUs"),
    ("MobileNetV2", "resnet20", r"^OFD cannot distil student MobileNetV2 from teacher resnet20: student MobileNetV2 "
                                r"has no pre-activation features"),
])
def test_models_that_cannot_serve_are_refused_in_one_line(student, teacher, message, one_thread):
    with pytest.raises(MdistillerError, match=message) as err:
        build_classic("OFD", student=student, teacher=teacher)
    assert "\n" not in str(err.value)


def test_even_connector_kernels_are_refused():
    with pytest.raises(MdistillerError, match="OFD.CONNECTOR.KERNEL_SIZE must be an odd positive size"):
        build_classic("OFD", opts=["OFD.CONNECTOR.KERNEL_SIZE", "2"])
