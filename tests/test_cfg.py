"""Config: users' published YAML files load unchanged, our configs build, overrides and LS flags behave as specified."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mdistiller.engine.build import build_model
from mdistiller.engine.cfg import cfg_text, default_cfg, dump_cfg, load_cfg, merge_opts, validate_cfg
from mdistiller.errors import MdistillerError

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CONFIGS = sorted((Path(__file__).parent / "data" / "reference_configs").rglob("*.yaml"))
# run configs (configs/sweeps/ holds sweep files, tested in test_sweep.py; configs/coco/ the detection configs, whose
# models are no classification models: tested in test_detection_configs.py)
OUR_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not {"sweeps", "coco"} & set(p.parts))


def _load_train_tool():
    module = importlib.import_module("mdistiller.cli.train")
    return module


train_tool = _load_train_tool()


def test_reference_config_folder_is_complete():
    repos = {p.relative_to(Path(__file__).parent / "data" / "reference_configs").parts[0] for p in REFERENCE_CONFIGS}
    assert repos == {"mdistiller", "logit-standardization-KD", "WKD"}
    assert len(REFERENCE_CONFIGS) >= 120


@pytest.mark.parametrize("path", REFERENCE_CONFIGS, ids=lambda p: "/".join(p.parts[-4:]))
def test_published_config_loads_unchanged(path):
    cfg = load_cfg(str(path))
    validate_cfg(cfg)
    assert cfg.DISTILLER.TYPE  # every file names a distiller


def test_int_accepted_where_float_expected_and_literal_strings_decoded(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("KD:\n  TEMPERATURE: 1\n  LOSS:\n    KD_WEIGHT: 9\nWKD:\n  INPUT_SIZE: (224, 224)\n")
    cfg = load_cfg(str(path))
    assert cfg.KD.TEMPERATURE == 1.0 and isinstance(cfg.KD.TEMPERATURE, float)
    assert cfg.KD.LOSS.KD_WEIGHT == 9.0 and isinstance(cfg.KD.LOSS.KD_WEIGHT, float)
    assert cfg.WKD.INPUT_SIZE == (224, 224)


def test_float_override_from_command_line():
    """The LS repo's int KD_WEIGHT default made `KD.LOSS.KD_WEIGHT 0.9` fail in yacs; ours is a float."""
    cfg = default_cfg()
    merge_opts(cfg, ["KD.LOSS.KD_WEIGHT", "0.9", "KD.TEMPERATURE", "2", "SOLVER.LR_DECAY_STAGES", "[10, 20]"])
    assert cfg.KD.LOSS.KD_WEIGHT == 0.9 and cfg.KD.TEMPERATURE == 2.0 and cfg.SOLVER.LR_DECAY_STAGES == [10, 20]


def test_mdistiller_defaults():
    cfg = default_cfg()
    assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.CE_WEIGHT, cfg.KD.LOSS.KD_WEIGHT) == (4.0, 0.1, 0.9)
    assert (cfg.DKD.CE_WEIGHT, cfg.DKD.ALPHA, cfg.DKD.BETA, cfg.DKD.T, cfg.DKD.WARMUP) == (1.0, 1.0, 8.0, 4.0, 20)
    assert cfg.LOG.WANDB is False and cfg.EXPERIMENT.LOGIT_STAND is False and cfg.DISTILLER.TEACHER_CKPT == ""


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("SOLVER:\n  LEARNING_RATE: 0.1\n")
    with pytest.raises(MdistillerError, match=r"unknown config key SOLVER.LEARNING_RATE .*typo.yaml"):
        load_cfg(str(path))
    with pytest.raises(MdistillerError, match=r"SOLVER.EPOCH .*did you mean SOLVER.EPOCHS"):
        merge_opts(default_cfg(), ["SOLVER.EPOCH", "3"])


