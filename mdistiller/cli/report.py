"""Paper-style tables from the result logs: mean ± std of top-1 over seeds, per method and teacher → student pair.

    python tools/report.py [--logs logs] [--last] [--published] [--markdown FILE] [--csv FILE]
"""

from __future__ import annotations

import argparse
import os

from ..analysis.report import report, to_csv, to_markdown
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
    parser.add_argument("--last", action="store_true", help="last-epoch top-1 instead of the best epoch's")
    parser.add_argument("--published", action="store_true", help="add the published numbers and the differences")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--csv", metavar="FILE", help="also write one CSV line per cell")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    table = report(args.logs, "last" if args.last else "best", args.published)
    markdown = to_markdown(table)
    print(markdown, end="")
    if args.markdown:
        write_text(args.markdown, markdown)
    if args.csv:
        write_text(args.csv, to_csv(table))
    return table


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
