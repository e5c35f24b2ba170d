"""WKD / VkD from the command line: the cost-matrix tool, one-epoch runs of each config family, the configs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from mdistiller.cli import run_cli
from mdistiller.engine.build import build_model
from mdistiller.engine.cfg import load_cfg, validate_cfg
from mdistiller.errors import MdistillerError

from conftest import run_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "cifar100"
REFERENCE = Path(__file__).parent / "data" / "reference_configs" / "WKD" / "configs" / "cifar100"
OUR_CONFIGS = sorted(p for family in ("wkd_l", "wkd_f", "wkd_lf", "vkd") for p in (CONFIGS / family).glob("*.yaml"))
REFERENCE_NAMES = {"resnet32x4_resnet8x4": "res32x4_res8x4", "wrn_40_2_ShuffleV1": "wrn40_2_shuv1"}


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    """conftest.run_tool with one thread per process: the runs below go four at a time on a 2-core machine."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=300)


def _load_tool():
    module = importlib.import_module("mdistiller.cli.wkd_cost_matrix")
    return module


def _worklog(tmp: Path) -> str:
    logs = list((tmp / "output").rglob("worklog.txt"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, cifar100_root, teacher_ckpt):
    """All the subprocess runs at once (threads wait on the processes): the cost-matrix tool then WKD-L on its file,
    WKD-F, WKD-L+F and VkD. Returns {name: (completed process, its tmp folder)}."""
    base = tmp_path_factory.mktemp("cli")
    resnet8, wrn16 = teacher_ckpt("resnet8"), teacher_ckpt("wrn_16_2")
    small = ["DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_CKPT", resnet8]
    fewer_steps = ["SOLVER.BATCH_SIZE", "128", "DATASET.TEST.BATCH_SIZE", "128"]

    def tool_then_wkd_l():
        tmp = base / "wkd_l"
        cost = tmp / "cost" / "linear_cka.pth"
        tool = run_tool("wkd_cost_matrix.py", "--cfg", str(CONFIGS / "wkd_l/resnet32x4_resnet8x4.yaml"), "-c", resnet8,
                        "-o", str(cost), "DISTILLER.TEACHER", "resnet8", "DATASET.ROOT", cifar100_root,
                        "DATASET.NUM_WORKERS", "0")
        train = run_tool("train.py", "--cfg", str(CONFIGS / "wkd_l/resnet32x4_resnet8x4.yaml"), *small,
                         "WKD.COST_MATRIX_PATH", str(cost), *fewer_steps, *run_overrides(tmp, cifar100_root))
        return {"tool": (tool, tmp), "wkd_l": (train, tmp)}

    def train(name, config, *extra):
        tmp = base / name
        return {name: (run_tool("train.py", "--cfg", str(CONFIGS / config), *extra, *fewer_steps,
                                *run_overrides(tmp, cifar100_root)), tmp)}

    jobs = [
        tool_then_wkd_l,
        lambda: train("wkd_f", "wkd_f/resnet32x4_resnet8x4.yaml", *small),
        # the ShuffleV1 config's grid of 4 on resnet8's 8 x 8 map, cost from the teacher's classifier
        lambda: train("wkd_lf", "wkd_lf/wrn_40_2_ShuffleV1.yaml", *small, "WKD.COST_MATRIX", "fc"),
        lambda: train("vkd", "vkd/resnet32x4_resnet8x4.yaml", "DISTILLER.TEACHER", "wrn_16_2",
                      "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_CKPT", wrn16),
    ]
    results: dict = {}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for done in pool.map(lambda job: job(), jobs):
            results.update(done)
    return results


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_cost_matrix_tool_writes_a_symmetric_zero_diagonal_matrix(cli_runs):
    proc, tmp = cli_runs["tool"]
    _assert_ok(proc)
    cost = torch.load(tmp / "cost" / "linear_cka.pth", weights_only=True)
    assert cost.shape == (100, 100) and cost.dtype == torch.float32
    torch.testing.assert_close(cost, cost.t())
    assert (cost.diagonal() == 0).all() and (cost >= -1e-6).all() and (cost <= 1 + 1e-6).all()
    assert (cost[:10, :10][~torch.eye(10, dtype=torch.bool)] < 1).any()  # the 10 classes present are compared
    assert "90 of 100 classes have no training image" in proc.stderr
    assert "WKD.COST_MATRIX_PATH" in proc.stdout


def test_wkd_l_trains_one_epoch_on_the_tool_s_matrix(cli_runs):
    proc, tmp = cli_runs["wkd_l"]
    _assert_ok(proc)
    log = _worklog(tmp)
    assert "loss_wkd_target" in log and "loss_wkd_logit" in log and "loss_wkd_feat" not in log
    assert "wkd_logit_weight: 600.0000" in log  # epoch 1 < COSINE_DECAY_EPOCH: undecayed
    assert list((tmp / "logs").glob("WKD,resnet8,resnet8.txt"))


def test_wkd_f_trains_one_epoch(cli_runs):
    proc, tmp = cli_runs["wkd_f"]
    _assert_ok(proc)
    log = _worklog(tmp)
    assert "loss_wkd_feat" in log and "loss_wkd_logit" not in log and "wkd_feat_weight: 0.0800" in log


def test_wkd_lf_trains_one_epoch(cli_runs):
    proc, tmp = cli_runs["wkd_lf"]
    _assert_ok(proc)
    log = _worklog(tmp)
    assert all(name in log for name in ("loss_wkd_target", "loss_wkd_logit", "loss_wkd_feat"))


def test_vkd_trains_one_epoch(cli_runs):
    proc, tmp = cli_runs["vkd"]
    _assert_ok(proc)
    log = _worklog(tmp)
    assert "loss_feat" in log and "loss_kd" in log  # the configs keep the reference's KL(T=1) term
    assert "extra parameters" in proc.stdout + proc.stderr


def test_cost_matrix_tool_mismatched_checkpoint_is_one_line(cifar100_root, teacher_ckpt, capsys, tmp_path):
    tool = _load_tool()
    args = ["--cfg", str(CONFIGS / "wkd_l/resnet32x4_resnet8x4.yaml"), "-c", teacher_ckpt("resnet8"),
            "-o", str(tmp_path / "c.pth"), "DATASET.ROOT", cifar100_root, "DISTILLER.TEACHER", "resnet20"]
    with pytest.raises(MdistillerError, match="holds weights of resnet8, not resnet20"):
        tool.main(args)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: tool.main(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "c.pth").exists()


def test_default_output_path_is_where_the_configs_look():
    tool = _load_tool()
    for config in ("wkd_l", "wkd_lf"):
        for name in REFERENCE_NAMES:
            cfg = load_cfg(str(CONFIGS / config / f"{name}.yaml"))
            assert tool.default_output(cfg) == cfg.WKD.COST_MATRIX_PATH


@pytest.mark.parametrize("path", OUR_CONFIGS, ids=lambda p: "/".join(p.parts[-2:]))
def test_config_loads_and_builds_its_models(path):
    cfg = load_cfg(str(path))
    validate_cfg(cfg)
    assert cfg.DISTILLER.TYPE in ("WKD", "VKD")
    for name in (cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER):
        with torch.device("meta"):
            assert sum(p.numel() for p in build_model(name, 100).parameters()) > 0


@pytest.mark.parametrize("family", ["wkd_l", "wkd_f", "wkd_lf"])
@pytest.mark.parametrize("name", sorted(REFERENCE_NAMES))
def test_wkd_configs_carry_the_authors_values(family, name):
    ours = load_cfg(str(CONFIGS / family / f"{name}.yaml"))
    theirs = load_cfg(str(REFERENCE / family / f"{REFERENCE_NAMES[name]}.yaml"))
    for section in ("WKD", "SOLVER", "DISTILLER"):
        assert ours[section] == theirs[section], section
    assert ours.EXPERIMENT.SEED == theirs.EXPERIMENT.SEED
    assert "Published top-1 (WKD paper)" in (CONFIGS / family / f"{name}.yaml").read_text()


def test_vkd_configs_cover_the_kd_pairs_with_the_lr_rule():
    kd_pairs = {p.stem for p in (CONFIGS / "kd").glob("*.yaml") if "--logit-stand" in p.read_text()}  # the LS table
    vkd_pairs = {p.stem for p in (CONFIGS / "vkd").glob("*.yaml")}
    assert vkd_pairs == kd_pairs and len(vkd_pairs) == 14
    for path in (CONFIGS / "vkd").glob("*.yaml"):
        cfg = load_cfg(str(path))
        kd = yaml.safe_load((CONFIGS / "kd" / path.name).read_text())
        pair = (kd["DISTILLER"]["TEACHER"], kd["DISTILLER"]["STUDENT"])
        assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT) == pair
        assert cfg.SOLVER.LR == (0.01 if cfg.DISTILLER.STUDENT in ("MobileNetV2", "ShuffleV1", "ShuffleV2") else 0.05)
        assert "--logit-stand --base-temp" in path.read_text()
