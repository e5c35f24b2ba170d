"""What every bench mode prints and writes: the setup they share (--json checked first, cudnn.benchmark, steps per
row), the metadata, the tables (one Grid type, rendered as text or Markdown) and the JSON file."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

from ...analysis.table import Grid
from ...engine.validate import check_writable
from ..report import write_text


def prepare(args: argparse.Namespace, device: torch.device) -> int:
    """Before any timing: the --json folder checked (fail now, not after minutes of timing), cudnn.benchmark on CUDA
    (mdistiller's setting, and our runs' unless EXPERIMENT.DETERMINISTIC); returns the timed steps per row."""
    if args.json:
        check_writable(os.path.dirname(os.path.abspath(args.json)), "the --json folder")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return args.steps or (200 if device.type == "cuda" else 20)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def metadata(device: torch.device, **fields) -> dict:
    """The device, torch version and date of a bench, with the mode's own fields; the teacher's weights are random."""
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **fields, "teacher_weights": "random"}


def _rate(r: dict) -> str:
    return f"{r['images_per_s']:,.0f}" if r["images_per_s"] >= 100 else f"{r['images_per_s']:.1f}"


def _peak(r: dict) -> str:
    return "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib'] / 1024:.2f} GiB"


def add_ratios(rows: list[dict]) -> str:
    """Each row's images/s over the reference row's (or the first row's when reference was not run)."""
    base = next((r for r in rows if r["name"] == "reference"), rows[0])
    for r in rows:
        r["ratio"] = r["images_per_s"] / base["images_per_s"]
    return base["name"]


def row_grid(rows: list[dict], base: str, memory: str = "peak GPU mem") -> Grid:
    """The row table."""
    return Grid.of(["row", "batch", "images/s", "s/epoch", memory, f"vs {base}"],
                   [[r["name"], str(r["batch"]), _rate(r), f"{r['seconds_per_epoch']:.1f}", _peak(r),
                     f"{r['ratio']:.2f}"] for r in rows])


def loader_grid(rows: list[dict]) -> Grid:
    """The loader rows' table, with each row's images/s over the first one's."""
    return Grid.of(["loader row", "batch", "workers", "batches/s", "images/s", f"vs {rows[0]['name']}"],
                   [[r["name"], str(r["batch"]), str(r["workers"]), f"{r['batches_per_s']:.2f}",
                     f"{r['images_per_s']:,.1f}", f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}"]
                    for r in rows])


def methods_grid(rows: list[dict]) -> Grid:
    """The per-method table."""
    def paper(r: dict) -> str:
        return "-" if r["paper_step_vs_kd"] is None else f"{r['paper_step_vs_kd']:.2f}"
    return Grid.of(["method", "batch", "images/s", "ms/step", "step vs KD", "paper", "s/epoch", "peak GPU mem"],
                   [[r["method"], str(r["batch"]), _rate(r), f"{r['step_ms']:.1f}", f"{r['step_vs_kd']:.2f}",
                     paper(r), f"{r['seconds_per_epoch']:.1f}", _peak(r)] for r in rows])


def legend(rows: list[dict], markdown: bool = False) -> str:
    """One line per row: what it switches and where its data come from."""
    if markdown:
        return "\n".join(f"- `{r['name']}`: {r['what']}; data: {r['data']}" for r in rows)
    return "\n".join(f"  {r['name']}: {r['what']}; data: {r['data']}" for r in rows)


def emit(args: argparse.Namespace, text: list[str], markdown: str, payload: dict) -> None:
    """Print the text blocks, the Markdown (with --markdown, when there is any), and write the JSON (with --json)."""
    for block in text:
        print(block)
    if args.markdown and markdown:
        print()
        print(markdown)
    if args.json:
        write_json(args.json, payload)


def write_json(path: str, payload: dict) -> None:
    """The results as JSON."""
    write_text(path, json.dumps(payload, indent=2))
