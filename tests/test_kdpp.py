"""KD++ / DKD++ pieces: the ND loss (hand computation, closed forms, where its gradient goes), the 0-based warm-up,
class centres with the authors' rounding, the centre JSON (round trip, refusals), the projector (keys, inits)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdistiller.distillers.kdpp import class_centres, kdpp_warmup, load_centres, make_projector, nd_loss, save_centres
from mdistiller.errors import MdistillerError

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
