"""Build (or check) the teacher-output cache of a config: the teacher's logits on all 162 views of every CIFAR
training image, so that runs with DISTILLER.TEACHER_CACHE never run the teacher (docs/teacher_cache.md).

    python tools/cache_teacher.py --cfg configs/cifar100/kd/resnet32x4_resnet8x4.yaml [--out PATH] [--dtype fp16]
        [--batch-size N] [--device cuda|cpu] [KEY VALUE ...]
    python tools/cache_teacher.py --verify PATH [--cfg F] [--samples N] [--seed S] [--device cuda|cpu]

Without --out the cache goes where DISTILLER.TEACHER_CACHE auto looks for it (DATASET.ROOT/teacher_cache/<name>).
A killed build continues where it stopped when started again. --verify recomputes a random sample of views live and
compares; the teacher and data are those recorded in the cache, or --cfg's.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..dataset import check_data
from ..dataset.teacher_views import read_train_arrays
from ..distillers import get_distiller_class
from ..engine.build import build_teacher, model_builder
from ..engine.cfg import TEACHER_CACHE_DTYPES, data_cfg, load_cfg, validate_cfg
from ..engine.run import default_device
from ..engine.teacher_cache import cache_refusal, ensure_teacher_cache
from ..engine.teacher_cache_build import VERIFY_SAMPLES, open_table_file, verify_table
from ..engine.teacher_cache_identity import (
    AUTO,
    TABLE_FILE,
    auto_root,
    is_complete,
    read_identity,
    refuse_if_different,
    run_identity,
)
from ..errors import MdistillerError
from ..files import file_sha256
from . import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser("cache_teacher.py", description="teacher logits on every CIFAR training view")
    parser.add_argument("--cfg", default="", help="the run's YAML config (its teacher, data and SOLVER.AMP)")
    parser.add_argument("--out", default="", help="cache folder (default: where DISTILLER.TEACHER_CACHE auto looks)")
    parser.add_argument("--dtype", choices=TEACHER_CACHE_DTYPES, default=None,
                        help="storage (default: the config's DISTILLER.TEACHER_CACHE_DTYPE, fp32)")
    parser.add_argument("--batch-size", type=int, default=None, help="views per teacher forward (4096 CUDA, 1296 CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: CUDA when present")
    parser.add_argument("--verify", default="", metavar="PATH", help="re-check the cache at PATH instead of building")
    parser.add_argument("--samples", type=int, default=VERIFY_SAMPLES, help="views recomputed by --verify")
    parser.add_argument("--seed", type=int, default=1, help="which random views --verify recomputes")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. DATASET.ROOT /data")
    return parser.parse_args(argv)


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MdistillerError("--device cuda: no CUDA device is available (leave --device out to use the CPU)")
    return torch.device(args.device) if args.device else default_device()


def build_cfg(args: argparse.Namespace):
    """The config of a build: --cfg and overrides, --out (else the config's DISTILLER.TEACHER_CACHE, else auto's
    folder) and --dtype; checked as a run's would be (a method or data the cache cannot serve is refused here)."""
    cfg = load_cfg(args.cfg, args.opts)
    cfg.DISTILLER.TEACHER_CACHE = args.out or cfg.DISTILLER.TEACHER_CACHE or AUTO
    if args.dtype:
        cfg.DISTILLER.TEACHER_CACHE_DTYPE = args.dtype
    validate_cfg(cfg)
    refusal = cache_refusal(cfg, get_distiller_class(cfg.DISTILLER.TYPE))
    if refusal:
        raise MdistillerError(refusal)
    model_builder(cfg.DISTILLER.TEACHER, cfg.DATASET.TYPE)
    check_data(cfg)
    cfg.freeze()
    return cfg


