"""The CIFAR-100 zoo must match the published checkpoints (`tests/data/cifar_models.json`) exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mdistiller.models.cifar import cifar_model_dict

SPEC: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "cifar_models.json").read_text())
NAMES = list(SPEC)
NO_BN_BEFORE_RELU = {"ShuffleV1", "ShuffleV2"}  # pre-activations are concatenations (as in mdistiller)


def _build(name: str, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(0)
    return cifar_model_dict[name][0](num_classes=num_classes)


def _shapes(tensors: list[torch.Tensor] | None) -> list[list[int]] | None:
    return None if tensors is None else [list(t.shape) for t in tensors]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_zoo_names_and_teacher_paths() -> None:
    assert list(cifar_model_dict) == NAMES
    for name, (builder, path) in cifar_model_dict.items():
        assert callable(builder)
        assert path == SPEC[name]["teacher_checkpoint"], name


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_and_param_count(name: str) -> None:
    model = _build(name)
    got = [[key, list(t.shape)] for key, t in model.state_dict().items()]
    assert got == SPEC[name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == SPEC[name]["params"]


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name: str, images: torch.Tensor) -> None:
    model = _build(name).eval()
    with torch.no_grad():
        logits, feats = model(images)
    assert logits.shape == (2, 100)
    assert set(feats) == {"feats", "preact_feats", "pooled_feat", "prepool"}
    assert _shapes(feats["feats"]) == SPEC[name]["feats"]
    assert _shapes(feats["preact_feats"]) == SPEC[name]["preact_feats"]
    assert list(feats["pooled_feat"].shape) == SPEC[name]["pooled_feat"]

    channels = model.get_stage_channels()
    assert channels == [shape[1] for shape in SPEC[name]["feats"][1:]]
    if name in NO_BN_BEFORE_RELU:
        with pytest.raises(NotImplementedError):
            model.get_bn_before_relu()
    else:
        bns = model.get_bn_before_relu()
        assert [bn.num_features for bn in bns] == channels
        assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert isinstance(model.get_feat_modules(), nn.ModuleList)


@pytest.mark.parametrize("name", NAMES)
def test_other_num_classes_and_train_step(name: str, images: torch.Tensor) -> None:
    model = _build(name, num_classes=10).train()
    logits, _ = model(images)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # every BN sees exactly one batch per forward (feature extraction must not touch running statistics)
    tracked = {k: int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert set(tracked.values()) == {1}


@pytest.mark.parametrize("name", NAMES)
def test_meta_device_construction(name: str) -> None:
    with torch.device("meta"):
        model = cifar_model_dict[name][0](num_classes=100)
    assert all(t.is_meta for t in model.state_dict().values())
    assert [k for k in model.state_dict()] == [k for k, _ in SPEC[name]["state_dict"]]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(name: str, images: torch.Tensor, tmp_path: Path) -> None:
    source = _build(name)
    with torch.no_grad():  # move the BN running statistics away from their initial values
        source.train()(images)
    source.eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": source.state_dict()}, path)

    torch.manual_seed(1)
    target = cifar_model_dict[name][0](num_classes=100)
    target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"], strict=True)
    target.eval()
    with torch.no_grad():
        expected, _ = source(images)
        got, _ = target(images)
    assert torch.equal(got, expected)
