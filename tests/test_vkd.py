"""VkD: the projection stays semi-orthogonal under SGD, the feature loss, the KL term and logit standardisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.logit_stand import standardize_logits
from mdistiller.distillers.vkd import VKD_FEATURES, orthogonal_projection, register_vkd_feature, vkd_feature_loss
from mdistiller.engine.build import apply_logit_stand_flags
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict


def _semi_orthogonality_error(weight: torch.Tensor) -> float:
    """max |W^T W - I| for orthonormal columns (D_s <= D_t), max |W W^T - I| for orthonormal rows otherwise."""
    d_t, d_s = weight.shape
    gram = weight.t() @ weight if d_s <= d_t else weight @ weight.t()
    return (gram - torch.eye(min(d_s, d_t))).abs().max().item()


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
@pytest.mark.parametrize("d_s,d_t", [(8, 16), (16, 8), (12, 12)])
def test_projection_stays_semi_orthogonal_under_sgd(d_s, d_t, orthogonal_map):
    """SGD with momentum and weight decay, as the trainer's optimizer."""
    torch.manual_seed(0)
    projection = orthogonal_projection(d_s, d_t, orthogonal_map)
    assert projection.weight.shape == (d_t, d_s)
    optimizer = torch.optim.SGD(projection.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    before = projection.weight.detach().clone()
    for _ in range(10):
        f_s, f_t = torch.randn(32, d_s), torch.randn(32, d_t)
        loss = vkd_feature_loss(projection(f_s), f_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert _semi_orthogonality_error(projection.weight.detach()) < 1e-5
    assert (projection.weight.detach() - before).abs().max() > 1e-3  # it did move


def test_householder_map_is_refused_with_weight_decay():
    cfg = default_cfg()
    cfg.VKD.ORTHOGONAL_MAP = "householder"
    s, t = cifar_model_dict["resnet8"][0](num_classes=10), cifar_model_dict["wrn_16_2"][0](num_classes=10)
    with pytest.raises(MdistillerError, match="householder cannot take weight decay"):
        get_distiller_class("VKD")(s, t, cfg)
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    assert get_distiller_class("VKD")(s, t, cfg).projection.weight.shape == (128, 64)


def test_feature_loss_is_zero_when_projection_matches_the_normalised_teacher():
    torch.manual_seed(0)
    f_t = torch.randn(5, 16) * 3 + 2
    normalised = (f_t - f_t.mean(1, keepdim=True)) / torch.sqrt(f_t.var(1, unbiased=False, keepdim=True) + 1e-5)
    assert vkd_feature_loss(normalised, f_t).item() == pytest.approx(0.0, abs=1e-7)
    # LN has no affine: a per-sample positive scale and shift of the teacher feature changes nothing
    moved = f_t * torch.rand(5, 1).add(0.5) + torch.randn(5, 1)
    other = torch.randn(5, 16)
    assert vkd_feature_loss(other, moved).item() == pytest.approx(vkd_feature_loss(other, f_t).item(), rel=1e-4)
    expected = F.smooth_l1_loss(other, F.layer_norm(f_t, (16,)))
    assert vkd_feature_loss(other, f_t).item() == pytest.approx(expected.item(), rel=1e-6)


def _vkd(student="resnet8", teacher="wrn_16_2", **values):
    cfg = default_cfg()
    for key, value in values.items():
        cfg.VKD[key] = value
    torch.manual_seed(0)
    s, t = cifar_model_dict[student][0](num_classes=10), cifar_model_dict[teacher][0](num_classes=10)
    return get_distiller_class("VKD")(s, t, cfg), cfg


def test_vkd_distiller_losses_and_learnable_projection():
    distiller, _ = _vkd()
    assert distiller.projection.weight.shape == (128, 64)  # wrn_16_2 pooled 128 <- resnet8 pooled 64
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert all(id(p) in learnable for p in distiller.projection.parameters())
    assert not any(id(p) in learnable for p in distiller.teacher.parameters())
    image, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    distiller.train()
    logits, losses = distiller.forward_train(image=image, target=target, epoch=1)
    assert set(losses) == {"loss_ce", "loss_feat"} and logits.shape == (4, 10)  # KD_WEIGHT 0.0 by default
    sum(losses.values()).backward()
    assert distiller.projection.parametrizations.weight.original.grad is not None


def test_vkd_kl_term_and_logit_stand():
    distiller, cfg = _vkd("resnet8", "resnet8", KD_WEIGHT=2.0, T=3.0)
    distiller.eval()
    image, target = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, losses = distiller.forward_train(image=image, target=target)
    z_s, z_t = distiller.student(image)[0], distiller.teacher(image)[0]
    assert losses["loss_kd"].item() == pytest.approx(2.0 * kd_loss(z_s, z_t, 3.0).item(), rel=1e-5)

    cfg.DISTILLER.TYPE = "VKD"
    apply_logit_stand_flags(cfg, 2.0, 9.0)
    assert (cfg.VKD.T, cfg.VKD.KD_WEIGHT, cfg.EXPERIMENT.LOGIT_STAND) == (2.0, 9.0, True)
    ls = get_distiller_class("VKD")(distiller.student, distiller.teacher, cfg).eval()
    _, losses = ls.forward_train(image=image, target=target)
    expected = 9.0 * kd_loss(standardize_logits(z_s), standardize_logits(z_t), 2.0)
    assert losses["loss_kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_feature_extraction_is_pluggable_for_token_models():
    """A ViT-like student whose feats hold tokens reuses the projection and loss through VKD.STUDENT_FEATURE."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 24)
            self.head = nn.Linear(24, 10)

        def forward(self, image):
            tokens = self.embed(image.flatten(2).transpose(1, 2))  # B x HW x 24
            return self.head(tokens.mean(1)), {"tokens": tokens}

    assert "token_mean" in VKD_FEATURES
    cfg = default_cfg()
    cfg.VKD.STUDENT_FEATURE = "token_mean"
    teacher = cifar_model_dict["resnet8"][0](num_classes=10)
    distiller = get_distiller_class("VKD")(Tokens(), teacher, cfg)
    assert distiller.projection.weight.shape == (64, 24)
    _, losses = distiller.forward_train(image=torch.randn(2, 3, 32, 32), target=torch.tensor([1, 2]))
    assert torch.isfinite(losses["loss_feat"])

    @register_vkd_feature("test_first_token")
    def first_token(feats):
        return feats["tokens"][:, 0]

    try:
        cfg.VKD.STUDENT_FEATURE = "test_first_token"
        assert get_distiller_class("VKD")(Tokens(), teacher, cfg).projection.weight.shape == (64, 24)
    finally:
        VKD_FEATURES.pop("test_first_token")
