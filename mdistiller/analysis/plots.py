"""Figures a person reads at a glance, as PNG files: training curves from worklogs, the results table as a bar chart,
and the logit-standardisation paper's logit diagnostics.

matplotlib is the optional extra `[plots]`: it is imported inside the plotting functions only, and its absence is a
one-line error naming the install command. Each figure has a builder returning the matplotlib Figure (the tests read
its geometry) and a `plot_*` function that writes the PNG. Legends sit outside the data area, placed by matplotlib's
constrained layout; epoch axes have integer ticks.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from ..distillers import distiller_dict
from ..engine import worklog
from ..errors import MdistillerError
from .report import Table, column_label, method_label

DPI = 100
LOG_SCALE_RATIO = 20.0  # loss terms whose largest / smallest value exceeds this share a log axis
MARKERS_UP_TO = 40  # epochs per run shown with a marker on each point (a single epoch is then still visible)


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MdistillerError("plotting needs matplotlib: pip install -e .[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Write fig as a PNG (creating the folder) and close it; returns the path."""
    plt = require_matplotlib()
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    except OSError as exc:
        raise MdistillerError(f"could not write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def _colors(n: int) -> list:
    """One distinct colour per run or row: tab10, tab20 beyond 10, a sampled colour map beyond 20."""
    plt = require_matplotlib()
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(v) for v in np.linspace(0.05, 0.95, n)]


# ---- run labels ----

def _folder_labels(run_dirs: Sequence[str]) -> list[str]:
    """Run folder names, with their parent where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [
        os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n) if names.count(n) > 1 else n
        for d, n in zip(run_dirs, names)
    ]


def read_run_config(run_dir: str) -> dict | None:
    """The run's config.yaml (what it actually used) as nested dicts, or None when it has none or it is unreadable."""
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _flat(cfg: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_label(cfg: dict) -> str:
    """`KD resnet32x4→resnet8x4 · seed 0`, `KD+LS (τ=2, w=9) ...`, `vanilla resnet8 · seed 1`."""
    flat = _flat(cfg)
    method = str(flat.get("DISTILLER.TYPE", "?"))
    student = str(flat.get("DISTILLER.STUDENT", "?"))
    cls = distiller_dict.get(method)
    needs_teacher = cls.declares.requires_teacher if cls is not None else method != "NONE"
    ls = None
    if flat.get("EXPERIMENT.LOGIT_STAND"):
        base_temp = float(flat.get("EXPERIMENT.BASE_TEMP") or 0)
        ls = (_fmt(base_temp), _fmt(float(flat.get("EXPERIMENT.KD_WEIGHT") or 0))) if base_temp > 0 else ()
    if needs_teacher:
        text = f"{method_label(method, ls)} {flat.get('DISTILLER.TEACHER', '?')}→{student}"
    else:
        text = f"{'vanilla' if method == 'NONE' else method_label(method, ls)} {student}"
    if "EXPERIMENT.SEED" in flat:
        text += f" · seed {flat['EXPERIMENT.SEED']}"
    return text


# keys that say where a run worked, not what it computed: never what tells two runs apart in a legend
_WHERE_KEYS = ("LOG.", "DATASET.ROOT", "DATASET.NUM_WORKERS", "EXPERIMENT.NAME", "EXPERIMENT.TAG", "EXPERIMENT.PROJECT")
_MAX_DIFFERING_KEYS = 3


def _differing(configs: list[dict[str, object]]) -> list[str]:
    keys = sorted({k for c in configs for k in c})
    return [k for k in keys if not k.startswith(_WHERE_KEYS) and len({repr(c.get(k)) for c in configs}) > 1]


def run_labels(run_dirs: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """Short legend labels: the given ones, else method, pair, LS setting and seed from each run's config.yaml (plus
    the config keys that tell runs with the same label apart), else the folder name."""
    if labels:
        if len(labels) != len(run_dirs):
            raise MdistillerError(f"{len(labels)} --label for {len(run_dirs)} run folders: give one per run, in order")
        return list(labels)
    folders = _folder_labels(run_dirs)
    configs = [read_run_config(d) for d in run_dirs]
    out = [config_label(c) if c is not None else f for c, f in zip(configs, folders)]
    for label in set(out):
        same = [i for i, text in enumerate(out) if text == label]
        if len(same) < 2:
            continue
        if any(configs[i] is None for i in same):
            for i in same:
                out[i] = folders[i]
            continue
        flats = [_flat(configs[i]) for i in same]
        keys = _differing(flats)
        for i, flat in zip(same, flats):
            if keys and len(keys) <= _MAX_DIFFERING_KEYS:
                out[i] = label + " · " + ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(flat.get(k))}" for k in keys)
            else:
                out[i] = folders[i]
    return out


# ---- training curves ----

def _panels(epochs_of_runs: list[list[dict[str, float]]]) -> list[tuple[str, str, list[str]]]:
    """(title, y label, quantities) of the panels the worklogs have data for: accuracy, training loss terms, test
    loss."""
    keys = [k for epochs in epochs_of_runs for e in epochs for k in e]
    present = list(dict.fromkeys(keys))
    terms = [k for k in present if k.startswith("loss_")]
    if len(terms) != 1 and "train_loss" in present:  # with one term, train_loss is that term again
        terms.append("train_loss")
    panels = [
        ("top-1 accuracy", "top-1 (%)", [k for k in ("test_acc", "train_acc") if k in present]),
        ("training loss", "loss (per step, epoch mean)", terms),
        ("test loss", "cross-entropy", ["test_loss"] if "test_loss" in present else []),
    ]
    return [p for p in panels if p[2]]


_QUANTITY_NAMES = {"test_acc": "test", "train_acc": "train", "train_loss": "total (train_loss)"}
_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]


