"""KD++ / DKD++: the ND loss (hand computation, closed forms, where its gradient goes), the 0-based warm-up, class
centres with the authors' rounding, the centre JSON (round trip, refusals), the projector (keys, inits); the
distillers (their losses are the pure functions, gradients, state names, the student re-init quirk, refusals)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdistiller.distillers.dkd import dkd_loss
from mdistiller.distillers.kd import kd_loss
from mdistiller.distillers.kdpp import (
    DKDPP,
    KDPP,
    class_centres,
    kdpp_warmup,
    load_centres,
    make_projector,
    nd_loss,
    save_centres,
)
from mdistiller.engine.build import apply_logit_stand_flags
from mdistiller.engine.cfg import load_cfg
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(seed=0, batch=4, dim=5, classes=3):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, dim, generator=gen) * (torch.rand(batch, 1, generator=gen) * 3)
    t = torch.randn(batch, dim, generator=gen) * (torch.rand(batch, 1, generator=gen) * 3)
    centres = torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return s, t, centres, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nd_matches_a_hand_computation(seed):
    s, t, centres, y = _case(seed)
    total = 0.0
    for b in range(4):
        sb, tb, c = s[b].double().numpy(), t[b].double().numpy(), centres[y[b]].double().numpy()
        e = c / math.sqrt((c * c).sum())
        total += 1 - (sb * e).sum() / max(math.sqrt((sb * sb).sum()), math.sqrt((tb * tb).sum()))
    assert nd_loss(s, t, centres, y).item() == pytest.approx(total / 4, rel=1e-5)


def test_nd_is_zero_along_the_centre_when_the_student_norm_is_the_larger():
    centres = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    y = torch.tensor([0, 1])
    s = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 7.0]]) * torch.tensor([[5.0], [1.0]])
    t = torch.tensor([[1.0, 1.0, 1.0], [7.0, 0.0, 0.0]])  # norms 1.73 < 5 and 7 == 7
    assert nd_loss(s, t, centres, y).item() == pytest.approx(0.0, abs=1e-7)
    # a larger teacher norm: 1 - |s| / |t|
    assert nd_loss(s[:1], 2 * s[:1] + 0.0, centres, y[:1]).item() == pytest.approx(0.5, rel=1e-6)


def test_nd_gradient_goes_through_the_student_norm_only_when_it_is_the_larger():
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    s = torch.tensor([[3.0, 4.0], [0.6, 0.8], [3.0, 4.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [0.0, 10.0], [0.0, 5.0]], requires_grad=True)  # |s| = 5 > 1; 1 < 10; 5 == 5
    c = centres.clone().requires_grad_()
    nd_loss(s, t, c, y).backward()
    e = torch.tensor([1.0, 0.0])
    s0 = s.detach()[0]
    through_norm = -(e / 5 - (s0 @ e) * s0 / 125) / 3  # d/ds of 1 - <s, e> / |s|
    assert torch.allclose(s.grad[0], through_norm, atol=1e-7)
    assert torch.allclose(s.grad[1], -e / 10 / 3, atol=1e-7)  # |t| is a constant
    assert torch.allclose(s.grad[2], through_norm, atol=1e-7)  # a tie: Python's max returns |s|, the first
    assert t.grad is None and c.grad is None


def test_nd_bf16_inputs_give_the_fp32_value():
    s, t, centres, y = _case(3)
    s16, t16 = s.bfloat16(), t.bfloat16()
    expected = nd_loss(s16.float(), t16.float(), centres, y)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got = nd_loss(s16, t16, centres, y)
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)


def test_nd_refuses_mismatched_sizes_in_one_line():
    s, t, centres, y = _case(4)
    with pytest.raises(MdistillerError, match="projector"):
        nd_loss(s, t[:, :3], centres, y)
    with pytest.raises(MdistillerError, match=r"centres must be \(num_classes, 5\)"):
        nd_loss(s, t, centres[:, :4], y)


def test_warmup_is_zero_based():
    assert [kdpp_warmup(e, 20) for e in (1, 2, 11, 20, 21, 22, 240)] == pytest.approx(
        [0.0, 0.05, 0.5, 0.95, 1.0, 1.0, 1.0]
    )
    assert kdpp_warmup(1, 0) == 1.0


def _authors_centres(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """The authors' procedure: Python round per value, numpy mean per class and dimension, round again."""
    values: dict[str, list[list[float]]] = {}
    for emb, label in zip(embeddings, labels):
        per_dim = values.setdefault(str(int(label)), [[] for _ in range(len(emb))])
        for j, v in enumerate(emb.tolist()):
            per_dim[j].append(round(v, 4))
    return {k: [float(round(np.array(dim).mean(), 4)) for dim in v] for k, v in values.items()}


