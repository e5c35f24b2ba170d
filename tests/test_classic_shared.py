"""What FITNET, VID, OFD and REVIEWKD share: upstream's full distiller checkpoints load strictly (key and shape lists
written from upstream's layout, not read from our modules), the learnable parameters are exactly upstream's and the
only ones gradients reach, the losses are fp32 under bf16 autocast, and a few steps lower the distillation loss."""

from __future__ import annotations

import pytest
import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.fitnet import fitnet_loss
from mdistiller.distillers.ofd import ofd_loss
from mdistiller.distillers.reviewkd import hcl_loss
from mdistiller.distillers.vid import initial_log_scale, vid_loss
from mdistiller.engine.build import build_model
from mdistiller.engine.checkpoint import extract_state_dict, load_checkpoint
from mdistiller.errors import MdistillerError

from classic_pairs import TEACHER, batch, build_classic, classic_cfg

METHODS = ("FITNET", "VID", "OFD", "REVIEWKD")
# resnet8 (student) stage channels and wrn_16_2 (teacher) stage channels; both at 32, 16, 8 pixels
S_CH, T_CH = (16, 32, 64), (32, 64, 128)
LONG = "long"  # num_batches_tracked


def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": LONG}


def upstream_extra_keys(method: str) -> dict:
    """The keys and shapes upstream saves for the method's extra modules on resnet8 <- wrn_16_2 (from its layout)."""
    keys: dict = {}
    if method == "FITNET":  # hint layer 2: (32, 16, 16) -> (64, 16, 16): 1x1 conv with bias, BN, ReLU
        keys = {"conv_reg.conv.weight": (64, 32, 1, 1), "conv_reg.conv.bias": (64,), **_bn("conv_reg.bn", 64)}
    elif method == "VID":  # conv1x1 s->t, ReLU, conv1x1 t->t, ReLU, conv1x1 t->t, no bias; log-scales unsaved
        for i, (s, t) in enumerate(zip(S_CH, T_CH)):
            keys.update({f"regressors.{i}.0.weight": (t, s, 1, 1), f"regressors.{i}.2.weight": (t, t, 1, 1),
                         f"regressors.{i}.4.weight": (t, t, 1, 1)})
    elif method == "OFD":  # ConnectorConvBN.connectors[i] = Sequential(conv no bias, BN); margins unsaved
        for i, (s, t) in enumerate(zip(S_CH, T_CH)):
            keys.update({f"connectors.connectors.{i}.0.weight": (t, s, 1, 1), **_bn(f"connectors.connectors.{i}.1", t)})
    elif method == "REVIEWKD":  # IN [16, 32, 64, 64] OUT [32, 64, 128, 128], mid 64, abfs reversed: 0 = pooled level
        in_ch, out_ch, mid = (16, 32, 64, 64), (32, 64, 128, 128), 64
        for i in range(4):
            idx = 3 - i
            keys.update({f"abfs.{i}.conv1.0.weight": (mid, in_ch[idx], 1, 1), **_bn(f"abfs.{i}.conv1.1", mid),
                         f"abfs.{i}.conv2.0.weight": (out_ch[idx], mid, 3, 3), **_bn(f"abfs.{i}.conv2.1", out_ch[idx])})
            if i > 0:
                keys.update({f"abfs.{i}.att_conv.0.weight": (2, 2 * mid, 1, 1), f"abfs.{i}.att_conv.0.bias": (2,)})
    return keys


def _tensor(shape) -> torch.Tensor:
    return torch.tensor(3, dtype=torch.long) if shape == LONG else torch.randn(*shape)


