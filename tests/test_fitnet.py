"""FitNet: ConvReg's conv per shape rule, the hint MSE by hand, zero loss, unsupported shapes in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdistiller.distillers.fitnet import ConvReg, fitnet_loss, hint_conv
from mdistiller.errors import MdistillerError

from classic_pairs import batch, build_classic


@pytest.mark.parametrize("s_shape, t_shape, kind, weight", [
    ((1, 8, 16, 16), (1, 4, 8, 8), nn.Conv2d, (4, 8, 3, 3)),  # H_s = 2 H_t: 3x3 stride 2
    ((1, 8, 8, 8), (1, 4, 16, 16), nn.ConvTranspose2d, (8, 4, 4, 4)),  # 2 H_s = H_t: transposed 4x4 stride 2
    ((1, 8, 8, 8), (1, 4, 8, 8), nn.Conv2d, (4, 8, 1, 1)),  # same size: 1x1
    ((1, 8, 10, 9), (1, 4, 8, 8), nn.Conv2d, (4, 8, 3, 2)),  # larger: valid (1 + dH) x (1 + dW)
])
def test_conv_reg_rules_map_to_the_teacher_shape(s_shape, t_shape, kind, weight):
    reg = ConvReg(s_shape, t_shape)
    assert type(reg.conv) is kind and tuple(reg.conv.weight.shape) == weight and reg.conv.bias is not None
    assert tuple(reg(torch.randn(*s_shape)).shape) == t_shape
    assert sorted(reg.state_dict()) == ["bn.bias", "bn.num_batches_tracked", "bn.running_mean", "bn.running_var",
                                        "bn.weight", "conv.bias", "conv.weight"]


def test_unsupported_shape_rule_is_refused():
    assert hint_conv((1, 8, 4, 4), (1, 4, 16, 16)) is None
    with pytest.raises(MdistillerError, match=r"ConvReg cannot map a \(8, 4, 4\) map onto a \(4, 16, 16\) one"):
        ConvReg((1, 8, 4, 4), (1, 4, 16, 16))


def test_hint_loss_is_the_mse_after_a_known_conv_reg(one_thread):
    reg = ConvReg((1, 2, 2, 2), (1, 2, 2, 2)).eval()
    with torch.no_grad():
        reg.conv.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 2, 1, 1))
        reg.conv.bias.copy_(torch.tensor([0.5, 0.25]))
        reg.bn.running_mean.copy_(torch.tensor([0.5, 0.0]))
        reg.bn.running_var.copy_(torch.tensor([4.0, 1.0]) - reg.bn.eps)  # so that the BN divides by 2 and 1
        reg.bn.weight.copy_(torch.tensor([1.0, 3.0]))
    x = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.5, 1.0], [0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.5], [2.0, 0.0]]]])
    # channel 0: relu((x0 + 2 x1 + 0.5 - 0.5) / 2) = relu([[1, 1], [1, 0.5]]); channel 1: relu(3 (-x1 + 0.25))
    expected_out = torch.tensor([[[[1.0, 1.0], [1.0, 0.5]], [[0.0, 0.0], [0.75, 0.0]]]])
    torch.testing.assert_close(reg(x), expected_out)
    squares = [0, 0, 0, 0.25, 0, 0.25, 1.5625, 0]
    assert fitnet_loss(reg(x), t).item() == pytest.approx(sum(squares) / 8)


def test_distiller_loss_is_feat_weight_times_mse_on_the_hint_layer(one_thread):
    distiller = build_classic("FITNET")
    assert (tuple(distiller.conv_reg.conv.weight.shape)) == (64, 32, 1, 1)  # resnet8 32 ch -> wrn_16_2 64 ch at 16x16
    distiller.conv_reg.eval()  # fixed BN statistics: the hand computation below uses the same module
    data = batch()
    _, losses = distiller.forward_train(**data)
    with torch.no_grad():
        f_s = distiller.student(data["image"])[1]["feats"][2]
        f_t = distiller.teacher(data["image"])[1]["feats"][2]
        expected = 100.0 * ((distiller.conv_reg(f_s) - f_t) ** 2).mean()
    torch.testing.assert_close(losses["loss_kd"], expected)


def test_identical_models_and_an_identity_regressor_give_zero_loss(one_thread):
    distiller = build_classic("FITNET", student="resnet8", teacher="resnet8")
    distiller.teacher.load_state_dict(distiller.student.state_dict())
    distiller.student.eval()
    reg = distiller.conv_reg.eval()
    with torch.no_grad():
        reg.conv.weight.copy_(torch.eye(32).view(32, 32, 1, 1))
        reg.conv.bias.zero_()
        reg.bn.running_var.fill_(1.0 - reg.bn.eps)
    _, losses = distiller.forward_train(**batch())
    assert losses["loss_kd"].item() == pytest.approx(0.0, abs=1e-10)


def test_unsupported_hint_shapes_name_both_models(one_thread):
    # MobileNetV2's last map is 2x2, resnet20's 8x8: no ConvReg rule (upstream: TypeError from NotImplemented)
    with pytest.raises(MdistillerError, match=r"^FITNET cannot regress student MobileNetV2's hint map .*teacher "
                                              r"resnet20's .*HINT_LAYER -1") as err:
        build_classic("FITNET", student="MobileNetV2", teacher="resnet20", opts=["FITNET.HINT_LAYER", "-1"])
    assert "\n" not in str(err.value)
    with pytest.raises(MdistillerError, match=r"FITNET.HINT_LAYER 4 is out of range: teacher wrn_16_2 has 4 feature"):
        build_classic("FITNET", student="vgg8", opts=["FITNET.HINT_LAYER", "4"])
