"""Exact resume as a user meets it: tools/train.py killed (SIGKILL) at random moments or stopped by SIGTERM, continued
with --resume, ends with the same weights, to the bit, as a run never interrupted (CPU, deterministic). Ctrl-C (SIGINT)
and the other faults are in test_faults.py."""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, THREADS, run_overrides, run_tool

pytestmark = pytest.mark.slow  # subprocesses / multi-process runs: the full suite runs them, `-m "not slow"` skips them

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")
# The acceptance is 10 random kill points; 3 keep the default suite fast.
KILL_POINTS = 10 if os.environ.get("MDISTILLER_LONG_TESTS") == "1" else 3
EPOCHS = 3  # 64 images / batch 16: 4 steps an epoch
STEPS = 4
RUN_NAME = "vanilla,resnet8,SOLVER.EPOCHS:3,SOLVER.BATCH_SIZE:16"


def _args(tmp: Path, data_root: str) -> list[str]:
    return ["--cfg", VANILLA, *run_overrides(tmp, data_root), "SOLVER.EPOCHS", str(EPOCHS),
            "SOLVER.BATCH_SIZE", "16", "EXPERIMENT.DETERMINISTIC", "True"]


def _run_dir(tmp: Path) -> Path:
    return tmp / "output" / "cifar100_baselines" / RUN_NAME


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:  # a file, not a pipe: a killed child never blocks on a full pipe
        return subprocess.Popen([sys.executable, str(REPO / "tools" / "train.py"), *args], cwd=str(REPO), env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll until condition() holds; False when the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("timed out waiting for the training process")


def _student(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student_latest", weights_only=False)["model"]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _epochs_logged(run_dir: Path) -> int:
    worklog = run_dir / "worklog.txt"
    return len(re.findall(r"^epoch: \d+$", worklog.read_text(), re.M)) if worklog.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cifar100_tiny_root):
    """An uninterrupted run: its final student weights and the time an epoch took (config.yaml to latest / epochs)."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_tool("train.py", *_args(tmp, cifar100_tiny_root))
    assert result.returncode == 0, result.stderr
    run_dir = _run_dir(tmp)
    span = (run_dir / "latest").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    return _student(run_dir), max(span / EPOCHS, 0.02)


def test_sigkill_at_random_moments_then_resume_is_bitwise_exact(tmp_path, cifar100_tiny_root, reference):
    weights, epoch_time = reference
    args = _args(tmp_path, cifar100_tiny_root)
    run_dir = _run_dir(tmp_path)
    results = tmp_path / "logs" / "NONE,none,resnet8.txt"
    log = tmp_path / "train.log"
    rng = random.Random(20240611)
    # kill points spread over the whole run: (epoch, fraction of an epoch after the previous one was logged), in
    # order; a point just after an epoch's worklog lines lands in its checkpoint writes, the others mid-epoch
    targets = sorted((rng.randint(1, EPOCHS), rng.random()) for _ in range(KILL_POINTS))
    kills = []
    for _attempt in range(3):  # the epoch time measured on a loaded machine can outlast the run: retry sooner
        for epoch, fraction in targets:
            started = time.time()
            resume = ["--resume"] if (run_dir / "latest").exists() else []
            proc = _start(resume + args, log)
            # config.yaml is rewritten by every start just before training; then wait for the target epoch
            if _wait_for(lambda t=started, e=epoch: (run_dir / "config.yaml").exists()
                         and (run_dir / "config.yaml").stat().st_mtime >= t - 1 and _epochs_logged(run_dir) >= e - 1,
                         proc):
                time.sleep(fraction * epoch_time)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                saved = (torch.load(run_dir / "latest", weights_only=False)["epoch"]
                         if (run_dir / "latest").exists() else 0)
                kills.append((epoch, round(fraction, 2), saved))
            proc.wait(timeout=60)
            if proc.returncode == 0:  # the run finished before this kill point
                break
            assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        if kills:
            break
        shutil.rmtree(run_dir, ignore_errors=True)
        results.unlink(missing_ok=True)
        epoch_time *= 0.2
    assert kills, "no kill landed"
    print("kill points (target epoch, fraction, epochs saved when killed):", kills)
    if not results.exists():
        proc = _start((["--resume"] if (run_dir / "latest").exists() else []) + args, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    _assert_bitwise_equal(_student(run_dir), weights)
    worklog = (run_dir / "worklog.txt").read_text()
    assert [int(e) for e in re.findall(r"^epoch: (\d+)$", worklog, re.M)] == list(range(1, EPOCHS + 1)), kills
    assert worklog.count("best_acc\t") == 1
    assert len(results.read_text().splitlines()) == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")], "temporary files of killed writes removed"


def test_sigterm_saves_the_step_and_resume_is_bitwise_exact(tmp_path, cifar100_tiny_root, reference):
    weights, _ = reference
    args = _args(tmp_path, cifar100_tiny_root)
    run_dir = _run_dir(tmp_path)
    log = tmp_path / "train.log"
    proc = _start(args, log)
    # `latest` appears at the end of epoch 1; shortly after, epoch 2 is (on a loaded machine, mid-)way
    assert _wait_for(lambda: (run_dir / "latest").exists(), proc)
    time.sleep(random.Random(7).uniform(0.0, 0.05))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    output = log.read_text()
    hints = [line for line in output.splitlines() if "interrupted by SIGTERM" in line]
    assert len(hints) == 1 and "continue with: python" in hints[0] and "--resume" in hints[0], output[-3000:]
    latest = torch.load(run_dir / "latest", weights_only=False)  # loadable
    if "partial" in latest:  # stopped inside an epoch: saved at that step
        epoch, step = latest["partial"]["epoch"], latest["partial"]["step"]
        assert 1 <= step <= STEPS and latest["epoch"] == epoch - 1
        assert f"at epoch {epoch}, step {step}/{STEPS}; {run_dir / 'latest'} holds that state" in hints[0]
        resumed_at = f"at epoch {epoch}, step {step + 1}"
    else:  # the signal came during evaluation or saving: the end of that epoch
        assert f"at the end of epoch {latest['epoch']}" in hints[0]
        resumed_at = f"at epoch {latest['epoch'] + 1}"
    command = shlex.split(hints[0].split("continue with: ", 1)[1])  # the printed command continues the run
    assert command[0] == "python"
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=str(REPO), capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'latest'} {resumed_at}" in resumed.stdout
    _assert_bitwise_equal(_student(run_dir), weights)
