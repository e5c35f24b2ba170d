"""RLD losses: SCD and MCD against hand computations (a wrong teacher top-1 and a tie with the label included),
closed forms (MCD 0 for a label the teacher ranks last; SCD with top-1 == label is DKD's TCKD), gradients (none to
the masked classes), fp32 under bf16, and bad inputs; the authors' flags: the LS mapping and --same-t."""

from __future__ import annotations

import math

import pytest
import torch

from mdistiller.cli import train as train_tool
from mdistiller.distillers.dkd import dkd_terms
from mdistiller.distillers.rld import mcd_loss, rld_loss, scd_loss
from mdistiller.engine.run import run_name
from mdistiller.errors import MdistillerError

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(values: list[float]) -> list[float]:
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)


def _hand_scd(z_s, z_t, labels, temperature) -> float:
    total = 0.0
    for s, t, y in zip(z_s, z_t, labels):
        p_s = _softmax([v / temperature for v in s])
        p_t = _softmax([v / temperature for v in t])
        top1 = max(range(len(t)), key=lambda c: t[c])
        total += _kl([p_t[top1], 1 - p_t[top1]], [p_s[y], 1 - p_s[y]])
    return total / len(labels) * temperature**2


def _hand_mcd(z_s, z_t, labels, temperature) -> float:
    total = 0.0
    for s, t, y in zip(z_s, z_t, labels):
        kept = [c for c in range(len(t)) if t[c] < t[y]]
        if not kept:  # every class masked: both uniform
            continue
        p_s = _softmax([s[c] / temperature for c in kept])
        p_t = _softmax([t[c] / temperature for c in kept])
        total += _kl(p_t, p_s)
    return total / len(labels) * temperature**2


Z_S = [[1.0, 2.0, 0.5, -1.0, 0.3], [0.0, -1.0, 3.0, 0.2, 1.0], [2.5, 0.1, 0.1, -0.7, 0.0], [0.3, 0.2, 0.1, 0.0, -0.1]]
Z_T = [
    [2.0, 0.0, 1.0, 0.3, -0.5],  # label 0 is the teacher's top-1
    [1.0, 2.5, 1.0, -2.0, 0.5],  # label 2 ties class 0, below the top-1 (class 1)
    [0.4, 3.0, -1.0, 0.0, 1.2],  # label 4 ranked second
    [1.0, 0.5, 0.0, -0.5, -1.0],  # label 4 is the teacher's lowest: MCD row 0
]
LABELS = [0, 2, 4, 4]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_scd_and_mcd_match_hand_computation(temperature: float) -> None:
    z_s, z_t, labels = torch.tensor(Z_S), torch.tensor(Z_T), torch.tensor(LABELS)
    assert scd_loss(z_s, z_t, labels, temperature).item() == pytest.approx(
        _hand_scd(Z_S, Z_T, LABELS, temperature), rel=1e-5
    )
    assert mcd_loss(z_s, z_t, labels, temperature).item() == pytest.approx(
        _hand_mcd(Z_S, Z_T, LABELS, temperature), rel=1e-5
    )


def test_rld_weights_scd_and_mcd_at_their_own_temperatures() -> None:
    z_s, z_t, labels = torch.tensor(Z_S), torch.tensor(Z_T), torch.tensor(LABELS)
    expected = 1.5 * _hand_scd(Z_S, Z_T, LABELS, 2.0) + 8.0 * _hand_mcd(Z_S, Z_T, LABELS, 4.0)
    loss = rld_loss(z_s, z_t, labels, 1.5, 8.0, 2.0, 4.0)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_mcd_masks_a_class_tied_with_the_label() -> None:
    # row 2 of Z_T: class 0 ties the label's logit and is masked (>=); keeping it would change the loss
    z_s, z_t = torch.tensor(Z_S[1:2]), torch.tensor(Z_T[1:2])
    got = mcd_loss(z_s, z_t, torch.tensor([2]), 1.0).item()
    kept = [3, 4]
    assert got == pytest.approx(
        _kl(_softmax([Z_T[1][c] for c in kept]), _softmax([Z_S[1][c] for c in kept])), rel=1e-5
    )
    with_tie = [0, 3, 4]
    assert abs(got - _kl(_softmax([Z_T[1][c] for c in with_tie]), _softmax([Z_S[1][c] for c in with_tie]))) > 1e-3


