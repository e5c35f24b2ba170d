"""What the report needs to know about detection runs: the DKD paper's row labels, and the AP / AP50 / AP75 of the
evaluation a result line reports, read back from the run folder's worklog.txt.

A detection run's result line holds box AP only (`best_AP=..\tlast_AP=..`); its worklog holds, for every evaluated
period, `test_AP`, `test_AP50`, `test_AP75`, `test_APs`, `test_APm`, `test_APl` (percent; `nan` where COCO's
evaluation has none). The AP columns of a run are those of the block its reported AP comes from: the last evaluated
block for `last_AP`, the first block reaching the best AP for `best_AP` (the one the `best` checkpoint was saved at).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

from ..engine import worklog

BASELINE = "RCNN_NONE"  # the student trained without a teacher: the `student` row
# Registered DISTILLER.TYPE -> the row label of the DKD paper's COCO table
LABELS = {BASELINE: "student", "RCNN_DKD": "DKD", "RCNN_REVIEWKD": "ReviewKD", "RCNN_REVIEWDKD": "DKD+ReviewKD"}
# Rows in the order of that table; labels it does not have follow alphabetically
ROW_ORDER = ("teacher", "student", "KD", "FitNet", "FGFI", "ReviewKD", "DKD", "DKD+ReviewKD")
AP_NAMES = ("AP", "AP50", "AP75")


def label(method: str) -> str:
    """`RCNN_DKD` -> `DKD`; a type the paper has no row for keeps its name without the `RCNN_` prefix."""
    return LABELS.get(method, method.removeprefix("RCNN_"))


def is_number(value: float) -> bool:
    """An AP that was measured: not nan, and not negative (-1: no evaluation yet, or COCO's 'no such objects')."""
    return not math.isnan(value) and value >= 0


class Evaluation(NamedTuple):
    """The AP / AP50 / AP75 of one run's reported evaluation (nan where the worklog says nan), or why there are none."""

    values: dict[str, float] | None
    why: str = ""


def reported_evaluation(run_dir: str, which: str, reported: float) -> Evaluation:
    """The worklog block a result line's `<which>_AP` comes from (which: "best" or "last"), checked against it."""
    path = os.path.join(run_dir, worklog.WORKLOG) if run_dir else ""
    if not path or not os.path.isfile(path):
        return Evaluation(None, f"no worklog at {path or '(the result line names no run folder)'}")
    blocks = [block for block in worklog.read(path) if "test_AP" in block]
    if which == "last":
        block = blocks[-1] if blocks else None
    else:
        measured = [b for b in blocks if is_number(b["test_AP"])]
        best = max((b["test_AP"] for b in measured), default=None)
        block = next((b for b in measured if b["test_AP"] == best), None)
    if block is None:
        return Evaluation(None, f"no evaluated period in {path}")
    if f"{block['test_AP']:.4f}" != f"{reported:.4f}":  # both files write 4 decimals of the same number
        return Evaluation(None, f"{path} says {which} AP {block['test_AP']:.4f}, the result line {reported:.4f}")
    return Evaluation({name: block.get(f"test_{name}", math.nan) for name in AP_NAMES})
