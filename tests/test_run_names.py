"""Run names: the config's name, then the overrides that change the recipe, never a key that already names the run."""

from __future__ import annotations

from mdistiller.engine.cfg import load_cfg
from mdistiller.engine.run import run_name

from conftest import REPO

KD = str(REPO / "configs/cifar100/kd/resnet32x4_resnet8x4.yaml")


def test_name_and_tag_given_as_overrides_are_not_repeated_in_the_suffix():
    opts = ["EXPERIMENT.NAME", "dot_on", "SOLVER.EPOCHS", "1"]
    assert run_name(load_cfg(KD, opts), opts) == "dot_on,SOLVER.EPOCHS:1"
    opts = ["EXPERIMENT.TAG", "mine", "SOLVER.LR", "0.1"]
    assert run_name(load_cfg(KD, opts), opts) == "mine,SOLVER.LR:0.1"


def test_where_keys_stay_out_and_recipe_keys_go_in():
    opts = ["DATASET.ROOT", "/data", "LOG.PREFIX", "/out", "DATASET.NUM_WORKERS", "8", "KD.TEMPERATURE", "2"]
    assert run_name(load_cfg(KD, opts), opts) == "kd,res32x4,res8x4,KD.TEMPERATURE:2"


def test_a_name_too_long_for_a_folder_keeps_its_head_and_a_hash_of_the_whole():
    from mdistiller.engine.cfg import default_cfg
    from mdistiller.engine.run import RUN_NAME_MAX_BYTES, run_name

    cfg = default_cfg()
    cfg.EXPERIMENT.NAME = "x" * 250 + "a"
    name = run_name(cfg)
    cfg.EXPERIMENT.NAME = "x" * 250 + "b"
    other = run_name(cfg)
    assert len(name.encode()) == RUN_NAME_MAX_BYTES and name.startswith("x" * 150)
    assert name != other and name.rsplit(",~", 1)[0] == other.rsplit(",~", 1)[0]  # same head, different hashes
    cfg.EXPERIMENT.NAME = "long"
    assert run_name(cfg, ["SOLVER.LR", "0.05"]) == "long,SOLVER.LR:0.05"  # a name that fits is unchanged
