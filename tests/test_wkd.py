"""WKD: Sinkhorn against an exact transport LP, WKD-L parts and schedule, WKD-F Gaussian terms, projector, costs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.ot import (
    cosine_decay_weight,
    fc_cost_matrix,
    gaussian_moments,
    gaussian_wasserstein_loss,
    gaussian_wasserstein_terms,
    linear_cka_distance,
    non_target_indices,
    prepare_cost,
    sharpen_cost,
    sinkhorn,
    sinkhorn_cost,
    wkd_logit_loss,
    wkd_nontarget_loss,
    wkd_nontarget_loss_gathered,
    wkd_target_loss,
)
from mdistiller.distillers.wkd import build_projector, final_linear
from mdistiller.engine.build import apply_logit_stand_flags
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

P3 = torch.tensor([[0.5, 0.3, 0.2]])
Q3 = torch.tensor([[0.1, 0.2, 0.7]])
M3 = torch.tensor([[0.0, 0.3, 1.0], [0.3, 0.0, 0.6], [1.0, 0.6, 0.0]])


def exact_transport_cost(p: torch.Tensor, q: torch.Tensor, cost: torch.Tensor) -> float:
    """min <P, M> over 3 x 3 plans with marginals p, q, by enumerating the vertices of the transport polytope.

    The plan is affine in x = (P11, P12, P21, P22); a vertex makes 4 of the 9 entries zero (independent constraints).
    """
    p, q, cost = p.double(), q.double(), cost.double().flatten()
    a = torch.zeros(9, 4, dtype=torch.float64)
    b = torch.zeros(9, dtype=torch.float64)
    a[0, 0] = a[1, 1] = a[3, 2] = a[4, 3] = 1.0
    a[2], b[2] = torch.tensor([-1.0, -1, 0, 0]), p[0]  # P13 = p1 - P11 - P12
    a[5], b[5] = torch.tensor([0.0, 0, -1, -1]), p[1]  # P23
    a[6], b[6] = torch.tensor([-1.0, 0, -1, 0]), q[0]  # P31 = q1 - P11 - P21
    a[7], b[7] = torch.tensor([0.0, -1, 0, -1]), q[1]  # P32
    a[8], b[8] = -(a[6] + a[7]), p[2] - b[6] - b[7]  # P33 = p3 - P31 - P32
    best = math.inf
    for rows in itertools.combinations(range(9), 4):
        sub = a[list(rows)]
        if abs(torch.linalg.det(sub)) < 1e-12:
            continue
        plan = a @ torch.linalg.solve(sub, -b[list(rows)]) + b
        if (plan >= -1e-12).all():
            best = min(best, float(plan @ cost))
    return best


def _random_case(batch: int = 4, n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(batch, n, generator=gen), 1)
    q = torch.softmax(torch.randn(batch, n, generator=gen), 1)
    m = torch.rand(n, n, generator=gen)
    m = (m + m.t()) / 2
    m.fill_diagonal_(0)
    return p, q, m


# ---- Sinkhorn ----

@pytest.mark.parametrize("log_domain", [False, True])
def test_sinkhorn_plan_has_the_given_marginals(log_domain):
    p, q, m = _random_case()
    plan = sinkhorn(p, q, m, lam=0.1, iters=300, log_domain=log_domain)
    assert plan.shape == (4, 6, 6) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(2), p, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), q, atol=1e-4, rtol=0)


def test_exact_lp_enumeration_matches_the_line_metric_closed_form():
    """On cost |i - j| the transport cost is sum_k |F_p(k) - F_q(k)| (CDFs): checks the vertex enumeration."""
    line = torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])
    closed = (P3.double().cumsum(1) - Q3.double().cumsum(1)).abs()[0, :-1].sum().item()
    assert exact_transport_cost(P3[0], Q3[0], line) == pytest.approx(closed, abs=1e-9)
    # by hand: P11 .1, P12 .2, P13 .2, P23 .3, P33 .2 -> 0.2 * 0.3 + 0.2 * 1.0 + 0.3 * 0.6
    assert exact_transport_cost(P3[0], Q3[0], M3) == pytest.approx(0.44, abs=1e-6)


def test_sinkhorn_cost_approaches_the_exact_lp_as_lambda_shrinks():
    exact = exact_transport_cost(P3[0], Q3[0], M3)
    gaps = []
    for lam in (0.2, 0.05, 0.01, 0.002):
        cost = sinkhorn_cost(P3, Q3, M3, lam, iters=4000, log_domain=True).item()
        gaps.append(cost - exact)
        assert -1e-4 <= cost - exact <= 2 * lam * math.log(3) + 1e-4  # entropic bias is at most lam * H(p) + ...
    assert gaps == sorted(gaps, reverse=True) and abs(gaps[-1]) < 1e-3


def test_reference_and_log_domain_agree_where_the_reference_is_finite():
    p, q, m = _random_case(batch=8, n=12, seed=3)
    for lam in (0.5, 0.1, 0.05):
        ref = sinkhorn(p, q, m, lam, iters=10)
        log = sinkhorn(p, q, m, lam, iters=10, log_domain=True)
        assert torch.isfinite(ref).all()
        torch.testing.assert_close(ref, log, atol=5e-5, rtol=1e-3)
    # the exact LP is reached by both at lam = 0.05 on the 3-class case (up to the entropic bias)
    exact = exact_transport_cost(P3[0], Q3[0], M3)
    ref = sinkhorn_cost(P3, Q3, M3, 0.05, iters=2000).item()
    log = sinkhorn_cost(P3, Q3, M3, 0.05, iters=2000, log_domain=True).item()
    assert ref == pytest.approx(log, rel=1e-3) and 0 <= ref - exact < 0.01


def test_reference_underflows_for_small_lambda_where_log_domain_does_not():
    """exp(-M / 0.005) is 0 in fp32 for M >= 0.5: the reference plan cannot move mass, the log-domain one can."""
    exact = exact_transport_cost(P3[0], Q3[0], M3)
    ref = sinkhorn(P3, Q3, M3, 0.005, iters=1000)
    log = sinkhorn(P3, Q3, M3, 0.005, iters=4000, log_domain=True)
    assert not torch.allclose(ref.sum(1), Q3, atol=1e-2)  # reference misses the teacher marginal
    torch.testing.assert_close(log.sum(1), Q3, atol=1e-3, rtol=0)
    assert (log * M3).sum().item() == pytest.approx(exact, abs=2e-3)


def test_identical_inputs_under_a_zero_diagonal_cost_cost_almost_nothing():
    gen = torch.Generator().manual_seed(0)
    cost = prepare_cost(sharpen_cost(fc_cost_matrix(torch.randn(100, 64, generator=gen)), 1.0))
    assert torch.allclose(cost, cost.t()) and cost.diagonal().max().item() == pytest.approx(1e-8)
    logits = torch.randn(8, 100, generator=gen) * 3
    target = torch.randint(0, 100, (8,), generator=gen)
    same = wkd_nontarget_loss(logits, logits.clone(), target, cost, 4.0, 0.05, 10)
    other = wkd_nontarget_loss(logits, torch.randn(8, 100, generator=gen) * 3, target, cost, 4.0, 0.05, 10)
    assert 0 <= same.item() < 1e-3 and other.item() > 100 * same.item()


# ---- WKD-L ----

def test_target_part_is_teacher_weighted_log_likelihood_of_the_label():
    z_s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], requires_grad=True)
    z_t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([0, 2])
    p_s, p_t = torch.softmax(z_s, 1), torch.softmax(z_t, 1)  # T = 1 whatever WKD.TEMPERATURE is
    expected = -(p_t[0, 0] * p_s[0, 0].log() + p_t[1, 2] * p_s[1, 2].log()) / 2
    got = wkd_target_loss(z_s, z_t, target)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    got.backward()
    assert z_t.grad is None or z_t.grad.abs().max() == 0  # the teacher side is detached


def test_non_target_part_drops_the_target_class_from_logits_and_cost():
    gen = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    target = torch.tensor([0, 4, 2])
    cost = prepare_cost(torch.rand(5, 5, generator=gen))
    got = wkd_nontarget_loss(z_s, z_t, target, cost, 2.0, 0.1, 10)
    per_sample = []
    for i, y in enumerate(target.tolist()):
        keep = [c for c in range(5) if c != y]
        p = torch.softmax(z_s[i, keep] / 2.0, 0).unsqueeze(0)
        q = torch.softmax(z_t[i, keep] / 2.0, 0).unsqueeze(0)
        sub = cost[keep][:, keep]
        per_sample.append((sinkhorn(p, q, sub, 0.1, 10) * sub).sum())
    assert got.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)
    target_part, ot_part = wkd_logit_loss(z_s, z_t, target, cost, 2.0, 0.1, 10)
    assert ot_part.item() == pytest.approx(got.item(), rel=1e-6)
    assert target_part.item() == pytest.approx(wkd_target_loss(z_s, z_t, target).item(), rel=1e-6)


def test_shared_kernel_path_equals_the_reference_layout_with_gradients():
    """The C-class iteration with the target zeroed equals the reference's gathered (C-1)-class problems."""
    gen = torch.Generator().manual_seed(2)
    cost = prepare_cost(sharpen_cost(fc_cost_matrix(torch.randn(20, 8, generator=gen)), 1.0))
    z_s = (torch.randn(6, 20, generator=gen) * 3).requires_grad_()
    z_t = torch.randn(6, 20, generator=gen) * 3
    target = torch.tensor([0, 19, 5, 5, 11, 2])
    assert non_target_indices(target, 20)[1].tolist() == list(range(19))
    assert non_target_indices(target, 20)[2].tolist() == [c for c in range(20) if c != 5]
    fast = wkd_nontarget_loss(z_s, z_t, target, cost, 4.0, 0.05, 10)
    (grad_fast,) = torch.autograd.grad(fast, z_s)
    gathered = wkd_nontarget_loss_gathered(z_s, z_t, target, cost, 4.0, 0.05, 10)
    (grad_gathered,) = torch.autograd.grad(gathered, z_s)
    assert fast.item() == pytest.approx(gathered.item(), rel=1e-5)
    torch.testing.assert_close(grad_fast, grad_gathered, atol=1e-8, rtol=1e-4)
    assert grad_fast.gather(1, target.view(-1, 1)).abs().max() == 0  # the target logit gets no OT gradient


