"""The data side's registries: data set types, views and batch needs register themselves; one builder signature;
unknown or duplicate names are one-line errors; the package finds its modules without a list."""

from __future__ import annotations

import ast
import inspect
import os
import sys
import typing

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import mdistiller.dataset as data
import mdistiller.detection  # noqa: F401  (registers "coco"; imported here so the names do not depend on test order)
from mdistiller.dataset import (
    BATCH_NEEDS,
    DATASETS,
    IMAGENET_VIEWS,
    TINY_IMAGENET_VIEWS,
    TRAIN_VIEWS,
    DataRequest,
    Registry,
    check_batch_needs,
    check_data,
    get_dataset,
    get_test_set,
    num_classes_of,
    register_dataset,
)
from mdistiller.dataset.cifar import read_cifar_split
from mdistiller.dataset.registry import import_submodules
from mdistiller.engine.cfg import default_cfg
from mdistiller.errors import MdistillerError

PACKAGE_DIR = os.path.dirname(data.__file__)


def _cfg(dataset: str, root: str = "unused", batch: int = 4):
    cfg = default_cfg()
    cfg.DATASET.TYPE = dataset
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_WORKERS = 0
    cfg.SOLVER.BATCH_SIZE = batch
    cfg.DATASET.TEST.BATCH_SIZE = batch
    return cfg


@pytest.fixture
def cleanup():
    """Registrations made by a test, undone after it: call cleanup(registry, name)."""
    made: list[tuple[Registry, str]] = []
    yield lambda registry, name: made.append((registry, name))
    for registry, name in made:
        if name in registry:
            registry.unregister(name)


# ---- the registry type ----

def test_registry_registers_by_decorator_or_value_and_lists_sorted():
    reg: Registry = Registry("colour")

    @reg.register("red")
    def red():
        return "r"

    assert reg.register("blue", "b") == "b"
    assert red() == "r" and reg.get("red") is red and reg["blue"] == "b"
    assert reg.names() == ["blue", "red"] == list(reg) and len(reg) == 2
    assert "red" in reg and "green" not in reg
    assert reg.items() == [("blue", "b"), ("red", red)]
    assert reg.unregister("blue") == "b" and reg.names() == ["red"]


def test_duplicate_registration_is_refused_naming_both():
    reg: Registry = Registry("colour")
    reg.register("red", "first")
    with pytest.raises(MdistillerError, match=r"^colour 'red' is registered twice") as exc:
        reg.register("red", "second")
    assert "\n" not in str(exc.value)
    assert reg.get("red") == "first"  # the first registration stands


def test_registering_a_shipped_data_set_type_or_view_again_is_refused():
    with pytest.raises(MdistillerError, match=r"DATASET.TYPE 'cifar100' is registered twice \(first by "
                                              r"mdistiller\.dataset\.cifar_sets\.build_cifar_datasets"):
        register_dataset("cifar100", num_classes=lambda cfg: 1, test_set=lambda cfg: None)(lambda cfg, request: None)
    with pytest.raises(MdistillerError, match="training view 'standard' is registered twice"):
        TRAIN_VIEWS.register("standard")(lambda mean, std: None)
    with pytest.raises(MdistillerError, match="batch need 'view_id' is registered twice"):
        BATCH_NEEDS.register("view_id", "again")
    assert DATASETS.get("cifar100").build.__name__ == "build_cifar_datasets"


def test_unknown_name_is_one_line_with_did_you_mean_and_the_known_names():
    reg: Registry = Registry("colour")
    reg.register("red", 1)
    reg.register("green", 2)
    with pytest.raises(MdistillerError) as exc:
        reg.get("gren")
    assert str(exc.value) == "unknown colour 'gren' (did you mean green?); known: green, red"
    with pytest.raises(MdistillerError) as exc:
        reg["purple"]  # nothing close: no hint
    assert str(exc.value) == "unknown colour 'purple'; known: green, red"
    with pytest.raises(MdistillerError, match="; known: none$"):
        Registry("colour").get("red")


# ---- the shipped registries ----

