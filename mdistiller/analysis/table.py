"""One table type for the tools' output: a head and rows of strings, rendered as padded text, as Markdown or as JSON
records. tools/bench.py (its row, loader and per-method tables) and tools/report.py (analysis/report.py) render
through it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Grid:
    """A table of strings; `numeric`: the columns after the first hold numbers (right-aligned in text and Markdown)."""

    head: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: bool = True

    @classmethod
    def of(cls, head: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> Grid:
        grid = cls(tuple(head), tuple(tuple(row) for row in rows), numeric)
        bad = [row for row in grid.rows if len(row) != len(grid.head)]
        if bad:
            raise ValueError(f"a row of {len(bad[0])} cells in a table of {len(grid.head)} columns: {bad[0]}")
        return grid

    def text(self) -> str:
        """Columns padded to their widest cell: the first left-aligned, the others right-aligned when numeric."""
        lines = [self.head, *self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self.head))]

        def pad(i: int, cell: str, width: int) -> str:
            return cell.rjust(width) if i and self.numeric else cell.ljust(width)
        return "\n".join("  ".join(pad(i, c, w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines)

    def markdown(self) -> str:
        """GitHub Markdown (`---:` under the numeric columns)."""
        rule = ["---"] + ["---:" if self.numeric else "---"] * (len(self.head) - 1)
        lines = ["| " + " | ".join(self.head) + " |", "|" + "|".join(rule) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in self.rows])

    def records(self) -> list[dict[str, str]]:
        """One mapping head -> cell per row."""
        return [dict(zip(self.head, row)) for row in self.rows]

    def json(self) -> str:
        """The records as JSON."""
        return json.dumps(self.records(), indent=2)