def test_centres_follow_the_authors_rounding():
    gen = torch.Generator().manual_seed(5)
    embeddings = torch.randn(300, 6, generator=gen) * 3
    labels = torch.arange(300) % 5
    batches = [(embeddings[i : i + 64], labels[i : i + 64]) for i in range(0, 300, 64)]
    centres = class_centres(batches, 5)
    assert centres.dtype == torch.float64 and centres.shape == (5, 6)
    theirs = _authors_centres(embeddings, labels)
    assert centres.tolist() == [theirs[str(k)] for k in range(5)]
    assert torch.equal(class_centres((embeddings, labels), 5), centres)  # one (embeddings, labels) pair


def test_centres_round_each_value_before_the_mean():
    # rounded per sample 0, 0, 0.0001 -> mean 0.0000333 -> 0.0; the raw mean 0.0000733 would round to 0.0001
    raw = torch.tensor([[0.00004], [0.00004], [0.00014]])
    assert class_centres((raw, torch.zeros(3, dtype=torch.long)), 1).tolist() == [[0.0]]
    # 0.03125 (= 1/32, exact) is a true tie: Python's round goes to the even 0.0312, and so do the centres
    tie = torch.tensor([[0.03125]])
    assert class_centres((tie, torch.zeros(1, dtype=torch.long)), 1).tolist() == [[round(0.03125, 4)]] == [[0.0312]]


def test_centres_refuse_a_class_without_samples_and_bad_labels():
    with pytest.raises(MdistillerError, match=r"no sample of class\(es\) \[2\]"):
        class_centres((torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])), 3)
    with pytest.raises(MdistillerError, match="outside"):
        class_centres((torch.zeros(2, 2), torch.tensor([0, 3])), 3)
    with pytest.raises(MdistillerError, match="no embeddings"):
        class_centres([], 3)


def test_centre_json_round_trip_in_the_authors_layout(tmp_path):
    centres = torch.tensor([[0.1234, -2.0, 3.5], [0.0, 1e-4, 7.25]], dtype=torch.float64)
    path = str(tmp_path / "center_emb_train.json")
    save_centres(path, centres)
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"0": [0.1234, -2.0, 3.5], "1": [0.0, 0.0001, 7.25]}
    assert text.startswith('{\n    "0": [\n        0.1234,')  # json.dumps(..., indent=4), as the authors
    loaded = load_centres(path, 2, 3)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, centres.float())
    # the authors' files list classes in order of first appearance
    (tmp_path / "shuffled.json").write_text(json.dumps({"1": [0.0, 0.0001, 7.25], "0": [0.1234, -2.0, 3.5]}))
    assert torch.equal(load_centres(str(tmp_path / "shuffled.json"), 2, 3), loaded)


def test_centre_file_refusals_name_the_file_and_both_sizes(tmp_path):
    path = str(tmp_path / "c.json")
    save_centres(path, torch.zeros(3, 4, dtype=torch.float64))
    for args, pattern in (
        ((100, 4), f"{path} has 3 classes, the teacher has 100"),
        ((3, 64), f"{path}: class 0 has a centre of size 4, the teacher's embedding has 64"),
    ):
        with pytest.raises(MdistillerError, match=pattern) as info:
            load_centres(path, *args)
        assert "\n" not in str(info.value)
    bad = tmp_path / "bad.json"
    for text, pattern in (
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"0": [1.0], "2": [1.0]}', "keys must be"),
        ('{"0": [1.0], "1": ["x"]}', "non-numeric"),
        ('{"0": [1.0], "1": 3}', "size int"),
    ):
        bad.write_text(text)
        with pytest.raises(MdistillerError, match=pattern):
            load_centres(str(bad), 2, 1)
    with pytest.raises(MdistillerError, match="cannot read"):
        load_centres(str(tmp_path / "missing.json"), 2, 1)


def test_projector_layout_and_inits():
    torch.manual_seed(0)
    cifar = make_projector(64, 128, "cifar")
    assert [k for k in cifar.state_dict()] == [
        "0.weight", "0.bias", "0.running_mean", "0.running_var", "0.num_batches_tracked", "2.weight", "2.bias"
    ]
    assert isinstance(cifar[0], torch.nn.BatchNorm1d) and isinstance(cifar[1], torch.nn.Dropout)
    assert cifar[1].p == 0.5
    assert torch.all(cifar[0].weight == 1) and torch.all(cifar[0].bias == 0)
    assert tuple(cifar[2].weight.shape) == (128, 64) and torch.all(cifar[2].bias == 0)
    bound = 1 / math.sqrt(64)  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert cifar[2].weight.abs().max() <= bound and cifar[2].weight.std() > bound / 3
    imagenet = make_projector(512, 2048, "imagenet")
    assert torch.all(imagenet[0].weight == 1) and torch.all(imagenet[0].bias == 0)
    assert imagenet[2].weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert imagenet[2].weight.mean().abs() < 1e-4
    assert imagenet[2].bias.std().item() == pytest.approx(0.01, rel=0.1)
    imagenet.eval()
    assert imagenet(torch.randn(3, 512)).shape == (3, 2048)
    with pytest.raises(MdistillerError, match="projector init must be one of"):
        make_projector(4, 8, "kaiming")


