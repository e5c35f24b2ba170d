"""Training curves from worklogs and the logit-standardisation paper's logit diagnostics, as PNG files.

matplotlib is the optional extra `[plots]`: it is imported inside the plotting functions only, and its absence is a
one-line error naming the install command.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MdistillerError
from .report import read_worklog


def require_matplotlib():
    """matplotlib.pyplot on the file-only Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MdistillerError("plotting needs matplotlib: pip install -e .[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise MdistillerError(f"could not write {path}: {exc.strerror or exc}") from None
    return path


def _labels(run_dirs: Sequence[str]) -> list[str]:
    """Run folder names, with their parent where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [
        os.path.join(os.path.basename(os.path.dirname(os.path.normpath(d))), n) if names.count(n) > 1 else n
        for d, n in zip(run_dirs, names)
    ]


def plot_curves(run_dirs: Sequence[str], out: str) -> str:
    """Test top-1 and every loss term against the epoch, one colour per run; returns the PNG's path."""
    plt = require_matplotlib()
    runs = [(label, read_worklog(os.path.join(d, "worklog.txt"))) for label, d in zip(_labels(run_dirs), run_dirs)]
    empty = [label for label, epochs in runs if not epochs]
    if empty:
        raise MdistillerError(f"no finished epoch in the worklog of {empty[0]}")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = ["-", "--", ":", "-."]
    for index, (label, epochs) in enumerate(runs):
        color = f"C{index % 10}"
        x = [e["epoch"] for e in epochs]
        ax_acc.plot(x, [e.get("test_acc", np.nan) for e in epochs], color=color, label=label)
        terms = [k for k in epochs[-1] if k.startswith("loss_")] + ["train_loss", "test_loss"]
        for n, term in enumerate(t for t in terms if t in epochs[-1]):
            ax_loss.plot(x, [e.get(term, np.nan) for e in epochs], color=color, linestyle=styles[n % len(styles)],
                         label=f"{label}: {term}")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test top-1")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss terms")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = _save(fig, out)
    plt.close(fig)
    return path


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


def plot_logit_stats(teacher_logits: torch.Tensor, student_logits: torch.Tensor, out_prefix: str,
                     names: tuple[str, str] = ("teacher", "student")) -> list[str]:
    """`<prefix>_mean_std.png`: histograms of per-sample logit mean and std for teacher and student;
    `<prefix>_corr_diff.png`: teacher minus student class-correlation matrix as a heat map. Returns both paths."""
    plt = require_matplotlib()
    if teacher_logits.shape != student_logits.shape:
        raise MdistillerError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ"
        )
    teacher, student = logit_statistics(teacher_logits), logit_statistics(student_logits)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("mean", "std"), ("per-sample logit mean", "per-sample logit std")):
        both = np.concatenate([teacher[key], student[key]])
        bins = np.linspace(both.min(), both.max() + 1e-9, 40)
        ax.hist(teacher[key], bins=bins, alpha=0.6, label=names[0])
        ax.hist(student[key], bins=bins, alpha=0.6, label=names[1])
        ax.set(title=title, xlabel=key, ylabel="samples")
        ax.legend()
    paths = [_save(fig, f"{out_prefix}_mean_std.png")]
    plt.close(fig)
    diff = teacher["class_corr"] - student["class_corr"]
    limit = max(float(np.abs(diff).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="correlation difference")
    ax.set(title=f"class correlation of the logits: {names[0]} − {names[1]}",
           xlabel=f"class (mean |difference| {np.abs(diff).mean():.3f})", ylabel="class")
    paths.append(_save(fig, f"{out_prefix}_corr_diff.png"))
    plt.close(fig)
    return paths
