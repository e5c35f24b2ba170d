"""Per-method mode (`--methods`): one row (`ours` unless --rows names another) timed for each method's config, KD's
first, and each method's step time relative to KD's, beside the DKD paper's ratio where it published one."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from ...dataset.cifar import CIFAR_FORMATS
from ...engine.build import build_distiller
from ...engine.dot import DOT_TRAINERS
from ...errors import MdistillerError
from ...files import resolve_project_path
from .data import CifarData
from .output import emit, metadata, methods_grid, prepare
from .rows import TINY_CIFAR_OPTS, Row, family_of, load, select_rows
from .timing import time_row, warmup_steps

# Step time per batch of 64, resnet32x4 -> resnet8x4, relative to KD's (DKD paper, Zhao et al. 2022, Fig. 1 / Table:
# KD 11 ms, FitNet 14, OFD 19, RKD 25, ReviewKD 26, CRD 41): DISTILLER.TYPE -> ratio
PAPER_STEP_VS_KD = {"KD": 1.0, "FITNET": 14 / 11, "OFD": 19 / 11, "RKD": 25 / 11, "REVIEWKD": 26 / 11, "CRD": 41 / 11}
DOT_NAMES = ("kd+dot", "dot")


@dataclass(frozen=True)
class Method:
    """One method of the per-method table: its label (the name given) and its config file."""

    label: str
    path: str


def method_config(item: str, pair: str) -> Method:
    """A --methods item: a config file (a path or *.yaml), or a name -> configs/cifar100/<name>/<pair>.yaml."""
    if item.endswith((".yaml", ".yml")) or os.sep in item:
        if not os.path.isfile(resolve_project_path(item)):
            raise MdistillerError(f"--methods: config file not found: {item}")
        folder, stem = os.path.basename(os.path.dirname(item)), os.path.splitext(os.path.basename(item))[0]
        return Method(f"{folder}/{stem}" if folder else stem, item)
    name = item.lower()
    folder = "dot" if name in DOT_NAMES else name
    path = f"configs/cifar100/{folder}/{pair}.yaml"
    if not os.path.isfile(resolve_project_path(path)):
        raise MdistillerError(f"--methods: no config for method {item!r}: {path} does not exist (give a config file, "
                              f"or another --pair)")
    return Method(name, path)


def select_methods(text: str, pair: str) -> list[Method]:
    """KD first (the base of the ratios), then the listed methods in order, each once."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    methods = [method_config("kd", pair)]
    for item in items:
        method = method_config(item, pair)
        same = [m for m in methods if os.path.abspath(resolve_project_path(m.path)) ==
                os.path.abspath(resolve_project_path(method.path))]
        if same and same[0].label != "kd":
            raise MdistillerError(f"--methods names {method.path} twice ({same[0].label}, {method.label})")
        if not same:
            methods.append(method)
    return methods


def methods_row(args: argparse.Namespace, device: torch.device) -> Row:
    """The one row timed for every method: `ours` unless --rows names one other training row."""
    if args.cfg is not None or args.profile:
        raise MdistillerError("--methods picks each method's config and times one row: leave out --cfg and --profile")
    names = [n.strip() for n in args.rows.split(",") if n.strip()] or ["ours"]
    if len(names) != 1:
        raise MdistillerError(f"--methods times one row for every method; --rows names {len(names)}: {args.rows}")
    row = select_rows(names[0], "cifar", device)[0]
    if row.large_batch:
        raise MdistillerError("--methods times each method's own config; row large_batch is the KD large-batch config")
    return row


def bench_methods(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Per-method mode: one row for each method's config, KD first; prints the table, returns the rows' results."""
    row = methods_row(args, device)
    methods = select_methods(args.methods, args.pair)
    steps = prepare(args, device)
    tiny = list(TINY_CIFAR_OPTS) if args.tiny else []
    loaded = [load(resolve_project_path(m.path), [*tiny, *args.opts]) for m in methods]
    for method, cfg in zip(methods, loaded):
        if family_of(cfg) != "cifar" or cfg.DATASET.TYPE != loaded[0].DATASET.TYPE:
            raise MdistillerError(f"--methods times methods on KD's data ({loaded[0].DATASET.TYPE}); {method.path} "
                                  f"trains on {cfg.DATASET.TYPE}")
    for cfg in loaded:  # each built once before any data or timing: what only a built method finds fails now
        classes = cfg.DATASET.NUM_CLASSES or CIFAR_FORMATS[cfg.DATASET.TYPE].num_classes
        build_distiller(cfg, classes, random_teacher=True)
    results = []
    with contextlib.ExitStack() as stack:
        data = CifarData(loaded[0], args.data, args.synthetic_size, stack)
        opts = [*tiny, *data.opts(), *args.opts, *row.opts]
        cfgs = [load(resolve_project_path(m.path), opts) for m in methods]
        meta = metadata(device, mode="methods", row=row.name,
                        pair=f"{cfgs[0].DISTILLER.TEACHER} -> {cfgs[0].DISTILLER.STUDENT}", data=data.describe())
        print(f"device: {meta['device']}, torch {meta['torch']}, {meta['date']}\n"
              f"per-method: row {row.name} ({row.what}), {meta['pair']}; data: {meta['data']}\n"
              "teacher: random-initialised weights (speed does not depend on them)", flush=True)
        for method, cfg in zip(methods, cfgs):
            warmup = warmup_steps(args.warmup, cfg, device)
            print(f"  timing {method.label}: {warmup} warm-up + {steps} steps ...", file=sys.stderr, flush=True)
            result = time_row(row, cfg, data, device, steps, warmup)
            trainer = "+DOT" if cfg.SOLVER.TRAINER in DOT_TRAINERS else ""
            paper = PAPER_STEP_VS_KD.get(cfg.DISTILLER.TYPE) if not trainer else None
            result.update(method=method.label, config=method.path, distiller=cfg.DISTILLER.TYPE + trainer,
                          step_ms=1000.0 * result["seconds"] / result["steps"], paper_step_vs_kd=paper)
            results.append(result)
    for r in results:
        r["step_vs_kd"] = r["step_ms"] / results[0]["step_ms"]
        r["ratio"] = r["images_per_s"] / results[0]["images_per_s"]
    grid = methods_grid(results)
    emit(args, [grid.text(),
                f"s/epoch: {results[0]['epoch_images']:,} training images / images/s; step vs KD: the method's ms/step "
                "over KD's (1.30 = 30% slower); paper: the DKD paper's ratio (ms per batch of 64, resnet32x4 -> "
                "resnet8x4, GPU)",
                "\n".join(f"  {r['method']}: {r['config']} ({r['distiller']})" for r in results)],
         grid.markdown(), {**meta, "ratio_to": results[0]["method"], "rows": results})
    return results