# ---- the distillers ----

def _models(student: str, teacher: str):
    torch.manual_seed(0)
    return cifar_model_dict[student][0](num_classes=100), cifar_model_dict[teacher][0](num_classes=100)


def _centres_file(folder, dim: int, classes: int = 100, seed: int = 0) -> str:
    path = str(folder / f"centres_{dim}_{classes}.json")
    save_centres(path, torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)).double())
    return path


def _batch(seed: int = 0, batch: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 100, (batch,), generator=gen)


@pytest.mark.parametrize("kind", ["KDPP", "DKDPP"])
def test_distiller_losses_are_the_pure_functions_on_their_outputs(tmp_path, kind):
    student, teacher = _models("wrn_16_1", "wrn_16_2")  # 64 -> 128: with a projector
    centres = _centres_file(tmp_path, 128)
    if kind == "KDPP":
        distiller = KDPP(student, teacher, centers=centres, ce_weight=0.5, kd_weight=3.5, temperature=4.0,
                         nd_weight=2.0, warmup=20.0)
    else:
        distiller = DKDPP(student, teacher, centers=centres, ce_weight=0.5, alpha=2.0, beta=8.0, temperature=4.0,
                          nd_weight=0.5, warmup=20.0)
    distiller.train()
    image, target = _batch()
    torch.manual_seed(1)  # the projector's dropout
    logits, losses = distiller.forward_train(image, target, epoch=6)
    assert set(losses) == {"loss_ce", "loss_kd", "loss_nd"}
    torch.manual_seed(1)
    with torch.no_grad():
        z_s, f_s = distiller.student(image)
        z_t, f_t = distiller.teacher(image)
        s_emb = distiller.projector(f_s["pooled_feat"])
    warm = 5 / 20  # epoch 6 is the authors' 0-based epoch 5
    if kind == "KDPP":
        kd = 3.5 * kd_loss(z_s, z_t, 4.0)
        nd = 2.0 * nd_loss(s_emb, f_t["pooled_feat"], load_centres(centres, 100, 128), target)
    else:
        kd = dkd_loss(z_s, z_t, target, 2.0, 8.0, 4.0)
        nd = 0.5 * nd_loss(s_emb, f_t["pooled_feat"], load_centres(centres, 100, 128), target)
    assert torch.allclose(losses["loss_kd"], warm * kd, rtol=1e-5, atol=0)
    assert torch.allclose(losses["loss_nd"], nd, rtol=1e-5, atol=0)  # CIFAR: ND never warmed up
    assert torch.allclose(losses["loss_ce"], 0.5 * torch.nn.functional.cross_entropy(z_s, target), rtol=1e-6)


def test_first_epoch_has_no_kd_term_and_dkdpp_nd_warmup(tmp_path):
    student, teacher = _models("resnet8", "resnet20")  # 64 = 64: no projector
    centres = _centres_file(tmp_path, 64)
    kdpp = KDPP(student, teacher, centers=centres).train()
    image, target = _batch(2)
    assert kdpp.forward_train(image, target, epoch=1)[1]["loss_kd"].item() == 0.0
    plain = DKDPP(*_models("resnet8", "resnet20"), centers=centres).train()
    warmed = DKDPP(*_models("resnet8", "resnet20"), centers=centres, nd_warmup=True).train()
    nd_plain = plain.forward_train(image, target, epoch=3)[1]["loss_nd"]
    nd_warmed = warmed.forward_train(image, target, epoch=3)[1]["loss_nd"]
    assert nd_warmed.item() == pytest.approx(2 / 20 * nd_plain.item(), rel=1e-6)


def test_gradients_reach_the_student_and_the_projector_never_the_teacher(tmp_path):
    student, teacher = _models("wrn_16_1", "wrn_16_2")
    distiller = DKDPP(student, teacher, centers=_centres_file(tmp_path, 128)).train()
    image, target = _batch(3)
    _, losses = distiller.forward_train(image, target, epoch=30)
    sum(losses.values()).backward()
    learnable = {n for n, p in distiller.named_parameters() if not n.startswith("teacher.")}
    assert {n for n in learnable if not n.startswith("student.")} == {
        "projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"}
    assert all(distiller.get_parameter(n).grad is not None for n in learnable)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in distiller.get_learnable_parameters()} == {id(distiller.get_parameter(n)) for n in learnable}
    assert not distiller.class_centres.requires_grad


