"""One logging path for notes, warnings and fallbacks: python `logging`, rank-aware, to the console and to a run's
`<run dir>/log.txt`. tqdm stays for progress bars only; console lines go through `tqdm.write` (they never break a bar).

Console: INFO as `[mdistiller] message` on stdout, WARNING and above as `warning: message` on stderr (each stream looked
up when the line is written, so redirections and pytest's capture see it). Under torchrun only rank 0 writes to the
console and the run log (every rank checks the same things; N copies of a line help nobody).
The handlers hang on the "mdistiller" logger (not the root logger, so an application embedding mdistiller keeps its
own logging); `logging.getLogger("mdistiller")` can be reconfigured like any logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from tqdm import tqdm

LOGGER_NAME = "mdistiller"
RUN_LOG = "log.txt"
FILE_ONLY = {"file_only": True}  # `extra=` of a record meant for the run log alone (the console already showed it)


def _is_rank_zero() -> bool:
    # torchrun's RANK, read directly: this module sits below mdistiller.distributed
    return int(os.environ.get("RANK", "0")) == 0


class _ConsoleHandler(logging.Handler):
    """INFO to stdout as `[mdistiller] ...`, WARNING+ to stderr as `warning: ...`, through tqdm.write."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False) or not _is_rank_zero():
            return
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                tqdm.write(f"warning: {message}", file=sys.stderr)
            else:
                tqdm.write(f"[mdistiller] {message}", file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # a closed stream must not end training
            self.handleError(record)


def _root_logger() -> logging.Logger:
    root = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        root.addHandler(_ConsoleHandler())
        root.setLevel(logging.INFO)
        root.propagate = False
    return root


def get_logger(name: str = "") -> logging.Logger:
    """The package logger, or its child `mdistiller.<name>` (e.g. get_logger(__name__) in a module)."""
    root = _root_logger()
    if not name or name == LOGGER_NAME:
        return root
    return logging.getLogger(name if name.startswith(LOGGER_NAME + ".") else f"{LOGGER_NAME}.{name}")


@contextlib.contextmanager
def run_log(run_dir: str) -> Iterator[str]:
    """While inside: every record of the package also goes to `<run_dir>/log.txt` (appended, so a resumed run continues
    the file), with time and level. Rank 0 only. Yields the file's path."""
    path = os.path.join(run_dir, RUN_LOG)
    if not _is_rank_zero():
        yield path
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = _root_logger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