def test_the_shipped_names_are_registered():
    assert DATASETS.names() == ["cifar10", "cifar100", "coco", "imagenet", "tiny_imagenet"]
    assert [name for name, entry in DATASETS.items() if entry.task == "detection"] == ["coco"]
    assert {"standard", "strong", "test"} <= set(TRAIN_VIEWS)
    assert {"standard", "strong", "test", "deit"} <= set(IMAGENET_VIEWS)
    assert {"standard", "test"} <= set(TINY_IMAGENET_VIEWS)
    assert BATCH_NEEDS.names() == ["contrastive_index", "view_id"]
    assert all(isinstance(text, str) and text and "\n" not in text for _, text in BATCH_NEEDS.items())


def test_every_registered_builder_has_the_one_signature():
    for name, entry in DATASETS.items():
        assert entry.name == name
        params = list(inspect.signature(entry.build).parameters)
        assert params == ["cfg", "request"], (name, params)
        hints = typing.get_type_hints(entry.build, vars(sys.modules[entry.build.__module__]))
        assert hints["request"] is DataRequest, name
        for hook in (entry.num_classes, entry.test_set, entry.check):
            if hook is not None:
                assert list(inspect.signature(hook).parameters) == ["cfg"], (name, hook)
        for loaders in (entry.device_loaders, entry.loaders):
            if loaders is not None:
                assert list(inspect.signature(loaders).parameters) == [
                    "cfg", "train_set", "test_set", "request", "needs", "seed", "rank", "world_size"], name


def test_every_view_of_a_family_takes_its_familys_arguments():
    families = {TRAIN_VIEWS: ["mean", "std"], TINY_IMAGENET_VIEWS: ["mean", "std"],
                IMAGENET_VIEWS: ["mean", "std", "image_size"]}
    for registry, params in families.items():
        for name, builder in registry.items():
            assert list(inspect.signature(builder).parameters) == params, (registry.what, name)


def test_data_request_defaults_to_the_standard_view_and_is_frozen():
    request = DataRequest()
    assert dict(request.train_views) == {"image": "standard"}
    assert request.device is None and request.record_views is None
    views = {"image": "standard"}
    request = DataRequest(views)
    views["image"] = "strong"  # the request keeps its own read-only copy
    assert request.train_views["image"] == "standard"
    with pytest.raises(TypeError):
        request.train_views["image"] = "strong"
    with pytest.raises(AttributeError):
        request.device = "cuda"


# ---- unknown names through the public functions ----

def test_a_dataset_type_typo_is_one_line_with_did_you_mean():
    for call in (get_dataset, check_data, num_classes_of, get_test_set):
        with pytest.raises(MdistillerError) as exc:
            call(_cfg("cifar1000"))
        message = str(exc.value)
        assert message.startswith("unknown DATASET.TYPE 'cifar1000' (did you mean cifar100?); known: ")
        assert "tiny_imagenet" in message and "\n" not in message


def test_a_view_name_typo_is_one_line_with_did_you_mean(cifar100_root):
    with pytest.raises(MdistillerError) as exc:
        get_dataset(_cfg("cifar100", cifar100_root), {"image": "standard", "image_strong": "stong"})
    assert str(exc.value).startswith("unknown training view 'stong' (did you mean strong?); known: standard, ")
    with pytest.raises(MdistillerError, match=r"^training view 'strnog' has no ImageNet version \(did you mean "
                                              r"strong\?\); ImageNet views: deit, "):
        IMAGENET_VIEWS.get("strnog")
    with pytest.raises(MdistillerError, match=r"^training view 'strong' has no Tiny-ImageNet version; Tiny-ImageNet "
                                              r"views: standard, test$"):
        TINY_IMAGENET_VIEWS.get("strong")


def test_a_batch_need_typo_is_one_line_with_did_you_mean():
    with pytest.raises(MdistillerError, match=r"^the data path cannot serve view_ids \(did you mean view_id\?\) "
                                              r"\(known batch needs: contrastive_index, view_id\)$"):
        check_batch_needs({"view_ids": "image"})


# ---- a data set type and a view registered by a test, used through get_dataset ----