def test_projector_only_when_the_sizes_differ_and_the_state_names(tmp_path):
    same = KDPP(*_models("resnet8", "resnet20"), centers=_centres_file(tmp_path, 64))
    assert same.projector is None
    assert {k for k in same.state_dict() if not k.startswith(("student.", "teacher."))} == {"class_centres"}
    projected = KDPP(*_models("wrn_16_1", "wrn_16_2"), centers=_centres_file(tmp_path, 128))
    state = projected.state_dict()
    assert {k for k in state if not k.startswith(("student.", "teacher."))} == {
        "projector.0.weight", "projector.0.bias", "projector.0.running_mean", "projector.0.running_var",
        "projector.0.num_batches_tracked", "projector.2.weight", "projector.2.bias", "class_centres"}
    assert tuple(state["projector.2.weight"].shape) == (128, 64)
    fresh = KDPP(*_models("wrn_16_1", "wrn_16_2"), centers=_centres_file(tmp_path, 128, seed=1))
    fresh.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    assert torch.equal(fresh.class_centres, projected.class_centres)  # a resumed run keeps the centres it began with


def test_reinit_student_reproduces_the_wrappers_init_loop(tmp_path):
    centres = _centres_file(tmp_path, 128)
    zoo_student, _ = _models("resnet8", "wrn_16_2")  # 64 -> 128; the CIFAR ResNets keep PyTorch's Linear init
    assert zoo_student.fc.bias.abs().sum() > 0
    quirk = KDPP(*_models("resnet8", "wrn_16_2"), centers=centres)
    assert torch.all(quirk.student.fc.bias == 0)  # CIFAR: the Linear biases zeroed, weights kept
    assert torch.equal(quirk.student.fc.weight, zoo_student.fc.weight)
    clean = KDPP(*_models("resnet8", "wrn_16_2"), centers=centres, reinit_student=False)
    assert torch.equal(clean.student.fc.bias, zoo_student.fc.bias)
    imagenet = KDPP(*_models("resnet8", "wrn_16_2"), centers=centres, projector_init="imagenet")
    assert imagenet.student.fc.weight.std().item() == pytest.approx(0.01, rel=0.1)
    no_projector = KDPP(*_models("resnet8", "resnet20"), centers=_centres_file(tmp_path, 64))
    assert torch.equal(no_projector.student.fc.bias, _models("resnet8", "resnet20")[0].fc.bias)


def test_config_refusals_are_one_line(tmp_path):
    cfg = load_cfg(str(REPO / "configs/cifar100/kdpp/resnet32x4_resnet8x4.yaml"))
    assert (cfg.KDPP.KD_WEIGHT, cfg.KDPP.ND_WEIGHT, cfg.KDPP.T, cfg.KDPP.WARMUP) == (3.5, 2.0, 4.0, 20.0)
    cfg.KDPP.CENTERS = ""
    with pytest.raises(MdistillerError, match=r"KDPP.CENTERS is empty: .*python tools/kdpp_centers.py -o "
                                              r"kdpp_centers/cifar100/resnet32x4/center_emb_train.json"):
        KDPP.hparams(cfg)
    cfg.KDPP.CENTERS = str(tmp_path / "none.json")
    with pytest.raises(MdistillerError, match="none.json: no such file. Make it with python tools/kdpp_centers.py"):
        KDPP.hparams(cfg)
    cfg.KDPP.CENTERS = _centres_file(tmp_path, 64)  # resnet32x4 pools 256 features
    hparams = KDPP.hparams(cfg)
    assert hparams["projector_init"] == "cifar" and hparams["reinit_student"] is True
    with pytest.raises(MdistillerError, match="class 0 has a centre of size 64, the teacher's embedding has 256"):
        KDPP(*_models("resnet8x4", "resnet32x4"), cfg)
    cfg.KDPP.CENTERS = _centres_file(tmp_path, 256, classes=10)
    with pytest.raises(MdistillerError, match="has 10 classes, the teacher has 100"):
        KDPP(*_models("resnet8x4", "resnet32x4"), cfg)
    with pytest.raises(MdistillerError, match="refused for KDPP and DKDPP"):
        apply_logit_stand_flags(cfg, 2.0, 9.0)
    imagenet = load_cfg(str(REPO / "configs/imagenet/r50_mv1/dkdpp.yaml"))
    imagenet.DKDPP.CENTERS = _centres_file(tmp_path, 2048)
    hparams = DKDPP.hparams(imagenet)
    assert (hparams["projector_init"], hparams["nd_warmup"], hparams["warmup"]) == ("imagenet", True, 5.0)


def test_teacher_reads_features_so_the_cache_refuses_it():
    uses = KDPP.declares.teacher_uses({})
    assert uses == {"image": frozenset({"logits", "features"})}