@pytest.mark.parametrize("method", METHODS)
def test_upstream_dataparallel_checkpoint_loads_strictly(method, tmp_path, one_thread):
    distiller = build_classic(method)
    extra = upstream_extra_keys(method)
    ours = {k: tuple(v.shape) for k, v in distiller.state_dict().items() if not k.startswith(("student.", "teacher."))}
    assert ours == {k: (() if v == LONG else v) for k, v in extra.items()}  # nothing more (no variances, margins)
    models = ("student.", "teacher.")
    model = {f"module.{k}": v.clone() for k, v in distiller.state_dict().items() if k.startswith(models)}
    model.update({f"module.{k}": _tensor(shape) for k, shape in extra.items()})
    torch.save({"model": model, "epoch": 7}, tmp_path / "latest")
    state = extract_state_dict(load_checkpoint(str(tmp_path / "latest")))
    distiller.load_state_dict(state, strict=True)
    key = next(k for k in extra if extra[k] != LONG)
    assert torch.equal(distiller.state_dict()[key], model[f"module.{key}"])


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_exactly_the_learnable_parameters_never_the_teacher(method, one_thread):
    distiller = build_classic(method)
    extra = {"FITNET": "conv_reg", "VID": "regressors", "OFD": "connectors", "REVIEWKD": "abfs"}[method]
    expected = list(distiller.student.parameters()) + list(getattr(distiller, extra).parameters())
    learnable = distiller.get_learnable_parameters()
    assert {id(p) for p in learnable} == {id(p) for p in expected} and len(learnable) == len(expected)
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    _, losses = distiller.forward_train(**batch())
    losses["loss_kd"].backward()
    for name, p in getattr(distiller, extra).named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    changed = {k for k, v in distiller.teacher.state_dict().items() if not torch.equal(v, teacher_before[k])}
    if method == "OFD":  # the teacher in train mode: its BN running statistics drift, nothing else changes
        assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    else:
        assert not changed


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_distillation_loss(method, one_thread):
    distiller = build_classic(method, opts=["FITNET.LOSS.FEAT_WEIGHT", "1.0"])
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.01, momentum=0.9)
    data = batch(n=8)
    first = None
    for _ in range(6):
        _, losses = distiller.forward_train(**data)
        first = losses["loss_kd"].item() if first is None else first
        optimizer.zero_grad()
        losses["loss_kd"].backward()
        optimizer.step()
    assert losses["loss_kd"].item() < first


_G = torch.Generator().manual_seed(11)
_S = [torch.randn(2, 4, 4, 4, generator=_G).bfloat16() for _ in range(3)]
_T = [torch.randn(2, 4, 4, 4, generator=_G).bfloat16() for _ in range(3)]
PURE_LOSSES = {
    "fitnet": lambda s, t: fitnet_loss(s[0], t[0]),
    "vid": lambda s, t: vid_loss(s[0], t[0], initial_log_scale(5.0, 1e-5, 4), 1e-5),
    "ofd": lambda s, t: ofd_loss(s, t, [torch.full((1, 4, 1, 1), -0.4)] * 3),
    "reviewkd": lambda s, t: hcl_loss(s, t),
}


@pytest.mark.parametrize("name", sorted(PURE_LOSSES))
def test_losses_are_fp32_under_bf16_autocast(name):
    """Given bf16 features (what the models return under AMP), each loss equals the fp32 computation to the bit."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = PURE_LOSSES[name](_S, _T)
    reference = PURE_LOSSES[name]([s.float() for s in _S], [t.float() for t in _T])
    assert under_amp.dtype == torch.float32 and torch.equal(under_amp, reference)


@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_under_bf16_autocast_is_close_to_fp32(method, one_thread):
    distiller = build_classic(method).eval()  # fixed statistics: the two forwards see the same modules
    data = batch()
    _, exact = distiller.forward_train(**data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, amp = distiller.forward_train(**data)
    for key in ("loss_ce", "loss_kd"):
        assert amp[key].dtype == torch.float32
        assert amp[key].item() == pytest.approx(exact[key].item(), rel=0.05), key


class TokenModel(torch.nn.Module):
    """What the zoo's ViTs return: tokens, no feature maps."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 100)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)[:, :, :1].expand(-1, -1, 8)
        pooled = tokens.mean(1)
        return self.head(pooled), {"tokens": tokens, "pooled_feat": pooled, "feats": [], "preact_feats": []}


@pytest.mark.parametrize("method", METHODS)
def test_a_transformer_student_is_refused_in_one_line_naming_both_models(method, one_thread):
    cfg = classic_cfg(method, student="deit_tiny")
    teacher = build_model(TEACHER, 100)
    with pytest.raises(MdistillerError, match=rf"^{method} cannot distil student deit_tiny from teacher {TEACHER}: "
                                              r"student deit_tiny has no feature maps \(a transformer gives tokens\)"):
        get_distiller_class(method)(TokenModel(), teacher, cfg)
