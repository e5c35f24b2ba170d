"""One battery for every registered method (timm's test_models idea): its config section round-trips through CFG,
`from_config` reads only the sections it declares, and what it builds and returns matches its Declaration."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from yacs.config import CfgNode as CN

from mdistiller.dataset.contrastive import ContrastiveSampler
from mdistiller.distillers import Declaration, distiller_dict, method_sections
from mdistiller.distillers.config import Key, iter_keys, lookup
from mdistiller.distillers.kdpp import embedding_size, save_centres
from mdistiller.engine.build import build_kwargs
from mdistiller.engine.cfg import CFG, cfg_text, load_cfg
from mdistiller.models import cifar_model_dict

REPO = Path(__file__).resolve().parents[1]
SHARED_SECTIONS = ("EXPERIMENT", "DATASET", "DISTILLER", "SOLVER", "LOG", "DISTRIBUTED")
# the project's methods (tests register stand-ins of their own, which this battery leaves out)
METHODS = sorted(name for name, cls in distiller_dict.items() if cls.__module__.startswith("mdistiller.distillers."))


class RecordingConfig:
    """A read-only view of a config that records the full name of every key read through it."""

    def __init__(self, node: CN, reads: set[str], prefix: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_prefix", prefix)

    def _get(self, key: str):
        value = self._node[key]
        full = self._prefix + key
        if isinstance(value, CN):
            return RecordingConfig(value, self._reads, full + ".")
        self._reads.add(full)
        return value

    def __getattr__(self, key: str):
        if key not in self._node:
            raise AttributeError(key)
        return self._get(key)

    def __getitem__(self, key: str):
        return self._get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._node

    def __setattr__(self, key: str, value) -> None:
        raise AssertionError(f"from_config wrote {self._prefix}{key}")


@cache
def _configs_by_type() -> dict[str, Path]:
    """The first shipped CIFAR-100 config of each DISTILLER.TYPE (a resnet8x4 student preferred: small)."""
    found: dict[str, Path] = {}
    for path in sorted((REPO / "configs/cifar100").rglob("*.yaml"), key=lambda p: ("resnet8x4" not in p.name, p)):
        if "sweeps" in path.parts:
            continue
        kind = load_cfg(str(path)).DISTILLER.TYPE
        found.setdefault(kind, path)
    return found


def test_every_method_declares_itself_and_its_sections_exist():
    sections = method_sections()
    assert "KD" in METHODS and "CRD" in METHODS
    for name in METHODS:
        declares = distiller_dict[name].declares
        assert isinstance(declares, Declaration), name
        assert declares.loss_terms, f"{name} declares no loss terms"
        for section in declares.config_sections:
            assert section in sections, f"{name} reads section {section}, which no module declares"
    assert not set(sections) & set(SHARED_SECTIONS)


def test_method_sections_round_trip_through_cfg(tmp_path):
    for name, spec in method_sections().items():
        for full_key, key in iter_keys(spec, name):
            assert isinstance(key, Key)
            assert lookup(CFG, full_key) == key.default, full_key
    dumped = tmp_path / "defaults.yaml"
    dumped.write_text(cfg_text(CFG))
    assert cfg_text(load_cfg(str(dumped))) == cfg_text(CFG)


def _stand_in_files(cfg: CN, folder: Path) -> None:
    """A file a shipped config names that a clone lacks, made from the real teacher by a tool (KD++'s class centres,
    tools/kdpp_centers.py): a random stand-in of the right size in `folder`."""
    if cfg.DISTILLER.TYPE in ("KDPP", "DKDPP"):
        teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100)
        path = folder / "center_emb_train.json"
        save_centres(str(path), torch.randn(100, embedding_size(teacher)))
        cfg[cfg.DISTILLER.TYPE].CENTERS = str(path)


@pytest.mark.parametrize("name", METHODS)
def test_from_config_reads_only_declared_sections(name, tmp_path):
    cls = distiller_dict[name]
    reads: set[str] = set()
    config = _configs_by_type().get(name)
    cfg = load_cfg(str(config)) if config else CFG.clone()
    cfg.DISTILLER.TYPE = name
    _stand_in_files(cfg, tmp_path)
    cls.hparams(RecordingConfig(cfg, reads))
    allowed = set(SHARED_SECTIONS) | set(cls.declares.config_sections)
    undeclared = sorted(key for key in reads if key.split(".")[0] not in allowed)
    assert not undeclared, f"{name}.from_config reads {undeclared} outside its declared sections"
    own = set(cls.declares.config_sections) & set(method_sections())
    assert any(key.split(".")[0] in own for key in reads) or not own, f"{name} reads none of its sections"


@pytest.mark.parametrize("name", [m for m in METHODS if m != "NONE"])
def test_every_method_has_a_shipped_cifar_config(name):
    assert name in _configs_by_type(), f"no configs/cifar100/**.yaml has DISTILLER.TYPE {name}"


@pytest.mark.parametrize("name", METHODS)
def test_what_a_method_builds_and_returns_matches_its_declaration(name, one_thread, tmp_path):
    cls = distiller_dict[name]
    declares = cls.declares
    cfg = load_cfg(str(_configs_by_type()[name])) if name in _configs_by_type() else CFG.clone()
    _stand_in_files(cfg, tmp_path)
    if "CRD" in cfg:
        cfg.CRD.NCE.K = 16  # a small memory draw; the declaration is what is checked
    torch.manual_seed(0)
    student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
    teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100) if declares.requires_teacher else None
    distiller = cls(student, teacher, cfg, **build_kwargs(cls, num_data=64))
    distiller.train()

    extra = {child for child, _ in distiller.named_extra_modules()}
    assert extra <= set(declares.extra_modules), f"{name} builds undeclared modules {sorted(extra)}"
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    if teacher is not None:
        assert not learnable & {id(p) for p in teacher.parameters()}

    image = torch.randn(4, 3, 32, 32)
    target = torch.tensor([0, 1, 2, 3])
    batch = {key: image for key in declares.train_views} | {"target": target, "index": torch.arange(4)}
    needs = cls.batch_needs_of(cfg)
    if "contrastive_index" in needs:
        labels = torch.arange(64) % 10
        batch["contrastive_index"] = ContrastiveSampler(labels, needs["contrastive_index"]["k"]).draw(
            batch["index"], labels[:4])
    logits, losses = distiller.forward_train(**batch, epoch=1)
    assert logits.shape == (4, 100)
    assert losses and set(losses) <= set(declares.loss_terms), f"{name} returned {sorted(losses)}"
    assert all(torch.isfinite(v).all() for v in losses.values())
    teacher_reads = declares.teacher_uses(cls.hparams(cfg))
    assert set(teacher_reads) <= set(declares.train_views)
    assert (teacher_reads == {}) == (not declares.requires_teacher)


def test_the_trainer_refuses_a_loss_term_the_method_does_not_declare(tmp_path):
    from mdistiller.distillers import Distiller, cross_entropy
    from mdistiller.engine.trainer import Trainer
    from mdistiller.errors import MdistillerError

    class Undeclared(Distiller):
        declares = Declaration(loss_terms=("loss_ce",), requires_teacher=False)

        def forward_train(self, image, target, **batch):
            logits, _ = self.student(image)
            return logits, {"loss_ce": cross_entropy(logits, target), "loss_extra": logits.square().mean()}

    distiller = Undeclared(cifar_model_dict["resnet8"][0](num_classes=10))
    trainer = Trainer(str(tmp_path), distiller, (), [], CFG.clone(), torch.device("cpu"))
    batch = {"image": torch.randn(2, 3, 32, 32), "target": torch.tensor([0, 1]), "index": torch.arange(2)}
    with pytest.raises(MdistillerError, match="returned loss term\\(s\\) loss_extra that its Declaration.loss_terms"):
        trainer.train_step(batch, 1)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_builds_from_plain_values_as_from_its_config(name, tmp_path):
    """`Method(student, teacher, **hyperparameters)` (no config) builds what `Method(student, teacher, cfg)` builds."""
    cls = distiller_dict[name]
    cfg = load_cfg(str(_configs_by_type()[name])) if name in _configs_by_type() else CFG.clone()
    if "CRD" in cfg:
        cfg.CRD.NCE.K = 16
    _stand_in_files(cfg, tmp_path)
    built = []
    for from_config in (True, False):
        torch.manual_seed(0)
        student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=100)
        teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=100) if cls.declares.requires_teacher else None
        facts = build_kwargs(cls, num_data=64)
        if from_config:
            built.append(cls(student, teacher, cfg, **facts))
        else:
            built.append(cls(student, teacher, **cls.hparams(cfg), **facts))
    a, b = (d.state_dict() for d in built)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