def test_cosine_schedule_values():
    w, e0, total = 600.0, 150, 240
    assert cosine_decay_weight(w, 1, e0, total) == w
    assert cosine_decay_weight(w, e0, e0, total) == w  # strictly greater: epoch E0 itself is undecayed
    assert w * 0.999 < cosine_decay_weight(w, e0 + 1, e0, total) < w
    assert cosine_decay_weight(w, (e0 + total) // 2, e0, total) == pytest.approx(w / 2)
    assert cosine_decay_weight(w, total, e0, total) == pytest.approx(0.0, abs=1e-9)
    assert cosine_decay_weight(w, 10, 150, 1) == w  # a run shorter than E0 never decays


def test_sharpen_and_prepare_cost():
    m = torch.tensor([[0.0, 0.5], [-0.2, 2.0]])
    torch.testing.assert_close(sharpen_cost(m, 2.0), 1 - torch.exp(-2.0 * m))
    assert sharpen_cost(m, 0.0) is m
    torch.testing.assert_close(prepare_cost(m), torch.tensor([[1e-8, 0.5 + 1e-8], [1e-8, 2.0 + 1e-8]]))


def test_fc_cost_is_one_minus_cosine_of_classifier_rows():
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    expected = torch.tensor([[0.0, 1.0, 1 - 2**-0.5], [1.0, 0.0, 1 - 2**-0.5], [1 - 2**-0.5, 1 - 2**-0.5, 0.0]])
    torch.testing.assert_close(fc_cost_matrix(w), expected, atol=1e-6, rtol=0)


def _wkd_cfg(**values):
    cfg = default_cfg()
    cfg.SOLVER.EPOCHS = 240
    for key, value in values.items():
        node = cfg
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return cfg


def _models(student="resnet8", teacher="resnet8", classes=10, seed=0):
    torch.manual_seed(seed)
    return cifar_model_dict[student][0](num_classes=classes), cifar_model_dict[teacher][0](num_classes=classes)


def test_wkd_distiller_fc_cost_buffer_and_decayed_weights():
    student, teacher = _models()
    cfg = _wkd_cfg(WKD__LOSS__WKD_LOGIT_WEIGHT=600.0, WKD__COST_MATRIX_SHARPEN=1.0, WKD__TEMPERATURE=8.0)
    distiller = get_distiller_class("WKD")(student, teacher, cfg)
    expected = prepare_cost(sharpen_cost(fc_cost_matrix(final_linear(teacher).weight), 1.0))
    torch.testing.assert_close(distiller.cost_matrix, expected)
    assert "cost_matrix" in dict(distiller.named_buffers()) and not hasattr(distiller, "projector")
    assert distiller.get_extra_parameters() == 0
    image, target = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    _, at_mid = distiller.forward_train(image=image, target=target, epoch=195)
    assert distiller.epoch_metrics() == {"wkd_logit_weight": pytest.approx(300.0)}
    _, undecayed = distiller.forward_train(image=image, target=target, epoch=150)
    assert at_mid["loss_wkd_logit"].item() == pytest.approx(undecayed["loss_wkd_logit"].item() / 2, rel=1e-4)
    assert at_mid["loss_wkd_target"].item() == pytest.approx(undecayed["loss_wkd_target"].item(), rel=1e-6)
    assert set(at_mid) == {"loss_ce", "loss_wkd_target", "loss_wkd_logit"}


def test_missing_cka_file_names_the_tool_command(tmp_path):
    student, teacher = _models()
    path = str(tmp_path / "absent" / "linear_cka.pth")
    cfg = _wkd_cfg(WKD__LOSS__WKD_LOGIT_WEIGHT=1.0, WKD__COST_MATRIX="cka", WKD__COST_MATRIX_PATH=path)
    cfg.DISTILLER.TEACHER = "resnet8"
    with pytest.raises(MdistillerError, match=r"not found: .*python tools/wkd_cost_matrix.py -o .*linear_cka.pth "
                                              r"DATASET.TYPE cifar100 DISTILLER.TEACHER resnet8"):
        get_distiller_class("WKD")(student, teacher, cfg)
    torch.save(torch.zeros(7, 7), tmp_path / "small.pth")
    cfg.WKD.COST_MATRIX_PATH = str(tmp_path / "small.pth")
    with pytest.raises(MdistillerError, match="7 x 7 but the teacher has 10 classes"):
        get_distiller_class("WKD")(student, teacher, cfg)
    cfg.WKD.LOSS.WKD_LOGIT_WEIGHT = 0.0  # WKD-L off: no cost matrix is read at all
    cfg.WKD.COST_MATRIX_PATH = path
    cfg.WKD.LOSS.WKD_FEAT_WEIGHT = 1.0
    get_distiller_class("WKD")(student, teacher, cfg)


def test_wkd_refuses_logit_stand():
    with pytest.raises(MdistillerError, match="--logit-stand"):
        apply_logit_stand_flags(_wkd_cfg(DISTILLER__TYPE="WKD"), 2.0, 9.0)


# ---- WKD-F ----

def test_gaussian_loss_zero_for_identical_features():
    f = torch.randn(3, 5, 8, 8)
    assert gaussian_wasserstein_loss(f, f.clone(), 4.0).item() == 0.0
    assert gaussian_wasserstein_loss(f, f.clone(), 4.0, grid=4).item() == 0.0


def test_identity_projector_and_identical_features_give_zero_feature_loss():
    student, teacher = _models()
    student.load_state_dict(teacher.state_dict())
    cfg = _wkd_cfg(WKD__LOSS__WKD_FEAT_WEIGHT=0.08, WKD__MEAN_COV_RATIO=4.0)
    distiller = get_distiller_class("WKD")(student, teacher, cfg)
    assert isinstance(distiller.projector[0], nn.Conv2d) and distiller.get_extra_parameters() > 0
    distiller.projector = nn.Identity()
    distiller.eval()  # student BN on running statistics, as the teacher's
    _, losses = distiller.forward_train(image=torch.randn(4, 3, 32, 32), target=torch.arange(4), epoch=1)
    assert losses["loss_wkd_feat"].item() == pytest.approx(0.0, abs=1e-10)
    assert set(losses) == {"loss_ce", "loss_wkd_feat"}


def test_mean_and_std_terms_and_their_ratio():
    torch.manual_seed(0)
    base = torch.randn(2, 3, 4, 4)
    shift = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    # a per-channel shift moves only the means: loss = ratio * sum(shift^2) (per sample, so x B / B)
    mean_term, std_term = gaussian_wasserstein_terms(base + shift, base)
    assert mean_term.item() == pytest.approx(5.25, rel=1e-5) and std_term.item() == pytest.approx(0.0, abs=1e-6)
    assert gaussian_wasserstein_loss(base + shift, base, 4.0).item() == pytest.approx(4 * 5.25, rel=1e-5)
    # scaling a zero-mean map moves only the stds, whatever the ratio
    centred = base - base.mean(dim=(2, 3), keepdim=True)
    eps = 1e-5
    var = centred.var(dim=(2, 3))
    expected = ((torch.sqrt(4 * var + eps) - torch.sqrt(var + eps)) ** 2).sum() / 2
    for ratio in (1.0, 8.0):
        got = gaussian_wasserstein_loss(2 * centred, centred, ratio, eps)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_grid_moments_shapes_and_cells():
    f = torch.randn(2, 3, 8, 8)
    mean, std = gaussian_moments(f, 1e-5, grid=4)
    assert mean.shape == std.shape == (2, 3, 4, 4)
    torch.testing.assert_close(mean[:, :, 1, 2], f[:, :, 2:4, 4:6].mean(dim=(2, 3)))
    torch.testing.assert_close(std[:, :, 1, 2], torch.sqrt(f[:, :, 2:4, 4:6].var(dim=(2, 3)) + 1e-5))
    odd = torch.randn(2, 3, 7, 7)  # cells overlap as in adaptive pooling: [0, 4) and [3, 7)
    mean, std = gaussian_moments(odd, 1e-5, grid=2)
    assert mean.shape == (2, 3, 2, 2)
    torch.testing.assert_close(mean[:, :, 1, 0], odd[:, :, 3:7, 0:4].mean(dim=(2, 3)))
    torch.testing.assert_close(std[:, :, 0, 1], torch.sqrt(odd[:, :, 0:4, 3:7].var(dim=(2, 3)) + 1e-5))
    # grid terms are divided by B * grid^2: a constant shift costs the same on any grid
    g1 = gaussian_wasserstein_loss(f + 1.0, f, 1.0, grid=1)
    g4 = gaussian_wasserstein_loss(f + 1.0, f, 1.0, grid=4)
    assert g1.item() == pytest.approx(3.0, rel=1e-5) and g4.item() == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("kind", ["conv1x1", "bottleneck"])
@pytest.mark.parametrize("resize", ["reference", "interpolate"])
@pytest.mark.parametrize("s_hw,t_hw", [(8, 8), (4, 8), (16, 8), (10, 8), (6, 8)])
def test_projector_maps_student_to_teacher_shape(kind, resize, s_hw, t_hw):
    projector = build_projector(kind, (1, 6, s_hw, s_hw), (1, 5, t_hw, t_hw), resize)
    assert projector(torch.randn(2, 6, s_hw, s_hw)).shape == (2, 5, t_hw, t_hw)
    assert isinstance(projector[-2], nn.BatchNorm2d) and isinstance(projector[-1], nn.ReLU)
    if kind == "conv1x1" and resize == "reference" and s_hw == 4:  # the authors' upsampling for ShuffleV1
        assert isinstance(projector[0], nn.ConvTranspose2d)


def test_wkd_f_projector_for_the_shufflenet_pair_and_grid_check():
    torch.manual_seed(0)
    student, teacher = cifar_model_dict["ShuffleV1"][0](num_classes=10), cifar_model_dict["wrn_16_1"][0](num_classes=10)
    cfg = _wkd_cfg(WKD__LOSS__WKD_FEAT_WEIGHT=0.5, WKD__SPATIAL_GRID=4)
    student.train()
    distiller = get_distiller_class("WKD")(student, teacher, cfg)
    assert student.training and not teacher.training  # the dry forward restored the modes
    conv = distiller.projector[0]
    assert isinstance(conv, nn.ConvTranspose2d) and (conv.in_channels, conv.out_channels) == (960, 64)
    cfg.WKD.SPATIAL_GRID = 8  # 8 x 8 cells of one position each: no std
    with pytest.raises(MdistillerError, match="SPATIAL_GRID 8"):
        get_distiller_class("WKD")(student, teacher, cfg)


# ---- CKA cost ----

def test_linear_cka_distance_properties():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(4, 50, 6, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    feats[3] = 2.5 * feats[0] @ rotation + 1.0  # CKA is invariant to rotation, isotropic scale and shift
    dist = linear_cka_distance(feats)
    assert dist.shape == (4, 4)
    torch.testing.assert_close(dist, dist.t())
    assert (dist.diagonal() == 0).all() and dist[0, 3].abs().item() < 1e-5
    off = dist[~torch.eye(4, dtype=torch.bool)]
    assert (off >= -1e-6).all() and (off <= 1).all() and dist[0, 1] > 0.05
    x, y = feats[1] - feats[1].mean(0), feats[2] - feats[2].mean(0)  # the formula, by hand
    cka = (y.t() @ x).norm() ** 2 / ((x.t() @ x).norm() * (y.t() @ y).norm())
    assert dist[1, 2].item() == pytest.approx(1 - cka.item(), abs=1e-5)


def test_logit_stand_flag_is_refused_with_the_reason():
    from mdistiller.errors import MdistillerError

    cfg = default_cfg()
    cfg.DISTILLER.TYPE = "WKD"
    with pytest.raises(MdistillerError, match="--logit-stand is not defined for WKD"):
        apply_logit_stand_flags(cfg, 2.0, 9.0)


def test_authors_imagenet_wkd_f_config_builds_at_the_data_sets_image_size():
    """The authors' ImageNet WKD-F YAML leaves WKD.INPUT_SIZE at (32, 32); the projector must follow the image size."""
    from pathlib import Path

    from mdistiller.distillers import get_distiller_class
    from mdistiller.engine.build import build_model
    from mdistiller.engine.cfg import load_cfg

    path = Path(__file__).parent / "data/reference_configs/WKD/configs/imagenet/r34_r18/wkd_f.yaml"
    cfg = load_cfg(str(path), ["DATASET.IMAGE_SIZE", "64"])  # 64 px keeps the CPU test fast
    assert tuple(cfg.WKD.INPUT_SIZE) == (32, 32)
    torch.manual_seed(0)
    student = build_model("ResNet18", 10, dataset_type="imagenet")
    teacher = build_model("ResNet34", 10, dataset_type="imagenet")
    distiller = get_distiller_class("WKD")(student, teacher, cfg).train()
    _, losses = distiller(image=torch.randn(2, 3, 64, 64), target=torch.tensor([1, 2]), epoch=1)
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_wkd_feat" in losses
    # a set INPUT_SIZE other than the training size would read shapes the run never sees: refused, naming both
    cfg = load_cfg(str(path), ["DATASET.IMAGE_SIZE", "64", "WKD.INPUT_SIZE", "(224, 224)"])
    with pytest.raises(MdistillerError, match=r"WKD.INPUT_SIZE \(224, 224\) differs from the training size 64: .*"
                                              r"set WKD.INPUT_SIZE \(64, 64\)"):
        get_distiller_class("WKD")(student, teacher, cfg)