class Ramps(Dataset):
    """n items; item i holds, per batch key, a 1x2x2 image of value i passed through that key's view."""

    def __init__(self, n: int, views: dict):
        self.n, self.views = n, views

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        image = torch.full((1, 2, 2), float(index))
        item = {key: view(image) for key, view in self.views.items()}
        return {**item, "target": index % 3, "index": index}


TOY_VIEWS: Registry = Registry("toy view")
TOY_VIEWS.register("standard", lambda image: image)
TOY_VIEWS.register("negated", lambda image: -image)


def _register_toy(cleanup, seen: list, checked: list) -> None:
    def test_set(cfg):
        return Ramps(5, {"image": TOY_VIEWS.get("standard")})

    def check(cfg):
        checked.append(cfg.DATASET.TYPE)

    @register_dataset("toy_ramps", num_classes=lambda cfg: 3, test_set=test_set, check=check)
    def build_toy(cfg, request: DataRequest):
        seen.append(request)
        views = {key: TOY_VIEWS.get(name) for key, name in request.train_views.items()}
        return Ramps(7, views), test_set(cfg), 3

    cleanup(DATASETS, "toy_ramps")


def test_a_data_set_type_registered_in_a_test_serves_get_dataset(cleanup):
    seen: list[DataRequest] = []
    checked: list[str] = []
    _register_toy(cleanup, seen, checked)
    cfg = _cfg("toy_ramps", batch=7)
    train, val, num_train, num_classes = get_dataset(cfg, {"image": "standard", "image_neg": "negated"}, seed=1)
    assert (num_train, num_classes, len(val.dataset)) == (7, 3, 5)
    (request,) = seen
    assert dict(request.train_views) == {"image": "standard", "image_neg": "negated"}
    assert request.device is None and request.record_views is None
    (batch,) = list(train)
    values = batch["index"].float()
    assert torch.equal(batch["image"][:, 0, 0, 0], values) and torch.equal(batch["image_neg"][:, 0, 1, 1], -values)
    assert sorted(batch["index"].tolist()) == list(range(7))
    assert batch["target"].tolist() == [i % 3 for i in batch["index"].tolist()]
    assert torch.cat([b["index"] for b in val]).tolist() == list(range(5))  # the test split, in order

    check_data(cfg)  # the type's own check runs
    assert checked == ["toy_ramps"]
    assert len(get_test_set(cfg)) == 5
    cfg.DATASET.NUM_CLASSES = 4
    with pytest.raises(MdistillerError, match="DATASET.NUM_CLASSES is 4 but toy_ramps has 3 classes"):
        num_classes_of(cfg)


def test_dataset_augment_reaches_the_builder_in_the_request(cleanup):
    seen: list[DataRequest] = []
    _register_toy(cleanup, seen, [])
    cfg = _cfg("toy_ramps")
    cfg.DATASET.AUGMENT = "negated"
    get_dataset(cfg, {"image": "standard", "other": "negated"}, device="cpu")
    assert dict(seen[0].train_views) == {"image": "negated", "other": "negated"} and seen[0].device == "cpu"


def test_a_view_id_need_is_refused_for_a_type_whose_views_are_not_enumerable(cleanup):
    _register_toy(cleanup, [], [])
    with pytest.raises(MdistillerError, match="the data path cannot give view ids for image: DATASET.TYPE toy_ramps"):
        get_dataset(_cfg("toy_ramps"), needs={"view_id": "image"})


def test_device_resident_data_needs_a_type_with_device_loaders(cleanup):
    _register_toy(cleanup, [], [])
    cfg = _cfg("toy_ramps")
    cfg.DATASET.DEVICE_RESIDENT = True
    assert not data.uses_device_resident_data(cfg, {"image": "standard"}, "cuda")
    cfg.DATASET.TYPE = "cifar100"
    assert data.uses_device_resident_data(cfg, {"image": "standard"}, "cuda")
    cfg.DATASET.TYPE = "cifar1000"  # an unknown type is simply not device resident (get_dataset names it)
    assert not data.uses_device_resident_data(cfg, {"image": "standard"}, "cuda")


