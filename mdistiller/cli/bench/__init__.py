"""Throughput of the training step: mdistiller's pipeline against ours and each speed switch, timed in one process.

    python tools/bench.py [--cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml] [--rows reference,ours,amp,...]
        [--device cuda|cpu] [--tiny] [--steps N] [--warmup N] [--data auto|real|synthetic] [--synthetic-size N]
        [--large-cfg PATH] [--json PATH] [--markdown] [--profile ROW DIR] [--opts KEY VALUE ...]
    python tools/bench.py --methods kd,dkd,fitnet,crd,kd+dot [--pair resnet32x4_resnet8x4] [--rows ours] ...

Every row builds a fresh distiller (same seed, teacher with random weights: speed does not depend on them), its own
loaders from the real data code (`get_dataset`) and a `Trainer`, and times `Trainer.train_step` on full batches:
warm-up steps first, then `--steps` steps between two device synchronisations. Images/s counts the images trained;
s/epoch is the training-set size (the full 50,000 of CIFAR when the data are synthetic) over images/s.

The rows teacher_cache and teacher_cache_combined serve the teacher's logits from a table (DISTILLER.TEACHER_CACHE):
each builds the table for real over the first CACHE_BUILD_IMAGES training images (timed: the build's views/s, with its
verification), leaves the rest of the full-size table zero (speed does not depend on the values), and releases the
teacher as a run does.

With an ImageNet config (DATASET.TYPE imagenet) the batches are synthetic device tensors of the config's batch and
DATASET.IMAGE_SIZE: the step alone is timed, not the JPEG pipeline. The rows loader_pil and loader_gpu_decode time
that pipeline alone (no training step): the training DataLoader with PIL decoding in the workers, and with
DATASET.GPU_DECODE (batched decode_jpeg + crop/resize/flip on the device; on the CPU the same path runs with device
cpu). They read DATASET.ROOT's imagenet/ folder, or 500x375 JPEGs of 10 classes the bench writes to a temp folder.

Per-method mode (`--methods`): one row (`ours` unless --rows names another) timed for each method's config, KD's
first, and each method's step time relative to KD's, beside the DKD paper's ratio where it published one. A method
is a config file, or a name: `<name>` is configs/cifar100/<name>/<pair>.yaml, `kd+dot` (or `dot`) the KD+DOT config.
"""

from __future__ import annotations

import argparse

import torch

from ...engine.cfg import load_cfg
from ...engine.run import default_device
from ...engine.tasks import task_name
from ...errors import MdistillerError
from .. import run_cli
from .methods import bench_methods
from .profiling import PROFILE_STEPS
from .rows import DEFAULT_CFG, DEFAULT_LARGE_CFG, DEFAULT_PAIR, ROWS
from .table import bench_rows
from .timing import CACHE_BUILD_IMAGES

__all__ = ["CACHE_BUILD_IMAGES", "ROWS", "entry_point", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser("bench.py", description="training-step throughput: mdistiller's pipeline vs ours")
    parser.add_argument("--cfg", default=None,
                        help=f"YAML config (CIFAR, or ImageNet for synthetic tensors; default {DEFAULT_CFG})")
    parser.add_argument("--methods", default="",
                        help="per-method mode: comma-separated config files or names (kd, dkd, fitnet, crd, kd+dot, "
                             "...: configs/cifar100/<name>/<pair>.yaml), each timed in one row against KD")
    parser.add_argument("--pair", default=DEFAULT_PAIR,
                        help=f"the teacher_student file name of --methods names (default {DEFAULT_PAIR})")
    parser.add_argument("--rows", default="", help=f"comma-separated rows, of: {', '.join(ROWS)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: CUDA when present")
    parser.add_argument("--tiny", action="store_true",
                        help="small models: resnet20 -> resnet8 on CIFAR; 32x32 images, batch 4 on ImageNet")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 200 on CUDA, 20 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 30 on CUDA, 3 on CPU; compile rows at least 50 / 5)")
    parser.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                        help="CIFAR files under DATASET.ROOT (real), random images in a temp folder (synthetic), or "
                             "real when present (auto)")
    parser.add_argument("--synthetic-size", type=int, default=50_000, help="training images of the synthetic set")
    parser.add_argument("--large-cfg", default=None, help=f"the large_batch row's config (default {DEFAULT_LARGE_CFG})")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    parser.add_argument("--profile", nargs=2, default=None, metavar=("ROW", "DIR"),
                        help=f"instead of the table: a torch.profiler trace of {PROFILE_STEPS} steps of ROW in DIR")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY VALUE overrides for every row, large_batch included (give them last)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Time the selected rows or methods and print the table (or profile one row); returns the rows' results."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MdistillerError("--device cuda: no CUDA device is available (leave --device out to use the CPU)")
    device = torch.device(args.device) if args.device else default_device()
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value is not None and value < least:
            raise MdistillerError(f"{flag} must be {'positive' if least else '>= 0'}, got {value}")
    if args.methods:
        return bench_methods(args, device)
    args.cfg = args.cfg or DEFAULT_CFG
    if task_name(load_cfg(args.cfg, args.opts)) != "classification":
        raise MdistillerError(f"{args.cfg} is a detection recipe: tools/bench.py times classification steps; the "
                              f"detection timings are owed (docs/detection.md)")
    return bench_rows(args, device)


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)
