"""Result logs -> paper-style tables (mean ± std over seeds), with the published numbers beside them.

The logs folder holds one file per method and pair, `<TYPE>,<TEACHER>,<STUDENT>[,<τ>,<w>].txt` (`LS` instead of
`<τ>,<w>` when the YAML switched logit standardisation on; `<TYPE>+DOT` for a SOLVER.TRAINER dot / crd_dot run),
one tab-separated `key=value` line per finished run (see logs/README.md). Rows are methods (`KD`,
`KD+LS (τ=2, w=9)`, ...), columns teacher → student pairs; vanilla runs (`NONE,none,<model>`) fill the
`teacher (vanilla)` and `student (vanilla)` rows of the pairs that use the model, or a column of their own when no
pair does. A file holding runs of several recipes (config hashes) gives one row per recipe, labelled with its hash:
runs of different recipes are never averaged together.

Detection runs (`RCNN_<TYPE>,<TEACHER>,<STUDENT>.txt`, lines `best_AP=..\tlast_AP=..\t...\titers=..`) give a table of
their own, in box AP, with the DKD paper's row labels (`student` for RCNN_NONE runs, `DKD`, `ReviewKD`,
`DKD+ReviewKD`) and optionally AP50 / AP75 read from each run's worklog (analysis/report_detection.py). A table never
mixes top-1 and box AP: `reports` gives one table per task, `build_table` refuses a mix.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import MdistillerError
from . import report_detection as det
from .published import COCO_PAIRS, PAIRS, Published, PublishedAP, published_ap, published_top1
from .table import Grid

# Methods in the order of the papers' tables; others follow alphabetically. A DOT run (SOLVER.TRAINER dot / crd_dot)
# is logged as `<TYPE>+DOT`, e.g. `KD+DOT,resnet32x4,resnet8x4.txt`, and gets its own row after its method's.
METHOD_ORDER = ("teacher", "student", "KD", "KD+DOT", "CTKD", "DKD", "MLKD", "FITNET", "AT", "SP", "VID", "RKD",
                "PKT", "NST", "CRD", "CRD+DOT", "OFD", "REVIEWKD", "KDSVD")
METRICS = {"best": "best_top1", "last": "last_top1"}
RESULT_METRICS = {"top1": "classification", "AP": "detection"}  # `best_<name>=` of a result line -> its task
TASKS = tuple(RESULT_METRICS.values())  # the order of a folder's tables


class LogKey(NamedTuple):
    """What a result file's name says: the method, the pair and the LS setting (None: no LS; (): LS, no flags)."""

    method: str
    teacher: str
    student: str
    ls: tuple | None


class ResultLine(NamedTuple):
    """One finished run: its best and last test number, `metric` saying which ("top1"; "AP", box AP, for detection),
    and its length (`epochs`, or `iters` for an iteration schedule)."""

    best: float
    last: float
    seed: int | None
    epochs: int | None
    config_hash: str
    run_dir: str
    metric: str = "top1"
    iters: int | None = None

    @property
    def task(self) -> str:
        """"classification" or "detection"."""
        return RESULT_METRICS[self.metric]

    def value(self, which: str) -> float:
        """The best or the last number (which: "best" / "last")."""
        return self.best if which == "best" else self.last

    def _top1(self, value: float) -> float:
        if self.metric != "top1":
            raise AttributeError(f"a result line of {self.metric} has no top-1")
        return value

    @property
    def best_top1(self) -> float:
        return self._top1(self.best)

    @property
    def last_top1(self) -> float:
        return self._top1(self.last)


def _number(text: str) -> str:
    value = float(text)
    return f"{value:g}"


