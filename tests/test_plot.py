"""tools/plot.py: training curves from worklogs and the logit diagnostics, written as non-empty PNG files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdistiller.analysis.plots import logit_statistics, require_matplotlib
from mdistiller.cli import run_cli
from mdistiller.errors import MdistillerError

from conftest import save_teacher

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install -e .[plots])")


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def _plot_tool():
    module = importlib.import_module("mdistiller.cli.plot")
    return module


def _write_run(folder: Path, epochs: int, terms: tuple[str, ...]) -> Path:
    """A run folder whose worklog.txt has the trainer's format."""
    folder.mkdir(parents=True)
    blocks = []
    for e in range(1, epochs + 1):
        lines = ["-" * 25, f"epoch: {e}", "lr: 0.05"] + [f"{t}: {2.0 / e:.4f}" for t in terms]
        lines += [f"train_loss: {len(terms) * 2.0 / e:.4f}", f"test_acc: {10.0 * e:.4f}", "test_loss: 1.0000",
                  "-" * 25]
        blocks.append("\n".join(lines) + "\n")
    (folder / "worklog.txt").write_text("".join(blocks) + "best_acc\t30.0000\n")
    return folder


@needs_matplotlib
def test_curves_of_several_runs(tmp_path):
    kd = _write_run(tmp_path / "kd,res32x4,res8x4", 3, ("loss_ce", "loss_kd"))
    vanilla = _write_run(tmp_path / "vanilla,res8x4", 2, ("loss_ce",))
    out = tmp_path / "plots" / "curves.png"
    assert _plot_tool().main(["curves", str(kd), str(vanilla), "-o", str(out)]) == [str(out)]
    _assert_png(out)


@needs_matplotlib
def test_curves_of_a_run_without_epochs_is_an_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "worklog.txt").write_text("")
    with pytest.raises(MdistillerError, match="no finished epoch"):
        _plot_tool().main(["curves", str(tmp_path / "run"), "-o", str(tmp_path / "c.png")])


def test_logit_statistics_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0], [0.0, 4.0, 2.0], [3.0, 0.0, 6.0]])
    stats = logit_statistics(logits)
    np.testing.assert_allclose(stats["mean"], [2.0, 3.0, 2.0, 3.0])
    np.testing.assert_allclose(stats["std"], [1.0, np.sqrt(3.0), 2.0, 3.0])  # unbiased
    corr = stats["class_corr"]
    assert corr.shape == (3, 3) and np.allclose(np.diag(corr), 1.0) and np.allclose(corr, corr.T)
    a, c = logits[:, 0].numpy(), logits[:, 2].numpy()
    assert corr[0, 2] == pytest.approx(np.corrcoef(a, c)[0, 1])
    constant = logit_statistics(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))["class_corr"]
    assert np.isfinite(constant).all()  # a class whose logit never varies: 0, not NaN


@needs_matplotlib
def test_logit_stats_on_the_test_set(tmp_path, cifar100_tiny_root, teacher_ckpt, capsys):
    student = save_teacher(str(tmp_path / "student.pth"), "resnet8", seed=1)
    prefix = tmp_path / "stats" / "kd"
    paths = _plot_tool().main(["logit-stats", "-t", "resnet8", "-tc", teacher_ckpt("resnet8"), "-s", "resnet8",
                               "-sc", student, "--data-root", cifar100_tiny_root, "--num-workers", "0",
                               "-o", str(prefix)])
    assert paths == [f"{prefix}_mean_std.png", f"{prefix}_corr_diff.png"]
    out = capsys.readouterr().out
    for path in paths:
        _assert_png(Path(path))
        assert f"wrote {path}" in out


@needs_matplotlib
def test_logit_stats_names_a_wrong_checkpoint_in_one_line(tmp_path, cifar100_tiny_root, teacher_ckpt, capsys):
    args = ["logit-stats", "-t", "resnet8", "-tc", teacher_ckpt("resnet8"), "-s", "resnet20",
            "-sc", teacher_ckpt("resnet8"), "--data-root", cifar100_tiny_root, "-o", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: _plot_tool().main(args))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: student checkpoint") and "holds weights of resnet8, not resnet20" in err


def test_without_matplotlib_one_line_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MdistillerError) as info:
        require_matplotlib()
    assert str(info.value) == "plotting needs matplotlib: pip install -e .[plots]"
