"""Faults during a run: non-finite losses (SOLVER.NAN_POLICY), Ctrl-C, full disks, unwritable outputs, and configs
that cannot fit, each ending in one clear line (before training where it can be known before)."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import signal
from pathlib import Path

import pytest
import torch

from mdistiller.cli import run_cli
from mdistiller.distillers import Declaration, Distiller, distiller_dict, register_distiller
from mdistiller.distillers._base import cross_entropy
from mdistiller.errors import MdistillerError

from conftest import REPO, run_overrides

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")
KD = str(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml")

# What the test double does, keyed by (epoch, step); set by each test.
NAN_AT: set[tuple[int, int]] = set()
SIGNAL_AT: dict[tuple[int, int], int] = {}
LATEST_AT_NAN: dict[tuple[int, int], str] = {}
RUN_DIR: list[Path] = []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if "TEST_FAULTS" not in distiller_dict:

    @register_distiller("TEST_FAULTS")
    class FaultDouble(Distiller):
        """Cross-entropy plus an `loss_aux` term that is NaN at the steps in NAN_AT; sends itself signals."""

        declares = Declaration(loss_terms=("loss_ce", "loss_aux"), requires_teacher=False)

        def setup(self) -> None:
            self.calls: dict[int, int] = {}

        def forward_train(self, image, target, epoch=None, **batch):
            step = self.calls[epoch] = self.calls.get(epoch, 0) + 1
            logits, _ = self.student(image)
            loss_ce = cross_entropy(logits, target)
            loss_aux = torch.zeros((), device=logits.device)
            if (epoch, step) in NAN_AT:
                loss_aux = loss_aux + float("nan")
                latest = RUN_DIR[0] / "latest" if RUN_DIR else None
                LATEST_AT_NAN[(epoch, step)] = _sha(latest) if latest and latest.exists() else ""
            if (epoch, step) in SIGNAL_AT:
                signal.raise_signal(SIGNAL_AT.pop((epoch, step)))
            return logits, {"loss_ce": loss_ce, "loss_aux": loss_aux}


@pytest.fixture(autouse=True)
def _clean_plan():
    NAN_AT.clear()
    SIGNAL_AT.clear()
    LATEST_AT_NAN.clear()
    RUN_DIR.clear()
    yield


@pytest.fixture(scope="module")
def train_tool():
    module = importlib.import_module("mdistiller.cli.train")
    return module


def _args(tmp: Path, data_root: str, *extra: str, epochs: int = 2) -> list[str]:
    return ["--cfg", VANILLA, *run_overrides(tmp, data_root), "DISTILLER.TYPE", "TEST_FAULTS",
            "SOLVER.EPOCHS", str(epochs), "SOLVER.BATCH_SIZE", "16", *extra]


def _run_dir(tmp: Path, epochs: int = 2) -> Path:
    return (tmp / "output" / "cifar100_baselines"
            / f"vanilla,resnet8,SOLVER.EPOCHS:{epochs},DISTILLER.TYPE:TEST_FAULTS,SOLVER.BATCH_SIZE:16")


@pytest.mark.parametrize("sync_every", [1, 4], ids=["cpu-every-step", "accelerator-deferred"])
def test_nan_stop_names_epoch_step_and_term_and_keeps_latest(tmp_path, cifar100_tiny_root, train_tool, monkeypatch,
                                                             sync_every):
    import mdistiller.engine.trainer as trainer

    monkeypatch.setattr(trainer, "nan_sync_interval", lambda device: sync_every)
    RUN_DIR.append(_run_dir(tmp_path))
    NAN_AT.add((2, 3))
    with pytest.raises(MdistillerError) as info:
        train_tool.main(_args(tmp_path, cifar100_tiny_root))
    message = str(info.value)
    assert "\n" not in message
    assert "non-finite loss at epoch 2, step 3/4 (loss_aux=nan)" in message
    assert "saved at the end of epoch 1) is the last good checkpoint" in message and "NAN_POLICY skip" in message
    latest = RUN_DIR[0] / "latest"
    assert _sha(latest) == LATEST_AT_NAN[(2, 3)], "latest untouched since the bad step"
    assert torch.load(latest, weights_only=False)["epoch"] == 1
    assert "epoch: 2" not in (RUN_DIR[0] / "worklog.txt").read_text()


def test_nan_skip_skips_the_updates_counts_them_and_finishes(tmp_path, cifar100_tiny_root, train_tool, capsys):
    NAN_AT.update({(1, 2), (1, 4)})
    result = train_tool.main(_args(tmp_path, cifar100_tiny_root, "SOLVER.NAN_POLICY", "skip"))
    run_dir = Path(result["run_dir"])
    worklog = (run_dir / "worklog.txt").read_text()
    assert "nan_skipped_steps: 2.0000" in worklog and "nan_skipped_steps: 0.0000" in worklog
    assert worklog.index("nan_skipped_steps: 2.0000") < worklog.index("epoch: 2")
    assert "warning: epoch 1: skipped 2 step(s) with a non-finite loss (loss_aux)" in capsys.readouterr().err
    assert "WARNING epoch 1: skipped 2 step(s)" in (run_dir / "log.txt").read_text()  # the run's own log too
    weights = torch.load(run_dir / "student_latest", weights_only=False)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_nan_policy_must_be_stop_or_skip(tmp_path, cifar100_tiny_root, train_tool):
    with pytest.raises(MdistillerError, match="SOLVER.NAN_POLICY must be one of stop, skip, got 'ignore'"):
        train_tool.main(_args(tmp_path, cifar100_tiny_root, "SOLVER.NAN_POLICY", "ignore"))


def test_sigint_stops_after_the_step_exits_130_and_resumes_exactly(tmp_path, cifar100_tiny_root, train_tool, capsys):
    whole = train_tool.main(_args(tmp_path / "whole", cifar100_tiny_root, epochs=1))
    SIGNAL_AT[(1, 3)] = signal.SIGINT
    args = _args(tmp_path / "split", cifar100_tiny_root, epochs=1)
    handler = signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train_tool.main(args)
    assert info.value.code == 130
    hints = [line for line in capsys.readouterr().err.splitlines() if "interrupted by" in line]
    assert len(hints) == 1 and "interrupted by SIGINT at epoch 1, step 3/4" in hints[0] and "--resume" in hints[0]
    assert torch.load(_run_dir(tmp_path / "split", 1) / "latest", weights_only=False)["partial"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler, "the trainer's handlers are removed after the run"
    split = train_tool.main(["--resume", *args])
    a = torch.load(Path(whole["run_dir"]) / "student_latest", weights_only=False)["model"]
    b = torch.load(Path(split["run_dir"]) / "student_latest", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, cifar100_tiny_root, train_tool, monkeypatch):
    import mdistiller.files as checkpoint

    real_save, real_mkstemp = torch.save, checkpoint.tempfile.mkstemp
    temp_names: dict[int, str] = {}  # fd -> temporary file name: which checkpoint a torch.save writes
    latest_writes = []

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        temp_names[fd] = Path(path).name
        return fd, path

    def save(obj, f, *args, **kwargs):
        if temp_names.get(f.fileno(), "").startswith(".latest."):
            latest_writes.append(1)
            if len(latest_writes) == 2:
                f.write(b"\x00" * 100)  # half a file, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", mkstemp)
    with pytest.raises(MdistillerError) as info:
        train_tool.main(_args(tmp_path, cifar100_tiny_root))
    run_dir = _run_dir(tmp_path)
    message = str(info.value)
    assert message == (f"could not write checkpoint {run_dir / 'latest'}: No space left on device; "
                       f"the previous file there is intact")
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(run_dir / "latest", weights_only=False)["epoch"] == 1
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_log_prefix_fails_before_training(tmp_path, cifar100_tiny_root, train_tool, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # fails for root too, unlike chmod
    args = ["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_tiny_root), "LOG.PREFIX", str(blocker / "output")]
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_tool.main(args))  # what `python tools/train.py` does with the error
    out, err = capsys.readouterr()
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to the run folder (LOG.PREFIX)")
    assert str(blocker / "output") in lines[0] and f"{blocker} is a file, not a folder" in lines[0]
    assert "training images" not in out, "stopped before the data was loaded"


def test_teacher_with_another_class_count_is_named(tmp_path, cifar100_tiny_root, teacher_ckpt, train_tool):
    args = ["--cfg", KD, *run_overrides(tmp_path, cifar100_tiny_root),
            "DISTILLER.TEACHER_CKPT", teacher_ckpt("resnet56", num_classes=10)]
    with pytest.raises(MdistillerError, match=r"holds weights of resnet56 with 10 classes, not resnet56 \(100 classes\)"
                                              r": fc.weight is \[10, 64\] in the file, \[100, 64\] in resnet56"):
        train_tool.main(args)