def test_cifar_device_loaders_hold_the_sets_and_serve_the_needs(cifar100_root):
    """The hook get_dataset calls on CUDA with DATASET.DEVICE_RESIDENT, run here on the CPU."""
    cfg = _cfg("cifar100", cifar100_root, batch=32)
    cfg.DATASET.TEST.BATCH_SIZE = 50
    entry = DATASETS.get("cifar100")
    request = DataRequest(device="cpu", record_views="image")
    train_set, test_set, _ = entry.build(cfg, request)
    needs = {"contrastive_index": {"k": 5}, "view_id": "image"}
    train, test = entry.device_loaders(cfg, train_set, test_set, request, needs, 3, 0, 1)
    assert (len(train), len(test), cfg.DATASET.TYPE) == (256 // 32, 3, "cifar100")
    batch = next(iter(train))
    assert batch["image"].shape == (32, 3, 32, 32) and batch["contrastive_index"].shape == (32, 6)
    assert torch.equal(batch["contrastive_index"][:, 0], batch["index"])  # mode "exact": the sample itself
    assert batch["view_id"].min() >= 0 and batch["view_id"].max() < 162
    assert torch.equal(torch.cat([b["target"] for b in test]), test_set.labels)
    plain, _ = entry.device_loaders(cfg, train_set, test_set, DataRequest(device="cpu"), {}, 3, 0, 1)
    assert set(next(iter(plain))) == {"image", "target", "index"}


def test_a_cifar_view_registered_in_a_test_is_built_by_get_dataset(cifar100_root, cleanup):
    @TRAIN_VIEWS.register("toy_inverted")
    def inverted(mean: tuple, std: tuple):
        return lambda image: torch.from_numpy(255 - np.asarray(image)).permute(2, 0, 1)

    cleanup(TRAIN_VIEWS, "toy_inverted")
    train, _, _, _ = get_dataset(_cfg("cifar100", cifar100_root, batch=8), {"image": "standard", "inv": "toy_inverted"})
    batch = next(iter(train))
    images, _ = read_cifar_split("cifar100", os.path.join(cifar100_root, "cifar-100-python"), train=True)
    for index, inv in zip(batch["index"].tolist(), batch["inv"]):
        assert torch.equal(inv, torch.from_numpy(255 - images[index]).permute(2, 0, 1))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32


# ---- discovery: no import list, no order ----

def test_every_module_of_the_package_is_imported_with_it():
    modules = {name[:-3] for name in os.listdir(PACKAGE_DIR) if name.endswith(".py") and name != "__init__.py"}
    assert modules and all(f"mdistiller.dataset.{name}" in sys.modules for name in modules)


def test_import_submodules_finds_a_new_module_that_registers_itself(tmp_path, monkeypatch, cleanup):
    package = tmp_path / "toy_data_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ramp_view.py").write_text(
        "from mdistiller.dataset.registry import TRAIN_VIEWS\n\n\n"
        "@TRAIN_VIEWS.register('toy_discovered')\n"
        "def ramp(mean, std):\n"
        "    return lambda image: image\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cleanup(TRAIN_VIEWS, "toy_discovered")
    try:
        import_submodules("toy_data_plugins", [str(package)])
        assert TRAIN_VIEWS.get("toy_discovered").__module__ == "toy_data_plugins.ramp_view"
    finally:
        for name in [m for m in sys.modules if m.startswith("toy_data_plugins")]:
            del sys.modules[name]


def test_no_module_imports_below_a_definition_or_from_the_package_itself():
    """Each module imports first and defines after, and none reads a name from dataset/__init__.py (whose own
    definitions come after every module is imported): registration cannot depend on import order."""
    for name in sorted(os.listdir(PACKAGE_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(PACKAGE_DIR, name)) as f:
            tree = ast.parse(f.read())
        seen_definition = False
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                assert not seen_definition, f"{name}:{node.lineno}: import below a definition"
                from_package = isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None
                assert not from_package, f"{name}:{node.lineno}: imports from the package itself (from . import ...)"
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)):
                seen_definition = True