def test_mcd_is_zero_when_the_label_is_the_teachers_lowest_class() -> None:
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(6, 8, generator=gen) * 5
    z_t = torch.randn(6, 8, generator=gen) * 3
    labels = z_t.argmin(dim=1)
    loss = mcd_loss(z_s, z_t, labels, 4.0)
    assert loss.item() == 0.0
    z_s.requires_grad_(True)
    (grad,) = torch.autograd.grad(mcd_loss(z_s, z_t, labels, 4.0), z_s)
    assert grad.abs().max().item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_scd_with_the_teachers_top1_on_the_label_is_the_binary_kl_of_dkd(temperature: float) -> None:
    gen = torch.Generator().manual_seed(1)
    z_s = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2
    z_t = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2
    labels = z_t.argmax(dim=1)
    tckd, _ = dkd_terms(z_s, z_t, labels, temperature)  # fp32
    assert scd_loss(z_s, z_t, labels, temperature).item() == pytest.approx(tckd.mean().item(), rel=1e-5)
    # when the teacher's top-1 is wrong the two differ: SCD splits the teacher at its own top-1
    wrong = (labels + 1) % 10
    tckd_wrong, _ = dkd_terms(z_s, z_t, wrong, temperature)
    assert abs(scd_loss(z_s, z_t, wrong, temperature).item() - tckd_wrong.mean().item()) > 1e-3


def test_mcd_sends_no_gradient_to_the_masked_classes() -> None:
    gen = torch.Generator().manual_seed(2)
    z_s = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 2, 2])
    grad_s, grad_t = torch.autograd.grad(mcd_loss(z_s, z_t, labels, 4.0), (z_s, z_t))
    masked = z_t.detach() >= z_t.detach().gather(1, labels[:, None])
    assert grad_s[masked].abs().max().item() == 0.0 and grad_t[masked].abs().max().item() == 0.0
    assert grad_s[~masked].abs().sum().item() > 0


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    z_s = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    z_t = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 5, 2, 3])
    assert torch.autograd.gradcheck(lambda s, t: rld_loss(s, t, labels, 1.0, 8.0, 2.0, 4.0), (z_s, z_t))