def parse_log_name(filename: str) -> LogKey | None:
    """`KD,resnet32x4,resnet8x4,2,9.txt` -> LogKey('KD', 'resnet32x4', 'resnet8x4', ('2', '9')); None if not one."""
    if not filename.endswith(".txt"):
        return None
    parts = filename[: -len(".txt")].split(",")
    if len(parts) == 3:
        return LogKey(parts[0], parts[1], parts[2], None)
    if len(parts) == 4 and parts[3] == "LS":
        return LogKey(parts[0], parts[1], parts[2], ())
    if len(parts) == 5:
        try:
            return LogKey(parts[0], parts[1], parts[2], (_number(parts[3]), _number(parts[4])))
        except ValueError:
            return None
    return None


def parse_result_line(line: str) -> ResultLine | None:
    """A `best_top1=..\tlast_top1=..\t...` or `best_AP=..\tlast_AP=..\t...` line, or None when it is not one."""
    fields = dict(item.split("=", 1) for item in line.strip().split("\t") if "=" in item)
    metric = next((name for name in RESULT_METRICS if f"best_{name}" in fields), None)
    if metric is None:
        return None
    try:
        return ResultLine(
            float(fields[f"best_{metric}"]), float(fields[f"last_{metric}"]),
            int(fields["seed"]) if "seed" in fields else None,
            int(fields["epochs"]) if "epochs" in fields else None,
            fields.get("config_hash", ""), fields.get("run_dir", ""),
            metric, int(fields["iters"]) if "iters" in fields else None,
        )
    except (KeyError, ValueError):
        return None


def read_result_file(path: str, notes: list[str] | None = None) -> list[ResultLine]:
    """The result lines of one file (none when it does not exist); lines that are not results go to notes."""
    lines: list[ResultLine] = []
    if not os.path.isfile(path):
        return lines
    with open(path) as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            parsed = parse_result_line(text)
            if parsed is not None:
                lines.append(parsed)
            elif notes is not None:
                notes.append(f"skipped {os.path.basename(path)} line {number}: not a result line")
    return lines


def read_results(logs_dir: str) -> tuple[dict[LogKey, list[ResultLine]], list[str]]:
    """Every result file of a logs folder: {key: lines} and notes on what was skipped."""
    if not os.path.isdir(logs_dir):
        raise MdistillerError(f"logs folder not found: {logs_dir}")
    results: dict[LogKey, list[ResultLine]] = {}
    notes: list[str] = []
    for name in sorted(os.listdir(logs_dir)):
        key = parse_log_name(name)
        if key is None:
            if name.endswith(".txt"):
                notes.append(f"skipped {name}: not named <TYPE>,<TEACHER>,<STUDENT>[,<τ>,<w>].txt")
            continue
        lines = read_result_file(os.path.join(logs_dir, name), notes)
        if lines:
            results[key] = lines
    if not results:
        raise MdistillerError(f"no result files (<TYPE>,<TEACHER>,<STUDENT>.txt) with results in {logs_dir}")
    return results, notes


class RunRef(NamedTuple):
    """Where one run's result line goes and what identifies it: its result file, recipe hash, seed and folder."""

    result_file: str
    config_hash: str
    seed: int
    run_dir: str


def find_result(lines: list[ResultLine], run: RunRef) -> ResultLine | None:
    """The result line of `run` among lines: same recipe hash and seed; a line written from the run's own folder
    wins over one of another folder, and a later line over an earlier one (a run trained again)."""
    same = [ln for ln in lines if ln.config_hash == run.config_hash and ln.seed == run.seed]
    own = [ln for ln in same if os.path.abspath(ln.run_dir) == os.path.abspath(run.run_dir)]
    return (own or same or [None])[-1]


