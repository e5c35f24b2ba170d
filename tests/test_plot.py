"""tools/plot.py: training curves from worklogs, the results table as bars and the logit diagnostics, written as PNG
files; what a person reads (labels, legends clear of the data, integer epochs, log scales, bar heights, published
markers) is checked on the figures' own geometry."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdistiller.analysis.plots import (
    curves_figure,
    logit_statistics,
    logit_stats_figures,
    require_matplotlib,
    run_labels,
    table_figure,
)
from mdistiller.analysis.report import report
from mdistiller.cli import run_cli
from mdistiller.engine.cfg import dump_cfg, load_cfg
from mdistiller.errors import MdistillerError

from conftest import REPO, save_teacher

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (pip install -e .[plots])")


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def _plot_tool():
    module = importlib.import_module("mdistiller.cli.plot")
    return module


def _write_run(folder: Path, epochs: int, terms: tuple[str, ...], scale: dict[str, float] | None = None,
               cfg: str | None = None, opts: tuple[str, ...] = ()) -> Path:
    """A run folder whose worklog.txt has the trainer's format (term t at epoch e: scale[t] * 2 / e), with the
    config.yaml the trainer writes when cfg (a YAML of configs/) is given."""
    folder.mkdir(parents=True)
    scale = scale or {}
    blocks = []
    for e in range(1, epochs + 1):
        values = {t: scale.get(t, 1.0) * 2.0 / e for t in terms}
        lines = ["-" * 25, f"epoch: {e}", "lr: 0.05"] + [f"{t}: {v:.4f}" for t, v in values.items()]
        lines += [f"train_loss: {sum(values.values()):.4f}", f"train_acc: {12.0 * e:.4f}",
                  f"test_acc: {10.0 * e:.4f}", "test_loss: 4.6000", "-" * 25]
        blocks.append("\n".join(lines) + "\n")
    (folder / "worklog.txt").write_text("".join(blocks) + "best_acc\t30.0000\n")
    if cfg is not None:
        dump_cfg(load_cfg(str(REPO / "configs/cifar100" / cfg), opts), str(folder / "config.yaml"))
    return folder


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _assert_legends_clear_of_the_data(fig) -> None:
    """Every legend lies inside the figure and overlaps no axes (panels and colour bars alike), no title and no other
    legend."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = _legends(fig)
    assert legends
    titles = [t for t in [fig._suptitle] + [ax.title for ax in fig.axes] if t is not None and t.get_text()]
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    for n, (legend, box) in enumerate(zip(legends, boxes)):
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend.get_title().get_text(), ax.get_ylabel())
        for title in titles:
            assert not box.overlaps(title.get_window_extent(renderer)), title.get_text()
        assert not any(box.overlaps(other) for other in boxes[n + 1:])


def _visible_tick_labels(ax) -> list[str]:
    low, high = sorted(ax.get_xlim())
    return [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if low <= v <= high]


