"""ReviewKD: the HCL pyramid and ABF fusion by hand, the warm-up, upstream's ABF layout and ignored MAX_MID_CHANNEL,
the per-pair lists computed from the models and a one-line refusal of lists that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdistiller.distillers.reviewkd import ABF, hcl_loss, lists_as_overrides, reviewkd_lists
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from classic_pairs import batch, build_classic


def _pool(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b) ** 2).mean().item()


def test_hcl_pyramid_by_hand():
    g = torch.Generator().manual_seed(0)
    s8, t8 = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    s4, t4 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s1, t1 = torch.randn(2, 5, 1, 1, generator=g), torch.randn(2, 5, 1, 1, generator=g)
    level8 = (_mse(s8, t8) + _mse(_pool(s8, 4), _pool(t8, 4)) / 2 + _mse(_pool(s8, 2), _pool(t8, 2)) / 4
              + _mse(_pool(s8, 1), _pool(t8, 1)) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    level4 = (_mse(s4, t4) + _mse(_pool(s4, 2), _pool(t4, 2)) / 2 + _mse(_pool(s4, 1), _pool(t4, 1)) / 4) / 1.75
    level1 = _mse(s1, t1)  # no pooled terms at 1x1
    assert hcl_loss([s8, s4, s1], [t8, t4, t1]).item() == pytest.approx(level8 + level4 + level1, rel=1e-6)
    assert hcl_loss([t8, t4], [t8, t4]).item() == 0.0


def test_abf_fuses_with_two_attention_maps_and_resizes_to_the_teacher(one_thread):
    abf = ABF(2, 2, 2, fuse=True).eval()
    with torch.no_grad():
        abf.conv1[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        abf.conv2[0].weight.zero_()
        abf.conv2[0].weight[0, 0, 1, 1] = abf.conv2[0].weight[1, 1, 1, 1] = 1.0  # the centre tap: identity
        abf.att_conv[0].weight.zero_()
        abf.att_conv[0].bias.copy_(torch.tensor([0.0, 2.0]))
        for bn in (abf.conv1[1], abf.conv2[1]):
            bn.running_var.fill_(1.0 - bn.eps)
    g = torch.Generator().manual_seed(1)
    x, residual = torch.randn(1, 2, 2, 2, generator=g), torch.randn(1, 2, 1, 1, generator=g)
    out, passed_on = abf(x, residual, shape=2, out_shape=4)
    a, b = torch.sigmoid(torch.tensor(0.0)), torch.sigmoid(torch.tensor(2.0))
    fused = x * a + residual.expand(1, 2, 2, 2) * b  # the 1x1 residual upsampled (nearest) to 2x2
    expected = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest to the teacher's 4x4
    torch.testing.assert_close(passed_on, expected)
    torch.testing.assert_close(out, expected)
    top = ABF(2, 2, 3, fuse=False)
    assert top.att_conv is None and top(x, out_shape=2)[0].shape == (1, 3, 2, 2)


def test_abfs_follow_upstream_s_layout_and_mid_channel(one_thread):
    distiller = build_classic("REVIEWKD")  # IN [16, 32, 64, 64], OUT [32, 64, 128, 128]: mid = min(512, 64)
    keys = {k: tuple(v.shape) for k, v in distiller.state_dict().items() if k.startswith("abfs.")}
    assert keys["abfs.0.conv1.0.weight"] == (64, 64, 1, 1) and "abfs.0.att_conv.0.weight" not in keys  # pooled level
    assert keys["abfs.3.conv1.0.weight"] == (64, 16, 1, 1) and keys["abfs.3.conv2.0.weight"] == (32, 64, 3, 3)
    assert keys["abfs.1.att_conv.0.weight"] == (2, 128, 1, 1) and keys["abfs.1.att_conv.0.bias"] == (2,)


def test_max_mid_channel_is_ignored_as_upstream_unless_the_switch_honours_it(one_thread):
    opts = ["REVIEWKD.MAX_MID_CHANNEL", "32"]
    ignored = build_classic("REVIEWKD", opts=opts)
    assert ignored.abfs[0].conv1[0].weight.shape[0] == 64
    honoured = build_classic("REVIEWKD", opts=[*opts, "REVIEWKD.USE_MAX_MID_CHANNEL", "True"])
    assert honoured.abfs[0].conv1[0].weight.shape[0] == 32


def test_warm_up_scales_the_loss_linearly_to_epoch_warmup(one_thread):
    distiller = build_classic("REVIEWKD")
    data = batch()
    losses = {}
    for epoch in (5, 20, 40):
        losses[epoch] = distiller.forward_train(**{**data, "epoch": epoch})[1]["loss_kd"].item()
    assert losses[5] == pytest.approx(losses[40] * 5 / 20, rel=1e-5)
    assert losses[20] == pytest.approx(losses[40], rel=1e-6)
    with pytest.raises(MdistillerError, match="REVIEWKD needs the epoch"):
        distiller.forward_train(data["image"], data["target"])


def test_distiller_loss_against_its_parts(one_thread):
    distiller = build_classic("REVIEWKD").eval()  # fixed BN statistics in the ABFs and models
    data = batch()
    _, losses = distiller.forward_train(**data)
    with torch.no_grad():
        logits_s, f_s = distiller.student(data["image"])
        _, f_t = distiller.teacher(data["image"])
        out, res = distiller.abfs[0](f_s["pooled_feat"][:, :, None, None], out_shape=1)
        outputs = [out]
        for feat, abf, size in zip(f_s["feats"][3:0:-1], distiller.abfs[1:], (8, 16, 32)):
            out, res = abf(feat, res, size, size)
            outputs.insert(0, out)
        teacher = f_t["preact_feats"][1:] + [f_t["pooled_feat"][:, :, None, None]]
        expected = hcl_loss(outputs, teacher)
    torch.testing.assert_close(losses["loss_kd"], expected)  # REVIEWKD_WEIGHT 1.0; epoch 30 > 20: full weight
    torch.testing.assert_close(losses["loss_ce"], F.cross_entropy(logits_s, data["target"]))


def test_lists_are_computed_from_the_models():
    s, t = cifar_model_dict["resnet8x4"][0](), cifar_model_dict["resnet32x4"][0]()
    assert reviewkd_lists(s, t, (32, 32)) == {  # upstream's defaults, made for this pair
        "SHAPES": [1, 8, 16, 32], "OUT_SHAPES": [1, 8, 16, 32],
        "IN_CHANNELS": [64, 128, 256, 256], "OUT_CHANNELS": [64, 128, 256, 256]}
    s = cifar_model_dict["ShuffleV1"][0]()
    assert reviewkd_lists(s, t, (32, 32)) == {
        "SHAPES": [1, 4, 8, 16], "OUT_SHAPES": [1, 8, 16, 32],
        "IN_CHANNELS": [240, 480, 960, 960], "OUT_CHANNELS": [64, 128, 256, 256]}


def test_lists_that_do_not_fit_are_refused_with_the_lists_to_use(one_thread):
    with pytest.raises(MdistillerError) as err:
        build_classic("REVIEWKD", student="resnet8", teacher="resnet20")  # the defaults: resnet32x4 -> resnet8x4
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("REVIEWKD lists (IN_CHANNELS, OUT_CHANNELS) do not fit student resnet8 and teacher "
                              "resnet20 at 32x32: set ")
    assert message.endswith("REVIEWKD.SHAPES [1,8,16,32] REVIEWKD.OUT_SHAPES [1,8,16,32] "
                            "REVIEWKD.IN_CHANNELS [16,32,64,64] REVIEWKD.OUT_CHANNELS [16,32,64,64]")
    assert lists_as_overrides({"SHAPES": [1], "OUT_SHAPES": [2], "IN_CHANNELS": [3], "OUT_CHANNELS": [4]}) == (
        "REVIEWKD.SHAPES [1] REVIEWKD.OUT_SHAPES [2] REVIEWKD.IN_CHANNELS [3] REVIEWKD.OUT_CHANNELS [4]")


def test_models_that_cannot_serve_are_refused_in_one_line(one_thread):
    with pytest.raises(MdistillerError, match=r"^REVIEWKD cannot distil student MobileNetV2 from teacher vgg13: "
                                              r"student MobileNetV2 has no pre-activation features"):
        build_classic("REVIEWKD", student="MobileNetV2", teacher="vgg13", opts=["REVIEWKD.STU_PREACT", "True"])
    with pytest.raises(MdistillerError, match="REVIEWKD.WARMUP_EPOCHS must be >= 1"):
        build_classic("REVIEWKD", opts=["REVIEWKD.WARMUP_EPOCHS", "0"])
