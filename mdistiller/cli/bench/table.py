"""The row table (the default mode): each selected row timed on the base config, the loader rows on an ImageNet
JPEG folder, or one row profiled (--profile)."""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from ...engine.validate import check_writable
from ...errors import MdistillerError
from .data import CifarData, ImageNetData, JpegFolderData
from .output import add_ratios, emit, legend, loader_grid, metadata, prepare, row_grid
from .profiling import profile_row
from .rows import TINY_CIFAR_OPTS, TINY_IMAGENET_OPTS, family_of, large_batch_source, load, row_cfg, select_rows
from .timing import loader_warmup_steps, time_loader_row, time_row, warmup_steps


def header(meta: dict) -> str:
    """The lines above the table."""
    lines = [f"device: {meta['device']}, torch {meta['torch']}, {meta['date']}",
             f"config: {meta['config']} ({meta['pair']}); data: {meta['data']}",
             "teacher: random-initialised weights (speed does not depend on them)"]
    if meta.get("loader_data"):
        lines.append(f"loader rows: {meta['loader_data']}")
    if meta["device_type"] == "cpu" and meta["family"] == "cifar":
        lines.append("on the CPU, 'ours' reads the same DataLoader as 'reference' (data live on the GPU only on "
                     "CUDA): it differs by the per-step host sync alone")
    return "\n".join(lines)


def bench_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Time the selected rows and print the table (or profile one row); returns the rows' results."""
    base = load(args.cfg, list(args.opts))
    family = family_of(base)
    rows = select_rows(args.profile[0] if args.profile else args.rows, family, device)
    steps = prepare(args, device)
    if args.profile:
        check_writable(args.profile[1], "the --profile folder")
        if rows[0].loader_only:
            raise MdistillerError(f"--profile traces training steps; row {rows[0].name} times the loader alone")
    tiny = list(TINY_IMAGENET_OPTS if family == "imagenet" else TINY_CIFAR_OPTS) if args.tiny else []
    with contextlib.ExitStack() as stack:
        data = ImageNetData() if family == "imagenet" else CifarData(base, args.data, args.synthetic_size, stack)
        base_opts = [*tiny, *data.opts(), *args.opts]
        # every config checked before any timing
        cfgs = {row.name: row_cfg(args, row, base_opts) for row in rows if not row.loader_only}
        loader_rows = [row for row in rows if row.loader_only]
        jpegs = None
        if loader_rows:
            jpegs = JpegFolderData(load(args.cfg, [*tiny, *args.opts]), stack)
            cfgs.update({row.name: row_cfg(args, row, [*tiny, *args.opts, *jpegs.opts()]) for row in loader_rows})
        if args.profile:
            row = rows[0]
            profile_row(row, cfgs[row.name], data, device, warmup_steps(args.warmup, cfgs[row.name], device),
                        args.profile[1])
            return []
        first = cfgs[rows[0].name]
        meta = metadata(device, config=args.cfg, family=family,
                        pair=f"{first.DISTILLER.TYPE} {first.DISTILLER.TEACHER} -> {first.DISTILLER.STUDENT}",
                        data=data.describe())
        if jpegs is not None:
            meta["loader_data"] = jpegs.describe()
        print(header(meta), flush=True)
        results, loader_results = [], []
        for row in loader_rows:
            warmup = loader_warmup_steps(args.warmup, device)
            print(f"  timing {row.name}: {warmup} warm-up + {steps} batches ...", file=sys.stderr, flush=True)
            loader_results.append(time_loader_row(row, cfgs[row.name], jpegs, device, steps, warmup))
        for row in rows:
            if row.loader_only:
                continue
            warmup = warmup_steps(args.warmup, cfgs[row.name], device)
            print(f"  timing {row.name}: {warmup} warm-up + {steps} steps ...", file=sys.stderr, flush=True)
            results.append(time_row(row, cfgs[row.name], data, device, steps, warmup))
            if row.large_batch:
                results[-1]["what"] += f"; config {large_batch_source(args)}"
    base_name = add_ratios(results) if results else None
    text, markdown = [], ""
    if results:
        text += [row_grid(results, base_name).text(),
                 f"s/epoch: {results[0]['epoch_images']:,} training images / images/s (timed on full batches only)",
                 legend(results)]
        markdown = row_grid(results, base_name, "peak GPU memory").markdown() + "\n\n" + legend(results, True)
    if loader_results:
        text += [loader_grid(loader_results).text(), legend(loader_results)]
    emit(args, text, markdown, {**meta, "ratio_to": base_name, "rows": results, "loader_rows": loader_results})
    return results + loader_results