def build(args: argparse.Namespace) -> dict:
    """Build (or finish, or find) the cache; print where it is and how to use it."""
    if args.batch_size is not None and args.batch_size <= 0:
        raise MdistillerError(f"--batch-size must be positive, got {args.batch_size}")
    cfg = build_cfg(args)
    device = _device(args)
    path = ensure_teacher_cache(cfg, device, batch_size=args.batch_size)
    identity = read_identity(path)
    size = os.path.getsize(os.path.join(path, TABLE_FILE))
    rows = identity["num_images"] * identity["views"]
    speed = f", {identity['views_per_s']:,.0f} views/s" if identity.get("views_per_s") else ""
    print(f"teacher cache: {path}")
    print(f"  {identity['teacher']} on {identity['dataset']}: {rows:,} views x {identity['num_classes']} classes, "
          f"{identity['dtype']}, {size / 2**30:.2f} GiB; built {identity['built']} on {identity['device']}{speed}")
    check = identity["verify"]
    print(f"  verified on {check['samples']} random views: max |cached - live| = {check['max_abs_diff']:.3g} "
          f"(largest |logit| {check['max_abs_logit']:.3g})")
    found_by_auto = os.path.dirname(os.path.abspath(path)) == os.path.abspath(auto_root(cfg))
    key = AUTO if found_by_auto else path
    where = f"--cfg {args.cfg}" + (f" {' '.join(args.opts)}" if args.opts else "")
    print(f"use it: python tools/train.py {where} DISTILLER.TEACHER_CACHE {key}"
          + (f" DISTILLER.TEACHER_CACHE_DTYPE {identity['dtype']}" if identity["dtype"] != "fp32" else ""))
    return identity


def _verify_cfg(args: argparse.Namespace, identity: dict):
    """The teacher and data to verify against: --cfg's, else those recorded when the cache was built."""
    if args.cfg:
        cfg = load_cfg(args.cfg, args.opts)
    else:
        source = identity.get("source") or {}
        if not source:
            raise MdistillerError(f"{args.verify} does not record its teacher and data: pass --cfg")
        cfg = data_cfg(source["dataset"], source["data_root"])
        cfg.DISTILLER.TEACHER = source["teacher"]
        cfg.DISTILLER.TEACHER_CKPT = source.get("teacher_ckpt", "")
    cfg.DISTILLER.TEACHER_CACHE = args.verify
    cfg.DISTILLER.TEACHER_CACHE_DTYPE = identity["dtype"]
    cfg.SOLVER.AMP = bool(identity["amp"])  # the precision the cache was built under
    cfg.freeze()
    return cfg


def verify(args: argparse.Namespace) -> dict:
    """Re-check a cache: its identity against the teacher and data, its table's hash, and a live sample."""
    if args.samples <= 0:
        raise MdistillerError(f"--samples must be positive, got {args.samples}")
    path = args.verify
    identity = read_identity(path)
    cfg = _verify_cfg(args, identity)
    device = _device(args)
    images, labels = read_train_arrays(cfg)
    teacher = build_teacher(cfg, identity["num_classes"])
    current = run_identity(cfg, teacher, images, labels, device)
    current["tf32"] = identity["tf32"]  # the math of the build's device: checked on that device alone
    refuse_if_different(path, identity, current)
    table_file = os.path.join(path, TABLE_FILE)
    table = open_table_file(table_file, identity)
    digest = file_sha256(table_file)
    if digest != identity.get("table_sha256"):
        raise MdistillerError(f"teacher cache {path}: {TABLE_FILE} changed since it was built (sha256 {digest[:12]}, "
                              f"recorded {str(identity.get('table_sha256'))[:12]}): rebuild it")
    check = verify_table(table, teacher, images, identity, device, args.samples, args.seed)
    print(f"teacher cache {path}: {check['samples']} random views recomputed on {device}: max |cached - live| = "
          f"{check['max_abs_diff']:.3g} (largest |logit| {check['max_abs_logit']:.3g}, tolerance "
          f"{check['tolerance']:.3g}); table sha256 as recorded")
    if not check["passed"]:
        raise MdistillerError(f"teacher cache {path} failed verification: cached and live logits differ by "
                              f"{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}): rebuild it")
    print("verified: the cache equals the live teacher")
    return check


def main(argv: list[str] | None = None) -> dict:
    """Build the cache of --cfg, or --verify one."""
    args = parse_args(argv)
    if args.verify:
        if not is_complete(args.verify):
            read_identity(args.verify)  # says what is missing
            raise MdistillerError(f"teacher cache {args.verify} has no {TABLE_FILE}: rebuild it")
        return verify(args)
    if not args.cfg:
        raise MdistillerError("pass --cfg <the run's config> (or --verify PATH)")
    return build(args)


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