def test_wrong_type_is_named():
    with pytest.raises(MdistillerError, match="SOLVER.EPOCHS .* expects int"):
        merge_opts(default_cfg(), ["SOLVER.EPOCHS", "many"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MdistillerError, match="config file not found"):
        load_cfg(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER: [unclosed\n")
    with pytest.raises(MdistillerError, match="not valid YAML"):
        load_cfg(str(bad))


@pytest.mark.parametrize("key,value", [("SOLVER.EPOCHS", "0"), ("SOLVER.BATCH_SIZE", "-8"), ("SOLVER.LR", "0.0")])
def test_non_positive_values_rejected(key, value):
    cfg = default_cfg()
    merge_opts(cfg, [key, value])
    with pytest.raises(MdistillerError, match=f"{key} must be positive"):
        validate_cfg(cfg)


@pytest.mark.parametrize("path", OUR_CONFIGS, ids=lambda p: "/".join(p.parts[-3:]))
def test_our_config_loads_and_builds_its_models(path):
    cfg = load_cfg(str(path))
    validate_cfg(cfg)
    from mdistiller.distillers import get_distiller_class

    distiller_class = get_distiller_class(cfg.DISTILLER.TYPE)
    names = [cfg.DISTILLER.STUDENT] + ([cfg.DISTILLER.TEACHER] if distiller_class.declares.requires_teacher else [])
    from mdistiller.models.vit import TIMM_NAMES

    if any(name in TIMM_NAMES for name in names) and importlib.util.find_spec("timm") is None:
        pytest.skip('ViT/RegNet models need the optional timm extra: pip install -e ".[vit]"')
    for name in names:
        with torch.device("meta"):
            model = build_model(name, 100)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_every_zoo_model_has_a_vanilla_config():
    from mdistiller.models import cifar_model_dict

    assert {p.stem for p in (REPO / "configs" / "cifar100" / "vanilla").glob("*.yaml")} == set(cifar_model_dict)


def test_kd_configs_cover_the_logit_standardisation_table():
    files = list((REPO / "configs" / "cifar100" / "kd").glob("*.yaml"))
    ls_pairs = {p.stem for p in files if "--logit-stand --base-temp" in p.read_text()}  # the published LS setting
    assert len(ls_pairs) == 14 and "resnet32x4_resnet8x4" in ls_pairs and "ResNet50_MobileNetV2" in ls_pairs
    # and the CRD/DKD tables' three other pairs
    assert {p.stem for p in files} - ls_pairs == {"ResNet50_vgg8", "resnet32x4_ShuffleV1", "wrn_40_2_ShuffleV1"}
    low_lr_students = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
    for path in files:
        cfg = load_cfg(str(path))
        assert cfg.SOLVER.LR == (0.01 if cfg.DISTILLER.STUDENT in low_lr_students else 0.05), path.name


def test_cli_overrides_then_logit_stand_flags():
    """LS flags apply after the KEY VALUE overrides to the keys the overrides leave alone; an override of a key the
    flags set (KD.TEMPERATURE 8 with --base-temp 3) is refused, not silently replaced (tests/test_flags_and_keys.py)."""
    args = train_tool.parse_args([
        "--cfg", str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), "--logit-stand", "--base-temp", "3",
        "--kd-weight", "12", "KD.LOSS.CE_WEIGHT", "0.5",
    ])
    cfg = train_tool.build_cfg(args)
    assert cfg.EXPERIMENT.LOGIT_STAND is True
    assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.KD_WEIGHT, cfg.KD.LOSS.CE_WEIGHT) == (3.0, 12.0, 0.5)
    assert cfg.is_frozen()
    args = train_tool.parse_args([
        "--cfg", str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), "--logit-stand", "--base-temp", "3",
        "KD.TEMPERATURE", "8",
    ])
    with pytest.raises(MdistillerError, match="KD.TEMPERATURE 8 and --logit-stand --base-temp 3 both set"):
        train_tool.build_cfg(args)


def test_logit_stand_flag_defaults_and_absence():
    path = str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
    cfg = train_tool.build_cfg(train_tool.parse_args(["--cfg", path, "--logit-stand"]))
    assert (cfg.KD.TEMPERATURE, cfg.KD.LOSS.KD_WEIGHT) == (2.0, 9.0)
    plain = train_tool.build_cfg(train_tool.parse_args(["--cfg", path]))
    assert (plain.KD.TEMPERATURE, plain.KD.LOSS.KD_WEIGHT, plain.EXPERIMENT.LOGIT_STAND) == (4.0, 0.9, False)


def test_logit_stand_refused_for_vanilla():
    args = train_tool.parse_args(["--cfg", str(REPO / "configs/cifar100/vanilla/resnet8.yaml"), "--logit-stand"])
    with pytest.raises(MdistillerError, match="--logit-stand applies to logit methods"):
        train_tool.build_cfg(args)


def test_run_name_separates_logit_stand_runs():
    from mdistiller.engine.run import result_log_name, run_name

    path = str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
    plain = train_tool.build_cfg(train_tool.parse_args(["--cfg", path]))
    ls = train_tool.build_cfg(train_tool.parse_args(["--cfg", path, "--logit-stand", "--kd-weight", "6"]))
    assert run_name(plain) == "kd,res32x4,res8x4"
    assert run_name(ls) == "kd,res32x4,res8x4,LS:T2,w6"
    assert result_log_name(plain) == "KD,resnet32x4,resnet8x4.txt"
    assert result_log_name(ls) == "KD,resnet32x4,resnet8x4,2,6.txt"
    opts = ["SOLVER.LR", "0.1", "DATASET.ROOT", "/some/where", "LOG.PREFIX", "/tmp/x"]
    assert run_name(load_cfg(path, opts), opts) == "kd,res32x4,res8x4,SOLVER.LR:0.1"  # where-to-work keys stay out


def test_dumped_config_reloads_identically(tmp_path):
    cfg = load_cfg(str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"), ["SOLVER.EPOCHS", "3"])
    dump_cfg(cfg, str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert "&id" not in text and "*id" not in text  # no YAML anchors/aliases
    again = load_cfg(str(tmp_path / "config.yaml"))
    assert cfg_text(again) == cfg_text(cfg) and again.SOLVER.EPOCHS == 3


def test_config_hash_ignores_seed_and_locations_but_not_the_recipe():
    from mdistiller.engine.run import config_hash

    path = str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml")
    base = config_hash(load_cfg(path))
    assert config_hash(load_cfg(path, ["EXPERIMENT.SEED", "3", "DATASET.ROOT", "/x", "LOG.PREFIX", "/y"])) == base
    assert config_hash(load_cfg(path, ["SOLVER.LR", "0.1"])) != base
