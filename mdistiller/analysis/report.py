"""Result logs -> paper-style tables (mean ± std over seeds), with the published numbers beside them.

The logs folder holds one file per method and pair, `<TYPE>,<TEACHER>,<STUDENT>[,<τ>,<w>].txt` (`LS` instead of
`<τ>,<w>` when the YAML switched logit standardisation on; `<TYPE>+DOT` for a SOLVER.TRAINER dot / crd_dot run),
one tab-separated `key=value` line per finished run (see logs/README.md). Rows are methods (`KD`,
`KD+LS (τ=2, w=9)`, ...), columns teacher → student pairs; vanilla runs (`NONE,none,<model>`) fill the
`teacher (vanilla)` and `student (vanilla)` rows of the pairs that use the model, or a column of their own when no
pair does. A file holding runs of several recipes (config hashes) gives one row per recipe, labelled with its hash:
runs of different recipes are never averaged together.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import MdistillerError
from .published import PAIRS, Published, published_top1
from .table import Grid

# Methods in the order of the papers' tables; others follow alphabetically. A DOT run (SOLVER.TRAINER dot / crd_dot)
# is logged as `<TYPE>+DOT`, e.g. `KD+DOT,resnet32x4,resnet8x4.txt`, and gets its own row after its method's.
METHOD_ORDER = ("teacher", "student", "KD", "KD+DOT", "CTKD", "DKD", "MLKD", "FITNET", "AT", "SP", "VID", "RKD",
                "PKT", "NST", "CRD", "CRD+DOT", "OFD", "REVIEWKD", "KDSVD")
METRICS = {"best": "best_top1", "last": "last_top1"}


class LogKey(NamedTuple):
    """What a result file's name says: the method, the pair and the LS setting (None: no LS; (): LS, no flags)."""

    method: str
    teacher: str
    student: str
    ls: tuple | None


class ResultLine(NamedTuple):
    """One finished run."""

    best_top1: float
    last_top1: float
    seed: int | None
    epochs: int | None
    config_hash: str
    run_dir: str


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
    """A `best_top1=..\tlast_top1=..\t...` line, or None when it is not one."""
    fields = dict(item.split("=", 1) for item in line.strip().split("\t") if "=" in item)
    try:
        return ResultLine(
            float(fields["best_top1"]), float(fields["last_top1"]),
            int(fields["seed"]) if "seed" in fields else None,
            int(fields["epochs"]) if "epochs" in fields else None,
            fields.get("config_hash", ""), fields.get("run_dir", ""),
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
    """Mean ± std of one row (method, LS setting, recipe) in one column (teacher → student)."""

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
    published: Published | None = None
    diff: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def published_method(self) -> str:
        return self.method if self.ls is None or self.method in ("teacher", "student") else f"{self.method}+LS"


@dataclass
class Table:
    """Rows x columns of cells, with the notes that explain it."""

    metric: str
    rows: list[str]
    columns: list[tuple[str, str]]  # (teacher, student); teacher "" for a vanilla model no pair uses
    cells: dict[tuple[str, tuple[str, str]], Cell]
    notes: list[str] = field(default_factory=list)
    with_published: bool = False


def _row_sort_key(row: str, method: str, ls: tuple | None) -> tuple:
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, method, ls is not None, ls or (), row)


def _column_sort_key(column: tuple[str, str]) -> tuple:
    if column in PAIRS:
        return (0, PAIRS.index(column), "", "")
    return (1 if column[0] else 2, 0, column[0], column[1])


