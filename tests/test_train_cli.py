"""tools/train.py and tools/eval.py as a user runs them: artefacts, learning, LS runs, resume, evaluation, errors."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from mdistiller.errors import MdistillerError

from conftest import REPO, run_overrides, run_tool

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")
KD = str(REPO / "configs/cifar100/kd/resnet56_resnet20.yaml")


def _worklog_values(run_dir: Path, key: str) -> list[float]:
    return [float(v) for v in re.findall(rf"^{key}: ([-\d.e+]+)$", (run_dir / "worklog.txt").read_text(), re.M)]


def _only_run_dir(prefix: Path) -> Path:
    runs = [p for p in (prefix / "output").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory, cifar100_root):
    """A 2-epoch vanilla resnet8 run through the CLI (the 'teacher' for later tests)."""
    tmp = tmp_path_factory.mktemp("vanilla")
    overrides = run_overrides(tmp, cifar100_root) + ["SOLVER.EPOCHS", "2", "LOG.SAVE_CHECKPOINT_FREQ", "1",
                                                     "SOLVER.LR", "0.02"]
    result = run_tool("train.py", "--cfg", VANILLA, *overrides)
    assert result.returncode == 0, result.stderr
    return tmp, _only_run_dir(tmp), result


@pytest.mark.slow
def test_vanilla_run_writes_every_artefact(vanilla_run):
    tmp, run_dir, result = vanilla_run
    assert run_dir.name == "vanilla,resnet8,SOLVER.EPOCHS:2,SOLVER.LR:0.02"
    for name in ("latest", "best", "student_latest", "student_best", "epoch_1", "student_1", "epoch_2", "student_2",
                 "config.yaml", "worklog.txt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "train.events").iterdir()), "tensorboard events written"
    student = torch.load(run_dir / "student_best", weights_only=False)
    assert set(student) >= {"model"} and student["arch"] == "resnet8"
    latest = torch.load(run_dir / "latest", weights_only=False)
    assert {"model", "optimizer", "epoch", "best_acc", "rng"} <= set(latest) and latest["epoch"] == 2
    assert "SOLVER.EPOCHS: 2" not in (run_dir / "config.yaml").read_text()  # nested YAML, not flat keys
    assert "EPOCHS: 2" in (run_dir / "config.yaml").read_text()
    results = (tmp / "logs" / "NONE,none,resnet8.txt").read_text()
    assert "best_top1=" in results and str(run_dir.resolve()) in results
    assert "teacher weights:" in result.stdout and "DISTILLER.TEACHER_CKPT" in result.stdout
    assert "seed 0" in result.stdout


def test_vanilla_run_lowers_the_training_loss(vanilla_run):
    _, run_dir, _ = vanilla_run
    losses = _worklog_values(run_dir, "train_loss")
    assert len(losses) == 2 and losses[1] < losses[0] < 6.0
    assert _worklog_values(run_dir, "best_acc")[-1] >= max(_worklog_values(run_dir, "test_acc"))


def test_lr_schedule_is_mdistillers():
    from mdistiller.engine.cfg import default_cfg
    from mdistiller.engine.optim import learning_rate

    cfg = default_cfg()
    lrs = [learning_rate(cfg, e) for e in (1, 150, 151, 180, 181, 211, 240)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])


@pytest.mark.slow
@pytest.mark.parametrize("logit_stand", [False, True])
def test_kd_run_from_a_trained_teacher(vanilla_run, tmp_path, cifar100_root, logit_stand):
    _, teacher_dir, _ = vanilla_run
    flags = ["--logit-stand", "--base-temp", "2", "--kd-weight", "9"] if logit_stand else []
    result = run_tool("train.py", "--cfg", KD, *flags, *run_overrides(tmp_path, cifar100_root),
                      "DISTILLER.TEACHER", "resnet8", "DISTILLER.STUDENT", "resnet8",
                      "DISTILLER.TEACHER_CKPT", str(teacher_dir / "student_best"), "LOG.WANDB", "True")
    assert result.returncode == 0, result.stderr
    if importlib.util.find_spec("wandb") is None:  # the published WKD configs switch wandb on: never fatal
        assert "warning: LOG.WANDB is True but wandb is not installed" in result.stderr
    run_dir = _only_run_dir(tmp_path)
    assert run_dir.name.endswith(",LS:T2,w9") is logit_stand
    log_name = "KD,resnet8,resnet8,2,9.txt" if logit_stand else "KD,resnet8,resnet8.txt"
    assert (tmp_path / "logs" / log_name).is_file()
    assert _worklog_values(run_dir, "loss_kd") and _worklog_values(run_dir, "loss_ce")
    config = (run_dir / "config.yaml").read_text()
    assert ("LOGIT_STAND: true" in config) is logit_stand


@pytest.mark.slow
def test_eval_reports_the_runs_accuracy(vanilla_run, cifar100_root):
    _, run_dir, _ = vanilla_run
    result = run_tool("eval.py", "-m", "resnet8", "-c", str(run_dir / "student_best"), "-d", "cifar100",
                      "-bs", "32", "--data-root", cifar100_root, "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    top1 = float(re.search(r"top-1 ([\d.]+)", result.stdout).group(1))
    assert top1 == pytest.approx(max(_worklog_values(run_dir, "test_acc")), abs=0.01)
    assert re.search(r"top-5 [\d.]+", result.stdout)


def _load_train_tool():
    module = importlib.import_module("mdistiller.cli.train")
    return module


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, cifar100_root, monkeypatch):
    from mdistiller.engine.trainer import Trainer

    train_tool = _load_train_tool()
    torch.use_deterministic_algorithms(True)
    try:
        def args(prefix: str) -> list[str]:
            return ["--cfg", VANILLA, *run_overrides(tmp_path / prefix, cifar100_root), "SOLVER.EPOCHS", "2"]

        train_tool.main(args("whole"))
        original = Trainer.train_epoch

        def interrupted(self, epoch):
            if epoch == 2:
                raise KeyboardInterrupt
            return original(self, epoch)

        monkeypatch.setattr(Trainer, "train_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_tool.main(args("split"))
        monkeypatch.setattr(Trainer, "train_epoch", original)
        with pytest.raises(Exception, match="already holds a run: pass --resume"):
            train_tool.main(args("split"))
        train_tool.main(["--resume", *args("split")])
    finally:
        torch.use_deterministic_algorithms(False)
    whole = torch.load(_only_run_dir(tmp_path / "whole") / "student_latest", weights_only=False)["model"]
    split = torch.load(_only_run_dir(tmp_path / "split") / "student_latest", weights_only=False)["model"]
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    worklog = (_only_run_dir(tmp_path / "split") / "worklog.txt").read_text()
    assert worklog.count("epoch: 1") == 1 and worklog.count("epoch: 2") == 1


# ---- bad input: one line on stderr, non-zero exit, no traceback ----

def _bad_runs(tmp: Path, data_root: str, teacher: str, wrong_teacher: str) -> dict[str, tuple[list[str], str]]:
    base = run_overrides(tmp, data_root)
    return {
        "missing config": (["--cfg", str(tmp / "nope.yaml")], "config file not found"),
        "key typo": (["--cfg", VANILLA, *base, "SOLVER.EPOHCS", "1"], "unknown config key SOLVER.EPOHCS"),
        "unknown model": (["--cfg", VANILLA, *base, "DISTILLER.STUDENT", "resnet9"], "unknown model 'resnet9'"),
        "unknown distiller": (["--cfg", VANILLA, *base, "DISTILLER.TYPE", "KDD"], "unknown distiller"),
        "missing data": (["--cfg", VANILLA, *base, "DATASET.ROOT", str(tmp / "void")], "CIFAR-100 not found"),
        "missing teacher": (["--cfg", KD, *base, "DISTILLER.TEACHER_CKPT", str(tmp / "t.pth")],
                            "teacher checkpoint not found"),
        "wrong teacher": (["--cfg", KD, *base, "DISTILLER.TEACHER_CKPT", wrong_teacher],
                          "holds weights of resnet8, not resnet56"),
        "zero epochs": (["--cfg", VANILLA, *base, "SOLVER.EPOCHS", "0"], "SOLVER.EPOCHS must be positive"),
        "negative batch": (["--cfg", VANILLA, *base, "SOLVER.BATCH_SIZE", "-4"], "SOLVER.BATCH_SIZE must be positive"),
        "odd overrides": (["--cfg", VANILLA, "SOLVER.EPOCHS"], "KEY VALUE pairs"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["key typo", "wrong teacher", "odd overrides"])
def test_bad_input_gives_one_line_error(tmp_path, cifar100_root, teacher_ckpt, case):
    """As a user meets it: one `error:` line on stderr, exit code 2, no traceback (every refused case runs in-process
    in test_validation.py, which also checks that nothing was written)."""
    args, message = _bad_runs(tmp_path, cifar100_root, teacher_ckpt("resnet56"), teacher_ckpt("resnet8"))[case]
    result = run_tool("train.py", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("case", ["wrong architecture", "no published weights", "teacher file missing"])
def test_eval_bad_inputs(tmp_path, cifar100_root, teacher_ckpt, capsys, monkeypatch, case):
    from mdistiller.cli import eval as eval_tool
    from mdistiller.cli import run_cli

    args, message = {
        "wrong architecture": (["-m", "resnet20", "-c", teacher_ckpt("resnet8")],
                               "holds weights of resnet8, not resnet20"),
        "no published weights": (["-m", "resnet8", "-c", "pretrain"], "no published checkpoint for resnet8"),
        "teacher file missing": (["-m", "resnet56"], "resnet56_vanilla/ckpt_epoch_240.pth"),
    }[case]
    monkeypatch.chdir(tmp_path)  # no download_ckpts/ here
    monkeypatch.setattr("mdistiller.files.PROJECT_ROOT", tmp_path)
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: eval_tool.main([*args, "--data-root", cifar100_root, "--num-workers", "0"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_adamw_solver_trains_through_the_cli(tmp_path, cifar100_root):
    from mdistiller.cli import train as train_tool

    train_tool.main(["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_root),
                     "SOLVER.TYPE", "AdamW", "SOLVER.LR", "0.001", "SOLVER.WEIGHT_DECAY", "0.05"])
    latest = torch.load(_only_run_dir(tmp_path) / "latest", weights_only=False)
    assert "betas" in latest["optimizer"]["param_groups"][0]  # an AdamW state, not SGD's
    with pytest.raises(MdistillerError, match="SOLVER.TYPE 'Lion' is not supported"):
        train_tool.main(["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_root), "SOLVER.TYPE", "Lion"])
