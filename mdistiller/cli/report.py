"""Paper-style tables from the result logs: mean ± std over seeds, per method and teacher → student pair; top-1 for
classification runs, box AP for detection runs (a table of their own).

    python tools/report.py [--logs logs] [--last] [--published] [--task classification|detection] [--ap-columns]
                           [--markdown FILE] [--csv FILE]
"""

from __future__ import annotations

import argparse
import os

from ..analysis.report import TASKS, reports, to_csv, to_markdown
from ..errors import MdistillerError
from . import run_cli


def write_text(path: str, text: str) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            f.write(text)
    except OSError as exc:
        raise MdistillerError(f"could not write {path}: {exc.strerror or exc}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("report.py", description="aggregate logs/ into mean ± std tables")
    parser.add_argument("--logs", default="logs", help="folder of result files (LOG.RESULTS_DIR), default logs")
    parser.add_argument("--last", action="store_true",
                        help="last-epoch top-1 (last evaluation's box AP) instead of the best")
    parser.add_argument("--published", action="store_true", help="add the published numbers and the differences")
    parser.add_argument("--task", choices=TASKS,
                        help="only this task's table (default: one table per task the folder holds)")
    parser.add_argument("--ap-columns", action="store_true",
                        help="detection: AP / AP50 / AP75 per cell, AP50 and AP75 read from each run's worklog.txt")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table(s) as markdown")
    parser.add_argument("--csv", metavar="FILE", help="also write one CSV line per cell (one task: see --task)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    tables = reports(args.logs, "last" if args.last else "best", args.published, args.task, args.ap_columns)
    if args.csv and len(tables) > 1:
        raise MdistillerError(f"--csv writes one table and {args.logs} holds classification and detection results: "
                              "pass --task classification or --task detection")
    markdown = "\n".join(to_markdown(table) for table in tables)
    print(markdown, end="")
    if args.markdown:
        write_text(args.markdown, markdown)
    if args.csv:
        write_text(args.csv, to_csv(tables[0]))
    return tables


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