def _assert_integer_epoch_ticks(fig) -> None:
    fig.canvas.draw()
    epoch_axes = [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert epoch_axes
    for ax in epoch_axes:
        labels = _visible_tick_labels(ax)
        assert labels and all(text.replace("\u2212", "-").lstrip("-").isdigit() for text in labels), labels


def _rgba(color) -> tuple:
    from matplotlib.colors import to_rgba

    return to_rgba(color)


def _panel(fig, title: str):
    """The axes whose title (or legend title, for a panel of several quantities) is title."""
    for ax in fig.axes:
        legend = ax.get_legend()
        if ax.get_title() == title or (legend is not None and legend.get_title().get_text() == title):
            return ax
    raise AssertionError(f"no panel {title!r}")


@needs_matplotlib
def test_curves_of_several_runs(tmp_path):
    kd = _write_run(tmp_path / "kd,res32x4,res8x4", 3, ("loss_ce", "loss_kd"))
    vanilla = _write_run(tmp_path / "vanilla,res8x4", 2, ("loss_ce",))
    out = tmp_path / "plots" / "curves.png"
    assert _plot_tool().main(["curves", str(kd), str(vanilla), "-o", str(out)]) == [str(out)]
    _assert_png(out)


@needs_matplotlib
def test_curves_read_at_a_glance(tmp_path):
    """The issue's case: a KD run whose loss_kd is ~0.01 beside loss_ce ~2 and a test loss ~4.6, next to a vanilla
    run; labels from config.yaml, a panel per kind, log scale for the loss terms, integer epochs, legends outside."""
    kd = _write_run(tmp_path / "kd,res32x4,res8x4,DISTILLER.TEACHER:resnet8,SOLVER.EPOCHS:3", 3,
                    ("loss_ce", "loss_kd"), {"loss_kd": 0.005}, cfg="kd/resnet32x4_resnet8x4.yaml",
                    opts=("SOLVER.EPOCHS", "3"))
    ls = _write_run(tmp_path / "kd-ls", 3, ("loss_ce", "loss_kd"), {"loss_kd": 0.005},
                    cfg="kd/resnet32x4_resnet8x4.yaml", opts=("EXPERIMENT.LOGIT_STAND", "True",
                                                              "EXPERIMENT.BASE_TEMP", "2.0", "EXPERIMENT.KD_WEIGHT",
                                                              "9.0", "EXPERIMENT.SEED", "1"))
    vanilla = _write_run(tmp_path / "vanilla", 2, ("loss_ce",), cfg="vanilla/resnet8.yaml")
    fig = curves_figure([str(kd), str(ls), str(vanilla)])
    (run_legend,) = fig.legends
    assert [t.get_text() for t in run_legend.get_texts()] == [
        "KD resnet32x4→resnet8x4 · seed 0", "KD+LS (τ=2, w=9) resnet32x4→resnet8x4 · seed 1",
        "vanilla resnet8 · seed 0"]
    colors = [tuple(h.get_color()) for h in run_legend.legend_handles]
    assert len(set(colors)) == 3
    accuracy, losses, test_loss = _panel(fig, "top-1 accuracy"), _panel(fig, "training loss"), _panel(fig, "test loss")
    assert losses.get_yscale() == "log" and test_loss.get_yscale() == "linear" and accuracy.get_yscale() == "linear"
    assert [t.get_text() for t in losses.get_legend().get_texts()] == ["loss_ce", "loss_kd", "total (train_loss)"]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["test", "train"]
    for ax in (accuracy, losses, test_loss):  # every line has the colour of its run
        assert {tuple(_rgba(line.get_color())) for line in ax.get_lines()} <= set(colors)
    assert [list(line.get_ydata()) for line in test_loss.get_lines()] == [[4.6] * 3, [4.6] * 3, [4.6] * 2]
    _assert_legends_clear_of_the_data(fig)
    _assert_integer_epoch_ticks(fig)
    require_matplotlib().close(fig)


@needs_matplotlib
def test_curves_of_close_terms_stay_linear_and_last_keeps_a_window(tmp_path):
    run = _write_run(tmp_path / "run", 6, ("loss_ce", "loss_kd"), {"loss_kd": 0.5})
    fig = curves_figure([str(run)], last=2)
    losses = _panel(fig, "training loss")
    assert losses.get_yscale() == "linear"  # loss_kd is half of loss_ce: no decades to span
    assert all(list(line.get_xdata()) == [5, 6] for ax in fig.axes for line in ax.get_lines())
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run"]  # no config.yaml: the folder's name
    _assert_legends_clear_of_the_data(fig)
    _assert_integer_epoch_ticks(fig)
    require_matplotlib().close(fig)
    fig = curves_figure([str(run)], last=1)  # a single epoch: one integer tick, at it
    fig.canvas.draw()
    assert all(_visible_tick_labels(ax) == ["6"] for ax in fig.axes)
    require_matplotlib().close(fig)
    with pytest.raises(MdistillerError, match="--last must be a positive number of epochs, got 0"):
        curves_figure([str(run)], last=0)


def test_run_labels_given_clashing_or_missing(tmp_path):
    a = _write_run(tmp_path / "a", 1, ("loss_ce",), cfg="vanilla/resnet8.yaml", opts=("SOLVER.LR", "0.1"))
    b = _write_run(tmp_path / "b", 1, ("loss_ce",), cfg="vanilla/resnet8.yaml", opts=("SOLVER.LR", "0.05"))
    assert run_labels([str(a), str(b)]) == ["vanilla resnet8 · seed 0 · LR=0.1", "vanilla resnet8 · seed 0 · LR=0.05"]
    assert run_labels([str(a), str(b)], ["fast", "slow"]) == ["fast", "slow"]
    with pytest.raises(MdistillerError, match="1 --label for 2 run folders: give one per run"):
        run_labels([str(a), str(b)], ["fast"])
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    c = _write_run(tmp_path / "x" / "run", 1, ("loss_ce",))
    d = _write_run(tmp_path / "y" / "run", 1, ("loss_ce",))
    assert run_labels([str(c), str(d)]) == ["x/run", "y/run"]  # no config.yaml: folder names, told apart


@needs_matplotlib
def test_curves_cli_with_labels_and_window(tmp_path):
    run = _write_run(tmp_path / "run", 4, ("loss_ce",), cfg="vanilla/resnet8.yaml")
    out = tmp_path / "curves.png"
    assert _plot_tool().main(["curves", str(run), "--label", "mine", "--last", "3", "-o", str(out)]) == [str(out)]
    _assert_png(out)


def _result(best: float, seed: int) -> str:
    return f"best_top1={best:.4f}\tlast_top1={best - 1:.4f}\tseed={seed}\tepochs=240\tconfig_hash=h\trun_dir=/r\n"


@pytest.fixture
def logs(tmp_path) -> Path:
    """KD 73/74/75 and KD+LS(2,9) 76/77 on resnet32x4 -> resnet8x4 (published 73.33, 76.62), the vanilla teacher
    (published 79.42) and student (none), and DKD on a pair the papers never ran."""
    folder = tmp_path / "logs"
    folder.mkdir()
    files = {
        "KD,resnet32x4,resnet8x4.txt": [73, 74, 75],
        "KD,resnet32x4,resnet8x4,2,9.txt": [76, 77],
        "NONE,none,resnet32x4.txt": [79, 79.5],
        "NONE,none,resnet8x4.txt": [72.5],
        "DKD,resnet20,resnet8.txt": [60],
    }
    for name, values in files.items():
        (folder / name).write_text("".join(_result(v, seed) for seed, v in enumerate(values)))
    return folder


@needs_matplotlib
def test_table_bars_are_the_table_means_with_published_markers(logs):
    from matplotlib.container import BarContainer

    table = report(str(logs), published=True)
    fig = table_figure(table)
    ax = fig.axes[0]
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    assert set(bars) == set(table.rows)
    centers = {}
    for row, container in bars.items():
        columns = [c for c in table.columns if (row, c) in table.cells]
        assert [p.get_height() for p in container.patches] == [table.cells[(row, c)].mean for c in columns]
        for patch, column in zip(container.patches, columns):
            centers[(row, column)] = patch.get_x() + patch.get_width() / 2
    assert bars["KD"].patches[0].get_height() == 74.0
    (kd_errors,) = bars["KD"].errorbar.lines[2]  # the std as an error bar: 74 ± 1
    assert np.allclose(kd_errors.get_segments()[0], [[centers[("KD", ("resnet32x4", "resnet8x4"))], 73.0],
                                                     [centers[("KD", ("resnet32x4", "resnet8x4"))], 75.0]])
    (published,) = [c for c in ax.collections if c.get_label() == "published"]
    marked = {(seg[0][0] + seg[1][0]) / 2: seg[0][1] for seg in published.get_segments()}  # a dash across the bar
    pair = ("resnet32x4", "resnet8x4")
    assert marked == {centers[("teacher (vanilla)", pair)]: 79.42, centers[("KD", pair)]: 73.33,
                      centers[("KD+LS (τ=2, w=9)", pair)]: 76.62}  # none for the student, none for DKD's pair
    assert [t.get_text() for t in ax.get_xticklabels()] == ["resnet32x4\n→ resnet8x4", "resnet20\n→ resnet8"]
    _assert_legends_clear_of_the_data(fig)
    require_matplotlib().close(fig)
    fig = table_figure(report(str(logs)), show_published=False)
    assert not [c for c in fig.axes[0].collections if c.get_label() == "published"]
    require_matplotlib().close(fig)


@needs_matplotlib
def test_table_cli_writes_the_png(logs, tmp_path, capsys):
    out = tmp_path / "fig" / "table.png"
    assert _plot_tool().main(["table", "--logs", str(logs), "--last", "-o", str(out)]) == [str(out)]
    _assert_png(out)
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(MdistillerError, match="no result files"):
        _plot_tool().main(["table", "--logs", str(tmp_path / "fig"), "-o", str(out)])


@needs_matplotlib
def test_table_leaves_out_published_numbers_beside_runs_on_other_data(tmp_path, capsys, monkeypatch):
    run = _write_run(tmp_path / "run", 1, ("loss_ce",), cfg="kd/resnet32x4_resnet8x4.yaml",
                     opts=("DATASET.TYPE", "cifar10"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "KD,resnet32x4,resnet8x4.txt").write_text(_result(70.0, 0).replace("/r", str(run)))
    shown = {}
    plots = importlib.import_module("mdistiller.analysis.plots")
    monkeypatch.setattr(plots, "plot_table", lambda table, out, show_published: shown.update(
        published=show_published, cell=table.cells[("KD", ("resnet32x4", "resnet8x4"))]) or out)
    _plot_tool().main(["table", "--logs", str(tmp_path / "logs"), "-o", str(tmp_path / "t.png")])
    assert shown["published"] is False and shown["cell"].published is None
    assert "note: runs on cifar10 (their config.yaml): the published CIFAR-100 numbers are left out" in (
        capsys.readouterr().out)


@needs_matplotlib
def test_logit_stats_figures_say_what_is_compared(one_thread):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(200, 10, generator=generator) * 3
    student = torch.randn(200, 10, generator=generator) + 1
    names = ("teacher resnet20", "student resnet8 (KD+LS, τ=2, w=9)")  # long names: the legend must still fit
    hist, corr = logit_stats_figures(teacher, student, names, "CIFAR-10 test set")
    assert hist.get_suptitle() == f"logits of {names[0]} vs {names[1]} on the CIFAR-10 test set (200 images)"
    assert [t.get_text() for t in hist.legends[0].get_texts()] == list(names)
    assert [ax.get_xlabel() for ax in hist.axes] == ["logit mean (logit units)",
                                                     "logit standard deviation (logit units)"]
    _assert_legends_clear_of_the_data(hist)
    titles = [ax.get_title() for ax in corr.axes]
    assert titles[:2] == list(names) and titles[2].startswith(f"{names[0]} − {names[1]} (mean |Δr| ")
    bars = [ax.get_ylabel() for ax in corr.axes[3:]]
    assert bars == ["Pearson r between two classes' logits", "Δ Pearson r (teacher − student)"]
    corr.canvas.draw()
    assert all(_visible_tick_labels(ax) == [str(c) for c in range(10)] for ax in corr.axes[:3])  # class numbers
    plt = require_matplotlib()
    plt.close(hist)
    plt.close(corr)


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
def test_logit_stats_on_the_test_set(tmp_path, cifar100_tiny_root, teacher_ckpt, capsys, monkeypatch):
    student = save_teacher(str(tmp_path / "student.pth"), "resnet8", seed=1)
    prefix = tmp_path / "stats" / "kd"
    plots = importlib.import_module("mdistiller.analysis.plots")
    drawn = plots.plot_logit_stats
    seen = {}
    monkeypatch.setattr(plots, "plot_logit_stats", lambda t, s, out, names, data: seen.update(
        names=names, data=data, n=len(t)) or drawn(t, s, out, names, data))
    paths = _plot_tool().main(["logit-stats", "-t", "resnet8", "-tc", teacher_ckpt("resnet8"), "-s", "resnet8",
                               "-sc", student, "--data-root", cifar100_tiny_root, "--num-workers", "0",
                               "--names", "teacher", "student, KD+LS", "-o", str(prefix)])
    assert paths == [f"{prefix}_mean_std.png", f"{prefix}_corr_diff.png"]
    assert seen == {"names": ("teacher", "student, KD+LS"), "data": "CIFAR-100 test set", "n": 32}
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
