"""CAT-KD: the CAM loss against a hand computation, zero for equal CAMs, normalisation invariance, binarisation, the
partial-CAM selection quirks (strictness, the hard-coded 100, packing across samples, the skip), gradients, bf16; the
distiller (its loss on the models' own CAMs, the bias-free student, gradients, the authors' keys and their
refusals)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.cat_kd import CAT_KD, binarize_cams, cat_loss, partial_cam_mask, select_partial_cams
from mdistiller.engine.build import apply_logit_stand_flags
from mdistiller.engine.cfg import load_cfg
from mdistiller.engine.validate import check_recipe
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict
from mdistiller.models.common import class_activation_maps, classifier_weights

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _np_pool(x: np.ndarray, r: int) -> np.ndarray:
    """(H, W) -> (r, r) mean over equal blocks (H, W multiples of r)."""
    h, w = x.shape[0] // r, x.shape[1] // r
    return np.array([[x[i * h : (i + 1) * h, j * w : (j + 1) * w].mean() for j in range(r)] for i in range(r)])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("resolution", [1, 2, 4])
def test_loss_matches_a_hand_computation(normalize, resolution):
    s, t = _rand(2, 3, 8, 8, seed=1), _rand(2, 3, 4, 4, seed=2)  # the student's maps may be larger
    total = 0.0
    for b in range(2):
        for c in range(3):
            ps = _np_pool(s[b, c].double().numpy(), resolution)
            pt = _np_pool(t[b, c].double().numpy(), resolution)
            if normalize:
                ps = ps / max(np.sqrt((ps**2).sum()), 1e-12)
                pt = pt / max(np.sqrt((pt**2).sum()), 1e-12)
            total += ((ps - pt) ** 2).sum()
    expected = total / (2 * 3 * resolution * resolution)
    assert cat_loss(s, t, resolution, normalize).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_equal_cams_give_zero(normalize):
    t = _rand(3, 5, 4, 4)
    assert cat_loss(t.clone(), t, 2, normalize).item() == 0.0


def test_normalisation_makes_the_loss_blind_to_per_map_positive_scale():
    s, t = _rand(2, 4, 4, 4, seed=3), _rand(2, 4, 4, 4, seed=4)
    scale = torch.rand(2, 4, 1, 1, generator=torch.Generator().manual_seed(5)) * 5 + 0.1
    assert cat_loss(s * scale, t, 2, True).item() == pytest.approx(cat_loss(s, t, 2, True).item(), rel=1e-5)
    assert abs(cat_loss(s * scale, t, 2, False).item() - cat_loss(s, t, 2, False).item()) > 1e-3


def test_binarisation_is_strictly_above_the_mean_absolute_value():
    t = torch.tensor([[[[1.0, -1.0], [3.0, 1.0]], [[-4.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    # means of |x|: 1.5, 1.0, 2.0 -> only 3 passes; -4 is below its threshold; equal values are not above theirs
    expected = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.equal(binarize_cams(t), expected)
    s = _rand(1, 3, 2, 2, seed=6)
    assert cat_loss(s, t, 1, False, binarize=True).item() == pytest.approx(
        cat_loss(s, expected, 1, False).item(), rel=1e-6
    )


def test_strategy_0_keeps_classes_strictly_above_the_nth_largest():
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0], [0.0, 9.0, 8.0, 7.0, 1.0]])
    assert partial_cam_mask(logits, 3, 0).tolist() == [
        [True, False, True, False, False],
        [False, True, True, False, False],
    ]
    # a tie at the n-th largest keeps fewer
    tied = torch.tensor([[5.0, 4.0, 4.0, 1.0, 0.0]])
    assert partial_cam_mask(tied, 3, 0).tolist() == [[True, False, False, False, False]]


def test_strategy_1_uses_the_hard_coded_100():
    logits = _rand(2, 100, seed=7)
    mask = partial_cam_mask(logits, 10, 1)
    assert mask.sum(1).tolist() == [11, 11]  # n + 1 at C = 100
    lowest = logits.argsort(1)[:, :11]
    assert all(set(lowest[b].tolist()) == set(mask[b].nonzero().flatten().tolist()) for b in range(2))
    # at C = 1000 the index is still 99 - n: keep all but the 89 highest
    big = _rand(1, 1000, seed=8)
    assert partial_cam_mask(big, 10, 1).sum().item() == 1000 - 89


def test_selection_packs_the_whole_batch_and_mixes_samples():
    cams = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1).expand(2, 4, 3, 3).contiguous()
    # sample 0 keeps classes 0, 1, 2 (above 0.0); sample 1 keeps class 3 only: 4 maps, a multiple of B = 2
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    picked = select_partial_cams(cams, logits, 4, 0)
    assert picked.shape == (2, 2, 3, 3)
    assert picked[:, :, 0, 0].tolist() == [[0.0, 1.0], [2.0, 7.0]]  # row 1 holds sample 0's third map
    # 3 kept maps do not divide B = 2: everything is kept, unchanged
    odd = torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert select_partial_cams(cams, odd, 3, 0) is cams


def test_selection_keeps_gradients_to_the_student():
    s = _rand(2, 6, 4, 4, seed=9).requires_grad_()
    t = _rand(2, 6, 4, 4, seed=10)
    logits = _rand(2, 6, seed=11)
    loss = cat_loss(select_partial_cams(s, logits, 4, 0), select_partial_cams(t, logits, 4, 0), 2, True)
    loss.backward()
    kept = partial_cam_mask(logits, 4, 0)
    assert (s.grad.abs().sum(dim=(2, 3)) > 0).tolist() == kept.tolist()


def test_gradients_reach_the_student_only():
    s = _rand(2, 3, 4, 4, seed=12).requires_grad_()
    t = _rand(2, 3, 4, 4, seed=13).requires_grad_()
    loss = cat_loss(s, t, 2, True, binarize=True)
    assert loss.shape == ()
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_bf16_inputs_give_the_fp32_value():
    s, t = _rand(2, 3, 8, 8, seed=14).bfloat16(), _rand(2, 3, 8, 8, seed=15).bfloat16()
    expected = cat_loss(s.float(), t.float(), 2, True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = cat_loss(s, t, 2, True)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_bad_inputs_are_refused_in_one_line():
    cams = _rand(2, 4, 2, 2)
    with pytest.raises(MdistillerError, match="Strategy must be 0 or 1"):
        select_partial_cams(cams, _rand(2, 4), 2, 2)
    with pytest.raises(MdistillerError, match="indexes sorted position"):
        partial_cam_mask(_rand(2, 4), 10, 0)
    with pytest.raises(MdistillerError, match="indexes sorted position"):
        partial_cam_mask(_rand(2, 50), 10, 1)  # 99 - 10 is past 50 classes
    with pytest.raises(MdistillerError, match="kept no CAM"):
        select_partial_cams(cams, _rand(2, 4), 1, 0)  # nothing is strictly above the largest
    with pytest.raises(MdistillerError, match="do not match"):
        select_partial_cams(cams, _rand(2, 5), 2, 0)
    with pytest.raises(MdistillerError, match=r"\(B, C, H, W\)"):
        cat_loss(_rand(2, 4), cams, 2, True)
    with pytest.raises(MdistillerError, match="differ in"):
        cat_loss(_rand(2, 3, 2, 2), cams, 2, True)
    with pytest.raises(MdistillerError, match="CAM_RESOLUTION"):
        cat_loss(cams, cams, 0, True)


# ---- the distiller ----

CIFAR_CONFIG = REPO / "configs/cifar100/cat_kd/resnet32x4_ShuffleV1.yaml"


def _models(student: str = "resnet8", teacher: str = "resnet20"):
    torch.manual_seed(0)
    return cifar_model_dict[student][0](num_classes=100), cifar_model_dict[teacher][0](num_classes=100)


def _batch(seed: int = 0, batch: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 100, (batch,), generator=gen)


@pytest.mark.parametrize("student, teacher", [("resnet8", "resnet20"), ("ShuffleV2", "wrn_16_2")])
def test_distiller_loss_is_the_pure_function_on_the_models_cams(student, teacher):
    student, teacher = _models(student, teacher)
    distiller = CAT_KD(student, teacher, ce_weight=1.0, cat_weight=600.0, resolution=4, normalize=True).train()
    image, target = _batch()
    logits, losses = distiller.forward_train(image, target)
    assert set(losses) == {"loss_CE", "loss_CAT"}
    with torch.no_grad():
        z_s, f_s = student(image)
        _, f_t = teacher(image)
        weight_s, weight_t = classifier_weights(student)[0], classifier_weights(teacher)[0]
        cam_s = torch.einsum("cd,bdhw->bchw", weight_s, f_s["prepool"])  # the 1x1 conv, no bias
        cam_t = torch.einsum("cd,bdhw->bchw", weight_t, f_t["prepool"])
    assert torch.allclose(z_s, cam_s.mean(dim=(2, 3)), atol=1e-4)  # the student's logits: its CAMs' mean, no bias
    expected = 600.0 * cat_loss(cam_s, cam_t, 4, True)
    assert torch.allclose(losses["loss_CAT"], expected, rtol=1e-4)
    assert torch.allclose(losses["loss_CE"], torch.nn.functional.cross_entropy(z_s, target), rtol=1e-6)


def test_the_student_has_no_classifier_bias_and_gradients_never_reach_the_teacher():
    student, teacher = _models()
    distiller = CAT_KD(student, teacher).train()
    assert student.fc.bias is None and "student.fc.bias" not in distiller.state_dict()
    assert teacher.fc.bias is not None  # kept, never used for a CAM
    image, target = _batch(1)
    _, losses = distiller.forward_train(image, target)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in distiller.get_learnable_parameters()} == {id(p) for p in student.parameters()}
    fresh_student, fresh_teacher = _models()
    CAT_KD(fresh_student, fresh_teacher).load_state_dict(distiller.state_dict(), strict=True)


def test_partial_cams_rank_classes_by_the_teachers_bias_free_logits():
    student, teacher = _models()
    with torch.no_grad():
        teacher.fc.bias.copy_(torch.linspace(50, -50, 100))  # a bias that would reorder every class
    distiller = CAT_KD(student, teacher, partial=True, cams_nums=5, resolution=2, normalize=False).train()
    image, target = _batch(2)
    _, losses = distiller.forward_train(image, target)
    with torch.no_grad():
        _, f_s = student(image)
        _, f_t = teacher(image)
        cam_s = class_activation_maps(student, f_s["prepool"])
        cam_t = class_activation_maps(teacher, f_t["prepool"])
    logits = cam_t.mean(dim=(2, 3))
    expected = cat_loss(select_partial_cams(cam_s, logits, 5, 0), select_partial_cams(cam_t, logits, 5, 0), 2, False)
    assert torch.allclose(losses["loss_CAT"], 400.0 * expected, rtol=1e-5)


def test_only_cat_drops_the_cross_entropy():
    distiller = CAT_KD(*_models(), only_cat=True).train()
    _, losses = distiller.forward_train(*_batch(3))
    assert set(losses) == {"loss_CAT"}


def test_the_authors_keys_and_the_alias():
    cfg = load_cfg(str(CIFAR_CONFIG))
    assert get_distiller_class("CAT-KD") is CAT_KD
    hparams = CAT_KD.hparams(cfg)
    assert (hparams["cat_weight"], hparams["resolution"], hparams["normalize"]) == (600.0, 4, True)
    imagenet = load_cfg(str(REPO / "configs/imagenet/r34_r18/cat_kd.yaml"))
    imagenet.device = 3  # ImageNet: the authors' script ignores it too
    assert CAT_KD.hparams(imagenet)["cat_weight"] == 0.5


@pytest.mark.parametrize("key, value, message", [
    ("if_test", False, "CAT_KD needs if_test True"),
    ("device", 1, "run with CUDA_VISIBLE_DEVICES=1 and leave device at 0"),
    ("CAT_KD.teacher_dir", "t.pth", "name the teacher file with DISTILLER.TEACHER_CKPT"),
    ("CAT_KD.student_dir", "s.pth", "'transfer' mode, which is not offered"),
    ("CAT_KD.Strategy", 2, "CAT_KD.Strategy 2 is not one of 0, 1"),
])
def test_refusals_are_one_line(key, value, message):
    cfg = load_cfg(str(CIFAR_CONFIG))
    node, leaf = cfg, key.split(".")
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = value
    with pytest.raises(MdistillerError) as info:
        CAT_KD.hparams(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_logit_stand_reduction_and_the_keys_with_another_method_are_refused():
    cfg = load_cfg(str(CIFAR_CONFIG))
    with pytest.raises(MdistillerError, match="refused for CAT_KD"):
        apply_logit_stand_flags(cfg, 2.0, 9.0)
    cfg.DATASET.REDUCTION = True
    with pytest.raises(MdistillerError, match=r"DATASET.REDUCTION True .* is not implemented"):
        check_recipe(cfg)
    kd = load_cfg(str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), ["if_test", "True"])
    with pytest.raises(MdistillerError, match="if_test True is read by CAT_KD, not by DISTILLER.TYPE KD"):
        check_recipe(kd)
    check_recipe(load_cfg(str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), ["if_Augment", "False"]))
