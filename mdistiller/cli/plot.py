"""Plots as PNG files (needs matplotlib: pip install -e .[plots]).

    python tools/plot.py curves RUN_DIR [RUN_DIR ...] [--label TEXT ...] [--last N] -o curves.png
        accuracy, training loss terms and test loss against the epoch, from each run's worklog.txt, one colour per
        run, labelled from its config.yaml (method, pair, LS setting, seed) unless --label names it
    python tools/plot.py table [--logs logs] [--last] [--no-published] -o table.png
        tools/report.py's table as bars: mean top-1 ± std over seeds per method and pair, published number marked
        (left out when a run's config.yaml says it trained on other data than CIFAR-100)
    python tools/plot.py logit-stats -t resnet32x4 -tc pretrain -s resnet8x4 -sc output/.../student_best \\
        [-d cifar100] [--data-root DIR] [--names TEACHER STUDENT] -o stats
        on the test set: histograms of the per-sample logit mean and std of teacher and student (stats_mean_std.png)
        and the teacher - student difference of the class-correlation matrices of the logits (stats_corr_diff.png)
"""

from __future__ import annotations

import argparse

from ..errors import MdistillerError
from . import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("plot.py", description="training curves and logit diagnostics as PNG files")
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", help="accuracy and loss terms vs epoch from run folders, runs overlaid")
    curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    curves.add_argument("--label", action="append", metavar="TEXT",
                        help="legend label of a run, once per RUN_DIR in order (default: from its config.yaml)")
    curves.add_argument("--last", type=int, metavar="N", help="only the last N epochs (of the longest run)")
    curves.add_argument("-o", "--out", required=True, help="PNG file to write")
    table = sub.add_parser("table", help="tools/report.py's table as a bar chart, published numbers marked")
    table.add_argument("--logs", default="logs", help="folder of result files (LOG.RESULTS_DIR), default logs")
    table.add_argument("--last", action="store_true", help="last-epoch top-1 instead of the best epoch's")
    table.add_argument("--no-published", action="store_true", help="leave out the published numbers' markers")
    table.add_argument("-o", "--out", required=True, help="PNG file to write")
    stats = sub.add_parser("logit-stats", help="logit mean/std histograms and class-correlation difference")
    stats.add_argument("-t", "--teacher", required=True, help="teacher model name, e.g. resnet32x4")
    stats.add_argument("-tc", "--teacher-ckpt", default="pretrain", help="teacher checkpoint, or 'pretrain'")
    stats.add_argument("-s", "--student", required=True, help="student model name, e.g. resnet8x4")
    stats.add_argument("-sc", "--student-ckpt", required=True, help="student checkpoint (e.g. a run's student_best)")
    stats.add_argument("-d", "--dataset", default="cifar100", help="cifar100 | cifar10")
    stats.add_argument("--data-root", default=None, help="default: $MDISTILLER_DATA or ./data")
    stats.add_argument("-bs", "--batch-size", type=int, default=256)
    stats.add_argument("--num-workers", type=int, default=2)
    stats.add_argument("--names", nargs=2, metavar=("TEACHER", "STUDENT"),
                       help="what the figures call the two models (default: teacher <model>, student <model>)")
    stats.add_argument("-o", "--out", required=True, help="prefix of the PNG files: <prefix>_mean_std.png, ...")
    return parser.parse_args(argv)


def logit_stats(args: argparse.Namespace) -> list[str]:
    from ..analysis.plots import collect_logits, plot_logit_stats, require_matplotlib
    from ..dataset import eval_loader, get_test_set, num_classes_of
    from ..engine.build import load_zoo_model
    from ..engine.cfg import data_cfg
    from ..engine.run import default_device

    require_matplotlib()  # before the models and data are loaded
    if args.batch_size <= 0:
        raise MdistillerError(f"--batch-size must be positive, got {args.batch_size}")
    cfg = data_cfg(args.dataset, args.data_root)
    num_classes = num_classes_of(cfg)
    teacher, _ = load_zoo_model(args.teacher, args.teacher_ckpt, num_classes, args.dataset, what="teacher checkpoint")
    student, _ = load_zoo_model(args.student, args.student_ckpt, num_classes, args.dataset, what="student checkpoint")
    loader = eval_loader(get_test_set(cfg), args.batch_size, args.num_workers)
    device = default_device()
    teacher_logits, _ = collect_logits(teacher, loader, device)
    student_logits, _ = collect_logits(student, loader, device)
    names = tuple(args.names) if args.names else (f"teacher {args.teacher}", f"student {args.student}")
    data = f"{args.dataset.upper().replace('CIFAR', 'CIFAR-')} test set"
    return plot_logit_stats(teacher_logits, student_logits, args.out, names, data)


def results_table(args: argparse.Namespace) -> str:
    from ..analysis.plots import plot_table, read_run_config, require_matplotlib
    from ..analysis.report import build_table, read_results

    require_matplotlib()
    results, notes = read_results(args.logs)
    published = not args.no_published
    if published:  # the published numbers are CIFAR-100's: no marker beside runs on other data
        configs = [read_run_config(line.run_dir) for lines in results.values() for line in lines if line.run_dir]
        other = sorted({str(c.get("DATASET", {}).get("TYPE")) for c in configs if c} - {"cifar100"})
        if other:
            print(f"note: runs on {', '.join(other)} (their config.yaml): the published CIFAR-100 numbers are left out")
            published = False
    table = build_table(results, "last" if args.last else "best", published, notes)
    return plot_table(table, args.out, show_published=published)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.command == "curves":
        from ..analysis.plots import plot_curves

        paths = [plot_curves(args.run_dirs, args.out, args.label, args.last)]
    elif args.command == "table":
        paths = [results_table(args)]
    else:
        paths = logit_stats(args)
    for path in paths:
        print(f"wrote {path}")
    return paths


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