def build_table(results: dict[LogKey, list[ResultLine]], metric: str = "best", published: bool = False,
                notes: list[str] | None = None) -> Table:
    """Aggregate result lines into a table of mean ± std per (row, column)."""
    field_name = METRICS[metric]
    groups: list[tuple[LogKey, str, list[ResultLine]]] = []  # (key, config hash or "" when the file has one recipe)
    for key, lines in results.items():
        by_hash: dict[str, list[ResultLine]] = {}
        for line in lines:
            by_hash.setdefault(line.config_hash, []).append(line)
        for recipe, recipe_lines in by_hash.items():
            groups.append((key, recipe if len(by_hash) > 1 else "", recipe_lines))
    pairs = {(k.teacher, k.student) for k, _, _ in groups if k.method != "NONE"}
    cells: dict[tuple[str, tuple[str, str]], Cell] = {}
    row_keys: dict[str, tuple] = {}
    split_recipes = []

    def add(method: str, ls: tuple | None, column: tuple[str, str], recipe: str, lines: list[ResultLine]) -> None:
        row = f"{method} (vanilla)" if method in ("teacher", "student") else method_label(method, ls)
        if recipe:
            row += f" [{recipe}]"
        values = [getattr(line, field_name) for line in lines]
        cell = Cell(row, method, ls, column[0], column[1], lines[0].config_hash, values, [ln.seed for ln in lines])
        cell.mean, cell.std = mean_std(values)
        if published:
            if column[0]:
                cell.published = published_top1(cell.published_method, column[0], column[1])
            else:  # a vanilla model of its own: compare with the published teacher of that name, if any
                cell.published = published_top1("teacher", column[1], "")
            if cell.published is not None:
                cell.diff = cell.mean - cell.published.top1
        cells[(row, column)] = cell
        row_keys[row] = _row_sort_key(row, method, ls)

    for key, recipe, lines in groups:
        if recipe:
            split_recipes.append(f"{key.method},{key.teacher},{key.student}: recipe {recipe}, e.g. {lines[0].run_dir}")
        if key.method != "NONE":
            add(key.method, key.ls, (key.teacher, key.student), recipe, lines)
            continue
        model = key.student
        used = [pair for pair in pairs if model in pair]
        for pair in used:
            if pair[0] == model:
                add("teacher", None, pair, recipe, lines)
            if pair[1] == model:
                add("student", None, pair, recipe, lines)
        if not used:
            add("vanilla", None, ("", model), recipe, lines)
    rows = sorted(row_keys, key=lambda r: row_keys[r])
    columns = sorted({c for _, c in cells}, key=_column_sort_key)
    table_notes = list(notes or [])
    if published:
        used = sorted({c.published.source for c in cells.values() if c.published is not None})
        if used:
            table_notes.append("paper numbers from: " + "; ".join(used))
        if any(c.published is not None and c.published.note for c in cells.values()):
            table_notes.append("† after a paper number: a DKD-paper value not cross-checked against a second copy")
    if split_recipes:
        table_notes.append("files holding several recipes give one row per recipe [config hash]: "
                           + "; ".join(split_recipes))
    return Table(metric, rows, columns, cells, table_notes, published)


def column_label(column: tuple[str, str]) -> str:
    teacher, student = column
    return f"{teacher} → {student}" if teacher else student


def format_cell(cell: Cell | None, with_published: bool = False) -> str:
    """`74.00 ± 1.00 (n=3)`, plus `· paper 73.33 (+0.67)` with published numbers."""
    if cell is None:
        return ""
    text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "") + f" (n={cell.n})"
    if with_published and cell.published is not None:
        setting = ""
        pub_setting = cell.published.setting
        if pub_setting and cell.ls and tuple(float(v) for v in cell.ls) != tuple(float(v) for v in pub_setting[:2]):
            setting = f" at τ={pub_setting[0]}, w={pub_setting[1]}"
        mark = f" {cell.published.note}" if cell.published.note else ""
        text += f" · paper {cell.published.top1:.2f}{mark}{setting} ({cell.diff:+.2f})"
    return text


def _title(table: Table) -> str:
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


def to_csv(table: Table) -> str:
    """One line per cell (long format), for spreadsheets and scripts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in table.rows:
        for column in table.columns:
            cell = table.cells.get((row, column))
            if cell is None:
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


def report(logs_dir: str, metric: str = "best", published: bool = False) -> Table:
    """Read a logs folder and build its table."""
    results, notes = read_results(logs_dir)
    return build_table(results, metric, published, notes)
