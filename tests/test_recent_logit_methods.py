"""DIST, TTM, WTTM, NKD and RLD as distillers: their losses are the pure functions' on the same logits, gradients
reach exactly the student, state dicts round-trip strictly, the teacher-output cache trains them exactly as the live
teacher, the configs and published numbers agree, logit standardisation is refused where the authors never use it,
and each CIFAR config trains one epoch through tools/train.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_logit_family_cli import _train
from test_teacher_cache import _cfg, _one_epoch, cachenet, data_root, fp32_cache, teacher_file  # noqa: F401

from mdistiller.analysis.published import published_top1
from mdistiller.cli import train as train_tool
from mdistiller.distillers import get_distiller_class
from mdistiller.distillers.dist import dist_loss
from mdistiller.distillers.logit_stand import standardize_logits
from mdistiller.distillers.nkd import nkd_loss
from mdistiller.distillers.rld import rld_loss
from mdistiller.distillers.ttm import ttm_loss, wttm_loss
from mdistiller.engine.cfg import default_cfg, load_cfg
from mdistiller.engine.teacher_cache import cache_plan
from mdistiller.engine.validate import check_recipe
from mdistiller.errors import MdistillerError
from mdistiller.models import cifar_model_dict

from conftest import REPO, run_overrides

# test_teacher_cache's fixtures (a tiny zoo-registered CNN, 16 images of data, its fp32 cache) serve the cache test

METHODS = ("DIST", "TTM", "WTTM", "NKD", "RLD")
# non-default hyperparameters, so that a wrongly wired one shows
HPARAMS = {
    "DIST": {"ce_weight": 0.7, "kd_weight": 1.3, "beta": 0.5, "gamma": 2.0, "tau": 3.0},
    "TTM": {"ce_weight": 0.8, "kd_weight": 5.0, "power": 0.3},
    "WTTM": {"ce_weight": 0.8, "kd_weight": 3.0, "power": 0.4},
    "NKD": {"ce_weight": 0.9, "temperature": 2.0, "gamma": 2.5},
    "RLD": {"ce_weight": 0.6, "alpha": 1.5, "beta": 6.0, "alpha_temperature": 2.0, "temperature": 3.0, "warmup": 4},
}


def _expected_kd(method: str, hp: dict, z_s, z_t, target, epoch: int, logit_stand: bool = False) -> torch.Tensor:
    """The distillation term from the pure loss functions, wired by hand."""
    if method == "DIST":
        return hp["kd_weight"] * dist_loss(z_s, z_t, hp["beta"], hp["gamma"], hp["tau"])
    if method == "TTM":
        return hp["kd_weight"] * ttm_loss(z_s, z_t, hp["power"])
    if method == "WTTM":
        return hp["kd_weight"] * wttm_loss(z_s, z_t, hp["power"])
    if method == "NKD":
        return nkd_loss(z_s, z_t, target, hp["temperature"], hp["gamma"])
    if logit_stand:
        z_s, z_t = standardize_logits(z_s), standardize_logits(z_t)
    return min(epoch / hp["warmup"], 1.0) * rld_loss(z_s, z_t, target, hp["alpha"], hp["beta"],
                                                     hp["alpha_temperature"], hp["temperature"])


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    return cifar_model_dict["resnet8"][0](num_classes=10), cifar_model_dict["resnet8"][0](num_classes=10)


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 32, 32, generator=generator), torch.tensor([0, 3, 3, 7, 9, 1])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("served", [False, True], ids=["live", "cached"])
def test_distiller_losses_are_the_pure_functions_on_the_same_logits(method, served, one_thread):
    student, teacher = _pair()
    distiller = get_distiller_class(method)(student, teacher, **HPARAMS[method]).train()
    image, target = _batch()
    with torch.no_grad():
        z_t = teacher.eval()(image)[0]
    batch = {"teacher_logits": z_t.clone()} if served else {}
    z_s, losses = distiller(image=image, target=target, epoch=2, **batch)
    assert set(losses) == set(distiller.declares.loss_terms) == {"loss_ce", "loss_kd"}
    hp = HPARAMS[method]
    torch.testing.assert_close(losses["loss_ce"], hp["ce_weight"] * F.cross_entropy(z_s, target), rtol=0, atol=0)
    torch.testing.assert_close(losses["loss_kd"], _expected_kd(method, hp, z_s, z_t, target, epoch=2),
                               rtol=1e-6, atol=1e-6)


def test_rld_with_logit_standardisation_z_scores_the_kd_term_only(one_thread):
    student, teacher = _pair()
    distiller = get_distiller_class("RLD")(student, teacher, **HPARAMS["RLD"], logit_stand=True).train()
    image, target = _batch()
    with torch.no_grad():
        z_t = teacher.eval()(image)[0]
    z_s, losses = distiller(image=image, target=target, epoch=5)
    torch.testing.assert_close(losses["loss_ce"], 0.6 * F.cross_entropy(z_s, target), rtol=0, atol=0)  # raw logits
    expected = _expected_kd("RLD", HPARAMS["RLD"], z_s, z_t, target, epoch=5, logit_stand=True)
    torch.testing.assert_close(losses["loss_kd"], expected, rtol=1e-6, atol=1e-6)
    raw = _expected_kd("RLD", HPARAMS["RLD"], z_s, z_t, target, epoch=5)
    assert not torch.allclose(expected, raw)  # standardisation changes the term: not a vacuous check


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_exactly_the_student(method, one_thread):
    student, teacher = _pair()
    distiller = get_distiller_class(method)(student, teacher, **HPARAMS[method]).train()
    image, target = _batch()
    _, losses = distiller(image=image, target=target, epoch=10)
    losses["loss_kd"].backward()  # the distillation term alone reaches the student too
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    assert learnable == {id(p) for p in student.parameters()} and distiller.get_extra_parameters() == 0


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_loads_strictly(method, one_thread):
    source = get_distiller_class(method)(*_pair(0), **HPARAMS[method])
    target = get_distiller_class(method)(*_pair(1), **HPARAMS[method])
    state = source.state_dict()
    assert state and all(k.startswith(("student.", "teacher.")) for k in state)
    target.load_state_dict(state, strict=True)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("method", METHODS)
def test_from_config_reads_every_key_of_its_section(method):
    cfg = default_cfg()
    cfg.DISTILLER.TYPE = method
    keys = {"DIST": ("CE_WEIGHT", "KD_WEIGHT", "BETA", "GAMMA", "TAU"), "TTM": ("CE_WEIGHT", "KD_WEIGHT", "POWER"),
            "WTTM": ("CE_WEIGHT", "KD_WEIGHT", "POWER"), "NKD": ("CE_WEIGHT", "TEMPERATURE", "GAMMA"),
            "RLD": ("CE_WEIGHT", "ALPHA", "BETA", "ALPHA_T", "T", "WARMUP")}[method]
    for i, key in enumerate(keys):
        cfg[method][key] = type(cfg[method][key])(i + 2)  # 2, 3, 4, ... each key its own value
    hparams = get_distiller_class(method).hparams(cfg)
    values = [v for k, v in hparams.items() if k != "logit_stand"]
    assert sorted(values) == list(range(2, 2 + len(keys)))


@pytest.mark.parametrize("method", ["DIST", "TTM", "WTTM", "NKD"])
def test_logit_stand_is_refused_in_one_line(method):
    path = str(REPO / f"configs/cifar100/{method.lower()}/resnet32x4_resnet8x4.yaml")
    with pytest.raises(MdistillerError, match=f"{method} does not take logit standardisation") as flag:
        train_tool.build_cfg(train_tool.parse_args(["--cfg", path, "--logit-stand"]))
    with pytest.raises(MdistillerError, match=f"{method} does not take logit standardisation") as key:
        check_recipe(load_cfg(path, ["EXPERIMENT.LOGIT_STAND", "True"]))
    assert "\n" not in str(flag.value) and str(flag.value) == str(key.value)
    with pytest.raises(MdistillerError, match="not a logit method"):
        get_distiller_class(method)(*_pair(), **HPARAMS[method], logit_stand=True)


@pytest.mark.parametrize("args, message", [
    (["--cfg", "configs/cifar100/dist/resnet32x4_resnet8x4.yaml", "--logit-stand"],
     "DIST does not take logit standardisation"),
    (["--cfg", "configs/cifar100/nkd/resnet32x4_resnet8x4.yaml", "DKD.BETA", "2.0"],
     "DISTILLER.TYPE NKD with DKD.BETA 2.0 is SDD's NKD"),
    (["--cfg", "configs/cifar100/kd/resnet32x4_resnet8x4.yaml", "--same-t"], "applies to DISTILLER.TYPE RLD only"),
], ids=["dist-logit-stand", "nkd-dkd-keys", "kd-same-t"])
def test_refusals_leave_no_run_folder(args, message, tmp_path, cifar100_tiny_root, teacher_ckpt):
    args = [str(REPO / a) if a.endswith(".yaml") else a for a in args]
    overrides = ["DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
                 "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet8")]
    with pytest.raises(MdistillerError) as info:
        train_tool.main([*args, *overrides, *run_overrides(tmp_path, cifar100_tiny_root)])
    assert message in str(info.value) and "\n" not in str(info.value)
    for folder in (tmp_path / "output", tmp_path / "logs"):
        assert not folder.exists() or not any(folder.iterdir())


# ---- the teacher-output cache ----
CACHE_METHODS = {
    "DIST": {},
    "TTM": {},
    "WTTM": {},
    "NKD": {},
    "RLD": {"RLD__WARMUP": 1},
    "RLD+LS": {"RLD__WARMUP": 1, "EXPERIMENT__LOGIT_STAND": True, "RLD__T": 2.0, "RLD__ALPHA_T": 2.0},
}


@pytest.mark.parametrize("method", list(CACHE_METHODS))
def test_training_with_the_cache_equals_training_with_the_live_teacher(method, fp32_cache, data_root,  # noqa: F811
                                                                       teacher_file, tmp_path,  # noqa: F811
                                                                       monkeypatch, one_thread):
    distiller_type = method.split("+")[0]
    live_cfg = _cfg(data_root, teacher_file, "", distiller_type, **CACHE_METHODS[method])
    cached_cfg = _cfg(data_root, teacher_file, fp32_cache, distiller_type, **CACHE_METHODS[method])
    check_recipe(cached_cfg)
    distiller_class = get_distiller_class(distiller_type)
    assert cache_plan(cached_cfg, distiller_class)[2] == ()  # every teacher read served: no live view
    live_losses, live_weights, _ = _one_epoch(live_cfg, tmp_path / "live")

    def no_teacher(self, image):
        raise AssertionError("the teacher ran although the cache serves its logits")

    monkeypatch.setattr(distiller_class, "teacher_forward", no_teacher)
    cached_losses, cached_weights, trainer = _one_epoch(cached_cfg, tmp_path / "cached")
    assert trainer.distiller.teacher is None  # never placed on the device
    assert len(cached_losses) == len(live_losses) == 2
    # bitwise: on one CPU thread the cached rows are the live teacher's logits to the bit, and so is every step
    for live, cached in zip(live_losses, cached_losses):
        assert live.keys() == cached.keys() == {"loss_ce", "loss_kd"}
        for key in live:
            assert live[key] == cached[key], (key, live[key], cached[key])
    for key, value in live_weights.items():
        assert torch.equal(cached_weights[key], value), key


# ---- configs and published numbers ----
CIFAR_PAIRS_13 = {"wrn_40_2_wrn_16_2", "wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet110_resnet20",
                  "resnet110_resnet32", "resnet32x4_resnet8x4", "vgg13_vgg8", "vgg13_MobileNetV2",
                  "ResNet50_MobileNetV2", "ResNet50_vgg8", "resnet32x4_ShuffleV1", "resnet32x4_ShuffleV2",
                  "wrn_40_2_ShuffleV1"}
MOBILE = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
CIFAR_CONFIGS = sorted(p for m in METHODS for p in (REPO / "configs/cifar100" / m.lower()).glob("*.yaml"))
IMAGENET_CONFIGS = sorted(p for m in METHODS for p in (REPO / "configs/imagenet").glob(f"*/{m.lower()}.yaml"))


def test_every_published_pair_has_a_config():
    names = {m: {p.stem for p in (REPO / "configs/cifar100" / m.lower()).glob("*.yaml")} for m in METHODS}
    assert names["DIST"] == names["TTM"] == names["WTTM"] == CIFAR_PAIRS_13
    assert names["RLD"] == {p.stem for p in (REPO / "configs/cifar100/dkd").glob("*.yaml")} and len(names["RLD"]) == 14
    assert names["NKD"] == {"resnet32x4_resnet8x4"}
    imagenet = {(p.parent.name, p.stem) for p in IMAGENET_CONFIGS}
    assert imagenet == {(pair, m) for pair in ("r34_r18", "r50_mv1") for m in ("dist", "wttm", "nkd", "rld")}


def _header(path: Path) -> str:
    return path.read_text().split("EXPERIMENT:")[0]


@pytest.mark.parametrize("path", CIFAR_CONFIGS + IMAGENET_CONFIGS, ids=lambda p: "/".join(p.parts[-2:]))
def test_config_header_recipe_and_published_number(path: Path):
    cfg = load_cfg(str(path))
    check_recipe(cfg)
    method = cfg.DISTILLER.TYPE
    header = _header(path)
    assert all(len(line) <= 120 for line in path.read_text().splitlines())
    if path.parts[-3] == "cifar100":
        assert path.parent.name == method.lower() and path.stem == f"{cfg.DISTILLER.TEACHER}_{cfg.DISTILLER.STUDENT}"
        assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.WEIGHT_DECAY) == (240, 64, 5e-4)
        assert cfg.SOLVER.LR == (0.01 if cfg.DISTILLER.STUDENT in MOBILE else 0.05)
        assert list(cfg.SOLVER.LR_DECAY_STAGES) == [150, 180, 210]
    else:
        assert path.stem == method.lower() and cfg.DATASET.TYPE == "imagenet"
    published = published_top1(method, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
    match = re.search(rf"# Published top-1: {method} (\d+\.\d+)", header)
    if method == "RLD":
        assert "Published top-1: owed" in header and published is None and "--same-t" in header
    elif published is None:
        assert method == "NKD" and "no published number" in header
    else:
        assert match and float(match.group(1)) == published.top1
    if method in ("TTM", "WTTM"):
        assert "OWED" in header and "appendix A.4" in header
        defaults = {"TTM": (45.0, 0.1), "WTTM": (4.0, 0.2)}[method]
        assert (cfg[method].KD_WEIGHT, cfg[method].POWER) == defaults
    if method == "DIST":
        assert "local batch" in header or "per rank" in header
        assert cfg.DIST.TAU == (4.0 if path.parts[-3] == "cifar100" else 1.0) and cfg.DIST.KD_WEIGHT == 2.0


def test_rld_cifar_configs_set_no_rld_key_and_imagenet_ones_the_authors_values():
    for path in (REPO / "configs/cifar100/rld").glob("*.yaml"):
        assert "RLD" not in yaml.safe_load(path.read_text())  # the authors' files set none: the command line does
    for pair, beta in (("r34_r18", 0.5), ("r50_mv1", 2.0)):
        cfg = load_cfg(str(REPO / f"configs/imagenet/{pair}/rld.yaml"))
        assert (cfg.RLD.ALPHA, cfg.RLD.BETA, cfg.RLD.T, cfg.RLD.ALPHA_T, cfg.RLD.WARMUP) == (1.0, beta, 1.0, 1.0, 1)
        assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.LR) == (512, 0.2)


# ---- one epoch through tools/train.py ----
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_cifar_config_trains_one_epoch_through_the_cli(method, tmp_path, cifar100_root, teacher_ckpt):
    config = f"configs/cifar100/{method.lower()}/resnet32x4_resnet8x4.yaml"
    flags = ("--same-t", "RLD.ALPHA", "1.", "RLD.BETA", "8.", "RLD.T", "4.") if method == "RLD" else ()
    run_dir, worklog = _train(tmp_path, cifar100_root, teacher_ckpt("resnet20"), config, *flags)
    assert "loss_kd" in worklog and "loss_ce" in worklog
    dumped = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert dumped["DISTILLER"]["TYPE"] == method
    if method == "RLD":  # --same-t recorded where the run describes itself
        assert dumped["RLD"]["ALPHA_T"] == dumped["RLD"]["T"] == 4.0 and "RLD.ALPHA_T:4" in run_dir.name