def _style(n: int):
    return _STYLES[n % len(_STYLES)]


def _spans_decades(values: Iterable[float]) -> bool:
    finite = [v for v in values if np.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return max(finite) / min(finite) > LOG_SCALE_RATIO


def curves_figure(run_dirs: Sequence[str], labels: Sequence[str] | None = None, last: int | None = None):
    """The figure: one panel per kind of quantity (accuracy, training loss terms, test loss) against the epoch, one
    colour per run, one line style per quantity; `last` keeps the last N epochs of the longest run."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogLocator, MaxNLocator

    if last is not None and last <= 0:
        raise MdistillerError(f"--last must be a positive number of epochs, got {last}")
    names = run_labels(run_dirs, labels)
    runs = [worklog.read(d) for d in run_dirs]
    for name, epochs in zip(names, runs):
        if not epochs:
            raise MdistillerError(f"no finished epoch in the worklog of {name}")
    first_shown = 1
    if last is not None:
        first_shown = max(int(e["epoch"]) for epochs in runs for e in epochs) - last + 1
        runs = [[e for e in epochs if e["epoch"] >= first_shown] for epochs in runs]
    panels = _panels(runs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels) + 2.4, 4.0), sharex=True,
                             layout="constrained", squeeze=False)
    axes = axes[0]
    colors = _colors(len(runs))
    for ax, (title, ylabel, quantities) in zip(axes, panels):
        for color, epochs in zip(colors, runs):
            x = [e["epoch"] for e in epochs]
            marker = "o" if len(x) <= MARKERS_UP_TO else None
            for n, quantity in enumerate(quantities):
                ax.plot(x, [e.get(quantity, np.nan) for e in epochs], color=color, linestyle=_style(n),
                        marker=marker, markersize=3, linewidth=1.4)
        values = [e.get(q, np.nan) for epochs in runs for e in epochs for q in quantities]
        if title == "training loss" and _spans_decades(values):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10))
            ylabel += ", log scale"
        ax.set_ylabel(ylabel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: one tick
        ax.grid(alpha=0.3)
        if len(quantities) > 1:  # which line style is which quantity: a legend above the panel, titled like one
            handles = [Line2D([], [], color="0.25", linestyle=_style(n)) for n in range(len(quantities))]
            ax.legend(handles, [_QUANTITY_NAMES.get(q, q) for q in quantities], title=title, loc="lower center",
                      bbox_to_anchor=(0.5, 1.01), ncols=min(len(quantities), 3), frameon=False, fontsize=8,
                      title_fontproperties={"weight": "bold", "size": 10}, borderaxespad=0.2, handlelength=2.6)
        else:
            named = f"{title}: {quantities[0]}" if quantities[0].startswith("loss_") else title
            ax.set_title(named, fontsize=10, fontweight="bold")
    shown = [int(e["epoch"]) for epochs in runs for e in epochs]
    if shown and min(shown) == max(shown):  # one epoch: a visible range around it, ticked at that epoch only
        axes[0].set_xlim(min(shown) - 0.5, min(shown) + 0.5)
    run_handles = [Line2D([], [], color=c, linewidth=2.5) for c in colors]
    run_names = [n if epochs else f"{n} (no epoch ≥ {first_shown})" for n, epochs in zip(names, runs)]
    window = f" (epochs ≥ {first_shown})" if last is not None else ""
    fig.legend(run_handles, run_names, loc="outside right upper", title=f"run{window}", fontsize=8, title_fontsize=9)
    return fig


def plot_curves(run_dirs: Sequence[str], out: str, labels: Sequence[str] | None = None,
                last: int | None = None) -> str:
    """Write the training curves of the runs as a PNG; returns its path."""
    return save_figure(curves_figure(run_dirs, labels, last), out)


# ---- the results table as bars ----

_VANILLA_COLORS = {"teacher (vanilla)": "0.35", "student (vanilla)": "0.7", "vanilla": "0.55"}


def table_figure(table: Table, show_published: bool = True):
    """Bars of mean top-1 ± sample std per row (method) and column (teacher → student pair), with the published
    number as a black dash across the bar where one is known."""
    plt = require_matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = table.rows
    method_rows = [r for r in rows if r not in _VANILLA_COLORS]
    colors = dict(zip(method_rows, _colors(len(method_rows))))
    colors.update({r: c for r, c in _VANILLA_COLORS.items() if r in rows})
    groups = [(column, [r for r in rows if (r, column) in table.cells and table.cells[(r, column)].values])
              for column in table.columns]  # a cell of runs without a number (nan) has no bar
    n_bars = sum(len(present) for _, present in groups)
    half = 0.4  # half a bar's width, in bars
    fig, ax = plt.subplots(figsize=(min(5.0 + 0.45 * n_bars + 0.45 * len(groups), 30), 4.6), layout="constrained")
    centers, values, published = [], [], []
    bars: dict[str, tuple[list, list, list, list]] = {r: ([], [], [], []) for r in rows}  # x, mean, std, n
    x = 0.0
    for column, present in groups:
        start = x
        for row in present:
            cell = table.cells[(row, column)]
            xs, means, stds, ns = bars[row]
            xs.append(x)
            means.append(cell.mean)
            stds.append(cell.std if cell.std is not None else np.nan)
            ns.append(cell.n)
            values += [cell.mean - (cell.std or 0.0), cell.mean + (cell.std or 0.0)]
            if show_published and cell.published is not None:
                published.append((x, cell.published.value))
                values.append(cell.published.value)
            x += 1.0
        centers.append((start + x - 1.0) / 2)
        x += 0.8  # a gap between pairs
    for row in rows:
        xs, means, stds, _ = bars[row]
        if xs:
            ax.bar(xs, means, width=2 * half, color=colors[row], label=row, edgecolor="white", linewidth=0.5,
                   yerr=stds, error_kw={"ecolor": "0.15", "elinewidth": 1.2, "capsize": 0})
    if published:
        ax.hlines([y for _, y in published], [px - half for px, _ in published], [px + half for px, _ in published],
                  colors="black", linewidths=2.5, label="published", zorder=3)
    low, high = min(values), max(values)
    span = max(high - low, 1.0)
    bottom = max(0.0, 5 * np.floor((low - 0.25 * span) / 5))
    ax.set_ylim(bottom, min(100.0, high + 0.12 * span))
    for row in rows:  # the number of runs at each bar's foot, so a single run's bar reads as such
        for bx, n in zip(bars[row][0], bars[row][3]):
            ax.annotate(f"n={n}", (bx, bottom), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, color="black" if row == "student (vanilla)" else "white")
    ax.set_xticks(centers, [column_label(c).replace(" → ", "\n→ ") for c, _ in groups], fontsize=8)
    ax.set_xlabel("teacher → student (or a vanilla model of its own)")
    unit = "evaluation" if table.task == "detection" else "epoch"
    which = f"best {unit}" if table.metric == "best" else f"last {unit}"
    ax.set_ylabel(f"{table.quantity} (%), {which}")
    ax.set_title(f"{table.quantity} (%), {which}: mean ± std over seeds", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles = [Patch(color=colors[r]) for r in rows]
    names = list(rows)
    handles.append(Line2D([], [], color="0.15", marker="|", linestyle="none", markersize=12, markeredgewidth=1.2))
    names.append("± sample std over seeds")
    if published:
        handles.append(Line2D([], [], color="black", linewidth=2.5))
        names.append("published (DKD paper, COCO;\nunconfirmed)" if table.task == "detection"
                     else "published (Sun et al. 2024,\nCIFAR-100)")
    fig.legend(handles, names, loc="outside right upper", title="method", fontsize=8, title_fontsize=9)
    return fig


def plot_table(table: Table, out: str, show_published: bool = True) -> str:
    """Write the results table as a bar chart PNG; returns its path."""
    return save_figure(table_figure(table, show_published), out)


# ---- logit statistics (logit-standardisation paper, Figs. 1-2) ----

@torch.no_grad()
def collect_logits(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N x C, targets N) of a model over a loader, on the CPU in fp32."""
    model.eval().to(device)
    logits, targets = [], []
    for batch in loader:
        out = model(batch["image"].to(device))
        logits.append((out[0] if isinstance(out, tuple) else out).float().cpu())
        targets.append(batch["target"].cpu())
    return torch.cat(logits), torch.cat(targets)


def logit_statistics(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample logit mean and standard deviation, and the C x C correlation between classes' logits."""
    x = logits.double()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(x.numpy(), rowvar=False)
    return {
        "mean": x.mean(dim=1).numpy(),
        "std": x.std(dim=1).numpy(),  # unbiased, as the z-score of logit standardisation
        "class_corr": np.nan_to_num(corr),  # a class whose logit never varies correlates with nothing
    }


def logit_stats_figures(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                        names: tuple[str, str] = ("teacher", "student"), data: str = "test set"):
    """(histograms of per-sample logit mean and std, teacher vs student; the class-correlation matrices of both and
    their difference) as two figures."""
    plt = require_matplotlib()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    if teacher_logits.shape != student_logits.shape:
        raise MdistillerError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ"
        )
    n, classes = teacher_logits.shape
    teacher, student = logit_statistics(teacher_logits), logit_statistics(student_logits)
    hist, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), layout="constrained")
    colors = ("C0", "C3")
    for ax, key, what in zip(axes, ("mean", "std"), ("mean", "standard deviation")):
        both = np.concatenate([teacher[key], student[key]])
        bins = np.linspace(both.min(), both.max() + 1e-9, 40)
        for stats, color in zip((teacher, student), colors):
            ax.hist(stats[key], bins=bins, color=color, alpha=0.45, histtype="stepfilled")
            ax.hist(stats[key], bins=bins, color=color, histtype="step", linewidth=1.2)
        ax.set(title=f"{what} of each image's {classes} logits", xlabel=f"logit {what} (logit units)",
               ylabel="images")
        ax.grid(alpha=0.3)
    handles = [Patch(facecolor=c, alpha=0.6, edgecolor=c) for c in colors]
    hist.legend(handles, list(names), loc="outside lower center", ncols=2, fontsize=9)
    hist.suptitle(f"logits of {names[0]} vs {names[1]} on the {data} ({n} images)", fontsize=11)

    diff = teacher["class_corr"] - student["class_corr"]
    limit = max(float(np.abs(diff).max()), 1e-6)
    corr, axes = plt.subplots(1, 3, figsize=(13.5, 4.4), layout="constrained")
    for ax, matrix, title in zip(axes[:2], (teacher["class_corr"], student["class_corr"]), names):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
    corr.colorbar(image, ax=list(axes[:2]), label="Pearson r between two classes' logits", shrink=0.85)
    image = axes[2].imshow(diff, cmap="PuOr_r", vmin=-limit, vmax=limit, interpolation="nearest")
    axes[2].set_title(f"{names[0]} − {names[1]} (mean |Δr| {np.abs(diff).mean():.3f})", fontsize=10)
    corr.colorbar(image, ax=axes[2], label="Δ Pearson r (teacher − student)", shrink=0.85)
    for ax in axes:
        ax.set(xlabel="class", ylabel="class")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: one tick
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    corr.suptitle(f"correlation between classes of the logits over the {data} ({n} images)", fontsize=11)
    return hist, corr


def plot_logit_stats(teacher_logits: torch.Tensor, student_logits: torch.Tensor, out_prefix: str,
                     names: tuple[str, str] = ("teacher", "student"), data: str = "test set") -> list[str]:
    """`<prefix>_mean_std.png`: histograms of per-sample logit mean and std for teacher and student;
    `<prefix>_corr_diff.png`: both class-correlation matrices and their difference. Returns both paths."""
    hist, corr = logit_stats_figures(teacher_logits, student_logits, names, data)
    return [save_figure(hist, f"{out_prefix}_mean_std.png"), save_figure(corr, f"{out_prefix}_corr_diff.png")]