def test_bf16_inputs_give_an_fp32_loss_inside_and_outside_autocast() -> None:
    gen = torch.Generator().manual_seed(4)
    z_s = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    z_t = (torch.randn(6, 10, generator=gen) * 3).bfloat16()
    labels = torch.randint(0, 10, (6,), generator=gen)
    reference = rld_loss(z_s.float(), z_t.float(), labels, 1.0, 8.0, 1.0, 4.0)
    plain = rld_loss(z_s, z_t, labels, 1.0, 8.0, 1.0, 4.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = rld_loss(z_s, z_t, labels, 1.0, 8.0, 1.0, 4.0)
    for loss in (plain, autocast):
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize(
    "target, alpha_t, t, message",
    [
        (torch.zeros(4, 5), 1.0, 4.0, "target must be"),  # soft labels: not in the reference
        (torch.zeros(4), 1.0, 4.0, "target must be"),
        (torch.zeros(4, dtype=torch.long), 0.0, 4.0, "alpha_temperature must be"),
        (torch.zeros(4, dtype=torch.long), 1.0, -1.0, "temperature must be"),
    ],
)
def test_bad_inputs_give_one_line_errors(target, alpha_t, t, message) -> None:
    with pytest.raises(MdistillerError, match=message) as info:
        rld_loss(torch.zeros(4, 5), torch.zeros(4, 5), target, 1.0, 8.0, alpha_t, t)
    assert "\n" not in str(info.value) and str(info.value).startswith("RLD:")


# ---- the authors' flags (tools/train.py) ----
RLD_CONFIG = str(REPO / "configs/cifar100/rld/resnet32x4_resnet8x4.yaml")


def _cfg(*argv: str):
    args = train_tool.parse_args(["--cfg", RLD_CONFIG, *argv])
    return train_tool.build_cfg(args), args


def _rld(cfg) -> tuple:
    return cfg.RLD.ALPHA, cfg.RLD.BETA, cfg.RLD.T, cfg.RLD.ALPHA_T, cfg.RLD.CE_WEIGHT, cfg.RLD.WARMUP


def test_no_flags_train_the_authors_defaults() -> None:
    cfg, args = _cfg()
    assert cfg.EXPERIMENT.LOGIT_STAND is False and _rld(cfg) == (1.0, 8.0, 4.0, 1.0, 1.0, 20)
    assert run_name(cfg, args.opts) == "rld,res32x4,res8x4"


def test_logit_stand_flags_scale_the_weights_and_set_both_temperatures() -> None:
    cfg, args = _cfg("--logit-stand", "--base-temp", "3", "--kd-weight", "5", "RLD.ALPHA", "2.0")
    assert cfg.EXPERIMENT.LOGIT_STAND is True and (cfg.EXPERIMENT.BASE_TEMP, cfg.EXPERIMENT.KD_WEIGHT) == (3.0, 5.0)
    # overrides first, then the flags: ALPHA 2 * 5, BETA 8 * 5, T = ALPHA_T = 3; the name shows the factor and w
    assert _rld(cfg) == (10.0, 40.0, 3.0, 3.0, 1.0, 20)
    assert run_name(cfg, args.opts).endswith(",RLD.ALPHA:2.0,LS:T3,w5")
    with pytest.raises(MdistillerError, match=r"RLD.T 7.0 and --logit-stand --base-temp 3 both set RLD.T"):
        _cfg("--logit-stand", "--base-temp", "3", "RLD.T", "7.0")  # the flag would replace the typed T
    defaults, _ = _cfg("--logit-stand")
    assert _rld(defaults) == (9.0, 72.0, 2.0, 2.0, 1.0, 20)  # --base-temp 2 --kd-weight 9


def test_same_t_sets_alpha_t_to_t_and_is_recorded_in_the_run_name() -> None:
    cfg, args = _cfg("--same-t", "RLD.ALPHA", "1.", "RLD.BETA", "8.", "RLD.T", "4.")  # the authors' README command
    assert _rld(cfg) == (1.0, 8.0, 4.0, 4.0, 1.0, 20)
    assert run_name(cfg, args.opts).endswith(",RLD.ALPHA_T:4")
    other, args = _cfg("RLD.T", "6.0", "--same-t")  # a flag after the overrides: the same
    assert (other.RLD.T, other.RLD.ALPHA_T) == (6.0, 6.0) and "RLD.ALPHA_T:6" in run_name(other, args.opts)
    with pytest.raises(MdistillerError, match=r"RLD.ALPHA_T 0.5 and --same-t both set RLD.ALPHA_T"):
        _cfg("RLD.T", "6.0", "RLD.ALPHA_T", "0.5", "--same-t")  # the flag would replace the typed ALPHA_T


def test_same_t_applies_after_the_logit_stand_flags() -> None:
    cfg, _ = _cfg("--same-t", "--logit-stand", "--base-temp", "3", "--kd-weight", "2")
    assert _rld(cfg) == (2.0, 16.0, 3.0, 3.0, 1.0, 20)
    with pytest.raises(MdistillerError, match=r"RLD.ALPHA_T 9.0 and --logit-stand --base-temp 3 both set"):
        _cfg("--same-t", "--logit-stand", "--base-temp", "3", "--kd-weight", "2", "RLD.ALPHA_T", "9.0")


def test_same_t_is_refused_for_another_method() -> None:
    path = str(REPO / "configs/cifar100/dkd/resnet32x4_resnet8x4.yaml")
    with pytest.raises(MdistillerError, match="--same-t sets RLD.ALPHA_T = RLD.T and applies to DISTILLER.TYPE RLD "
                                              "only, not DKD") as info:
        train_tool.build_cfg(train_tool.parse_args(["--cfg", path, "--same-t"]))
    assert "\n" not in str(info.value)