def results_of_runs(runs: list[RunRef]) -> tuple[dict[LogKey, list[ResultLine]], list[RunRef]]:
    """Exactly the result lines of the given runs, one per run, keyed like read_results; and the runs without one."""
    cache: dict[str, list[ResultLine]] = {}
    results: dict[LogKey, list[ResultLine]] = {}
    missing = []
    for run in runs:
        if run.result_file not in cache:
            cache[run.result_file] = read_result_file(run.result_file)
        line = find_result(cache[run.result_file], run)
        key = parse_log_name(os.path.basename(run.result_file))
        if line is None or key is None:
            missing.append(run)
        elif line not in results.setdefault(key, []):  # two refs to one run count once
            results[key].append(line)
    return results, missing


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def method_label(method: str, ls: tuple | None) -> str:
    """`KD`, `KD+LS`, `KD+LS (τ=2, w=9)`."""
    if ls is None:
        return method
    if not ls:
        return f"{method}+LS"
    return f"{method}+LS (τ={ls[0]}, w={ls[1]})"


@dataclass
class Cell:
    """Mean ± std of one row (method, LS setting, recipe) in one column (teacher → student).

    `values` and `seeds` are those of the runs with a number; `unmeasured` counts the others (nan, or -1: never
    evaluated). Detection cells with AP columns also hold each run's AP50 and AP75 (`columns`, numbers only)."""

    row: str
    method: str
    ls: tuple | None
    teacher: str
    student: str
    config_hash: str
    values: list[float]
    seeds: list
    mean: float = 0.0
    std: float | None = None
    published: Published | PublishedAP | None = None
    diff: float | None = None
    unmeasured: int = 0
    columns: dict[str, list[float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def published_method(self) -> str:
        return self.method if self.ls is None or self.method in ("teacher", "student") else f"{self.method}+LS"


@dataclass
class Table:
    """Rows x columns of cells, with the notes that explain it; `task` says whose numbers: "classification" (top-1)
    or "detection" (box AP; `ap_columns`: with AP50 and AP75)."""

    metric: str
    rows: list[str]
    columns: list[tuple[str, str]]  # (teacher, student); teacher "" for a vanilla model no pair uses
    cells: dict[tuple[str, tuple[str, str]], Cell]
    notes: list[str] = field(default_factory=list)
    with_published: bool = False
    task: str = "classification"
    ap_columns: bool = False

    @property
    def quantity(self) -> str:
        """What the cells hold: `top-1` or `box AP`."""
        return "box AP" if self.task == "detection" else "top-1"


def _row_sort_key(row: str, method: str, ls: tuple | None) -> tuple:
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, ls is not None, ls or (), row)


def _detection_row_sort_key(row: str, label: str, ls: tuple | None) -> tuple:
    order = det.ROW_ORDER
    return (order.index(label) if label in order else len(order), label, ls is not None, ls or (), row)


def _column_sort_key(column: tuple[str, str], known: list[tuple[str, str]] = PAIRS) -> tuple:
    if column in known:
        return (0, known.index(column), "", "")
    return (1 if column[0] else 2, 0, column[0], column[1])


def split_by_task(results: dict[LogKey, list[ResultLine]]) -> dict[str, dict[LogKey, list[ResultLine]]]:
    """The results of each task present ("classification": top-1 lines, "detection": box AP lines), in TASKS order."""
    by_task: dict[str, dict[LogKey, list[ResultLine]]] = {}
    for key, lines in results.items():
        for line in lines:
            by_task.setdefault(line.task, {}).setdefault(key, []).append(line)
    return {task: by_task[task] for task in TASKS if task in by_task}


def _measured(value: float) -> bool:
    return not math.isnan(value) and value >= 0


def build_table(results: dict[LogKey, list[ResultLine]], metric: str = "best", published: bool = False,
                notes: list[str] | None = None, ap_columns: bool = False) -> Table:
    """Aggregate result lines into a table of mean ± std per (row, column); the lines must be of one task."""
    if metric not in METRICS:
        raise MdistillerError(f"unknown metric {metric!r}: best or last")
    tasks = split_by_task(results)
    if len(tasks) > 1:
        raise MdistillerError("the results mix top-1 (classification) and box AP (detection) lines: report them as "
                              "separate tables (tools/report.py prints one per task; --task picks one)")
    task = next(iter(tasks), "classification")
    detection = task == "detection"
    if ap_columns and not detection:
        raise MdistillerError("AP columns (--ap-columns) are for detection results (box AP lines); these are top-1")
    baseline = det.BASELINE if detection else "NONE"
    groups: list[tuple[LogKey, str, list[ResultLine]]] = []  # (key, config hash or "" when the file has one recipe)
    for key, lines in results.items():
        by_hash: dict[str, list[ResultLine]] = {}
        for line in lines:
            by_hash.setdefault(line.config_hash, []).append(line)
        for recipe, recipe_lines in by_hash.items():
            groups.append((key, recipe if len(by_hash) > 1 else "", recipe_lines))
    pairs = {(k.teacher, k.student) for k, _, _ in groups if k.method != baseline}
    cells: dict[tuple[str, tuple[str, str]], Cell] = {}
    row_keys: dict[str, tuple] = {}
    split_recipes = []
    table_notes = list(notes or [])

    def add(method: str, ls: tuple | None, column: tuple[str, str], recipe: str, lines: list[ResultLine]) -> None:
        if detection:
            label = det.label(method)
            row = method_label(label, ls)
            sort_key = _detection_row_sort_key(row, label, ls)
        else:
            row = f"{method} (vanilla)" if method in ("teacher", "student") else method_label(method, ls)
            sort_key = _row_sort_key(row, method, ls)
        if recipe:
            row += f" [{recipe}]"
        used = [line for line in lines if _measured(line.value(metric))]
        values = [line.value(metric) for line in used]
        cell = Cell(row, method, ls, column[0], column[1], lines[0].config_hash, values, [ln.seed for ln in used],
                    unmeasured=len(lines) - len(used))
        cell.mean, cell.std = mean_std(values) if values else (math.nan, None)
        if ap_columns:
            cell.columns = {name: [] for name in det.AP_NAMES[1:]}
            for line in used:
                evaluation = det.reported_evaluation(line.run_dir, metric, line.value(metric))
                if evaluation.values is None:
                    table_notes.append(f"no AP50 / AP75 for {row} ({column_label(column)}) seed {line.seed}: "
                                       f"{evaluation.why}")
                    continue
                for name in cell.columns:
                    if det.is_number(evaluation.values[name]):
                        cell.columns[name].append(evaluation.values[name])
        if published:
            if detection:
                cell.published = published_ap(label, column[0], column[1]) if ls is None else None
            elif column[0]:
                cell.published = published_top1(cell.published_method, column[0], column[1])
            else:  # a vanilla model of its own: compare with the published teacher of that name, if any
                cell.published = published_top1("teacher", column[1], "")
            if cell.published is not None and values:
                cell.diff = cell.mean - cell.published.value
        cells[(row, column)] = cell
        row_keys[row] = sort_key

    for key, recipe, lines in groups:
        if recipe:
            split_recipes.append(f"{key.method},{key.teacher},{key.student}: recipe {recipe}, e.g. {lines[0].run_dir}")
        if key.method != baseline:
            add(key.method, key.ls, (key.teacher, key.student), recipe, lines)
            continue
        model = key.student
        if detection:  # a student trained alone; never a teacher row (the teachers are detectron2's 3x models)
            used = [pair for pair in pairs if pair[1] == model]
            for pair in used or [("", model)]:
                add(baseline, key.ls, pair, recipe, lines)
            continue
        used = [pair for pair in pairs if model in pair]
        for pair in used:
            if pair[0] == model:
                add("teacher", None, pair, recipe, lines)
            if pair[1] == model:
                add("student", None, pair, recipe, lines)
        if not used:
            add("vanilla", None, ("", model), recipe, lines)
    rows = sorted(row_keys, key=lambda r: row_keys[r])
    known_pairs = COCO_PAIRS if detection else PAIRS
    columns = sorted({c for _, c in cells}, key=lambda c: _column_sort_key(c, known_pairs))
    if published:
        used = sorted({c.published.source for c in cells.values() if c.published is not None})
        if used:
            table_notes.append("paper numbers from: " + "; ".join(used))
        if any(isinstance(c.published, Published) and c.published.note for c in cells.values()):
            table_notes.append("† after a paper number: a DKD-paper value not cross-checked against a second copy")
        if ap_columns and any(isinstance(c.published, PublishedAP) and c.published.ap75_note for c in cells.values()):
            table_notes.append("* after a paper AP75: as printed (below its AP: a typo the DKD paper carried from the "
                               "ReviewKD paper)")
    if split_recipes:
        table_notes.append("files holding several recipes give one row per recipe [config hash]: "
                           + "; ".join(split_recipes))
    return Table(metric, rows, columns, cells, table_notes, published, task, ap_columns)


def column_label(column: tuple[str, str]) -> str:
    teacher, student = column
    return f"{teacher} → {student}" if teacher else student


def _stat(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _counts(cell: Cell) -> str:
    counts = f"n={cell.n}"
    if cell.unmeasured:
        counts += f"; {cell.unmeasured} nan"
    short = [f"{name} n={len(values)}" for name, values in cell.columns.items() if len(values) != cell.n]
    return f" ({'; '.join([counts, *short])})"


def format_cell(cell: Cell | None, with_published: bool = False) -> str:
    """`74.00 ± 1.00 (n=3)`, plus `· paper 73.33 (+0.67)` with published numbers; detection cells with AP columns
    `35.10 ± 0.20 / 55.00 / 37.50 (n=2)` (AP / AP50 / AP75)."""
    if cell is None:
        return ""
    text = _stat(cell.values) + "".join(f" / {_stat(values)}" for values in cell.columns.values()) + _counts(cell)
    diff = "" if cell.diff is None else f" ({cell.diff:+.2f})"
    if with_published and isinstance(cell.published, PublishedAP):
        pub = cell.published
        text += f" · paper {pub.ap:.2f}"
        if cell.columns:
            text += f" / {pub.ap50:.2f} / {pub.ap75:.2f}{pub.ap75_note}"
        text += diff
    elif with_published and cell.published is not None:
        setting = ""
        pub_setting = cell.published.setting
        if pub_setting and cell.ls and tuple(float(v) for v in cell.ls) != tuple(float(v) for v in pub_setting[:2]):
            setting = f" at τ={pub_setting[0]}, w={pub_setting[1]}"
        mark = f" {cell.published.note}" if cell.published.note else ""
        text += f" · paper {cell.published.top1:.2f}{mark}{setting}{diff}"
    return text


def _title(table: Table) -> str:
    if table.task == "detection":
        which = "best evaluation" if table.metric == "best" else "last evaluation"
        if table.ap_columns:
            text = (f"Box AP / AP50 / AP75 (%), {which} (AP50 and AP75 of that evaluation, from each run's "
                    "worklog.txt)")
        else:
            text = f"Box AP (%), {which}"
        text += ": mean ± sample std (n − 1) over seeds, n = runs"
        if table.with_published:
            text += "; paper = published number (difference = our AP − paper AP)"
        return text
    which = "best-epoch" if table.metric == "best" else "last-epoch"
    text = f"Top-1 (%), {which}: mean ± sample std (n − 1) over seeds, n = runs"
    if table.with_published:
        text += "; paper = published number (difference = ours − paper)"
    return text


def to_markdown(table: Table) -> str:
    """The table as GitHub markdown, with its title and notes."""
    grid = Grid.of(["method", *(column_label(c) for c in table.columns)],
                   [[row, *(format_cell(table.cells.get((row, c)), table.with_published) for c in table.columns)]
                    for row in table.rows], numeric=False)
    lines = [_title(table), "", grid.markdown()]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("row", "method", "ls_base_temp", "ls_kd_weight", "teacher", "student", "config_hash", "metric", "n",
              "mean", "std", "seeds", "published", "published_setting", "diff")
DETECTION_CSV_FIELDS = ("row", "method", "teacher", "student", "config_hash", "metric", "n", "mean", "std", "seeds",
                        "nan", "ap50_n", "ap50_mean", "ap50_std", "ap75_n", "ap75_mean", "ap75_std", "published",
                        "published_ap50", "published_ap75", "diff")


def _csv_stat(values: list[float] | None) -> list[str]:
    if values is None:
        return ["", "", ""]
    if not values:
        return ["0", "", ""]
    mean, std = mean_std(values)
    return [str(len(values)), f"{mean:.4f}", "" if std is None else f"{std:.4f}"]


def _detection_csv_row(table: Table, cell: Cell) -> list:
    pub = cell.published if isinstance(cell.published, PublishedAP) else None
    mean_std_text = _csv_stat(cell.values)[1:]
    return [
        cell.row, cell.method, cell.teacher, cell.student, cell.config_hash, table.metric, cell.n, *mean_std_text,
        " ".join(str(s) for s in cell.seeds), cell.unmeasured,
        *_csv_stat(cell.columns.get("AP50")), *_csv_stat(cell.columns.get("AP75")),
        "" if pub is None else f"{pub.ap:.2f}", "" if pub is None else f"{pub.ap50:.2f}",
        "" if pub is None else f"{pub.ap75:.2f}", "" if cell.diff is None else f"{cell.diff:+.4f}",
    ]


def to_csv(table: Table) -> str:
    """One line per cell (long format), for spreadsheets and scripts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(DETECTION_CSV_FIELDS if table.task == "detection" else CSV_FIELDS)
    for row in table.rows:
        for column in table.columns:
            cell = table.cells.get((row, column))
            if cell is None:
                continue
            if table.task == "detection":
                writer.writerow(_detection_csv_row(table, cell))
                continue
            ls = cell.ls or ("", "")
            pub = cell.published
            writer.writerow([
                row, cell.method, ls[0], ls[1], cell.teacher, cell.student, cell.config_hash, table.metric, cell.n,
                f"{cell.mean:.4f}", "" if cell.std is None else f"{cell.std:.4f}",
                " ".join(str(s) for s in cell.seeds),
                "" if pub is None else f"{pub.top1:.2f}",
                "" if pub is None or pub.setting is None else ",".join(str(v) for v in pub.setting),
                "" if cell.diff is None else f"{cell.diff:+.4f}",
            ])
    return out.getvalue()


def reports(logs_dir: str, metric: str = "best", published: bool = False, task: str | None = None,
            ap_columns: bool = False) -> list[Table]:
    """Read a logs folder and build one table per task it holds (classification first), or only `task`'s.
    `ap_columns` adds AP50 / AP75 to the detection table; the notes on skipped files go with the first table."""
    if task is not None and task not in TASKS:
        raise MdistillerError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    results, notes = read_results(logs_dir)
    by_task = split_by_task(results)
    if task is not None:
        if task not in by_task:
            raise MdistillerError(f"no {task} results in {logs_dir} (it holds {' and '.join(by_task)} results)")
        by_task = {task: by_task[task]}
    if ap_columns and "detection" not in by_task:
        raise MdistillerError(f"--ap-columns shows detection APs, and {logs_dir} holds no detection (box AP) results")
    return [build_table(lines, metric, published, notes if i == 0 else None, ap_columns and name == "detection")
            for i, (name, lines) in enumerate(by_task.items())]


def report(logs_dir: str, metric: str = "best", published: bool = False, task: str | None = None,
           ap_columns: bool = False) -> Table:
    """Read a logs folder and build its table (a folder holding both tasks needs `task`; see `reports`)."""
    tables = reports(logs_dir, metric, published, task, ap_columns)
    if len(tables) > 1:
        raise MdistillerError(f"{logs_dir} holds classification (top-1) and detection (box AP) results: pick one "
                              "with task= (tools/report.py: --task), or build both with reports()")
    return tables[0]
