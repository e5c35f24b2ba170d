"""The one table type of the tools (mdistiller/analysis/table.py): padded text, Markdown, JSON records."""

from __future__ import annotations

import json

import pytest

from mdistiller.analysis.table import Grid


def test_text_pads_columns_first_left_numbers_right():
    grid = Grid.of(["row", "images/s"], [["reference", "5"], ["ours", "1,234"]])
    assert grid.text().splitlines() == ["row        images/s",
                                        "reference         5",
                                        "ours          1,234"]
    assert Grid.of(["a", "b"], [["x", "1"], ["yy", "22"]], numeric=False).text().splitlines() == \
        ["a   b ", "x   1 ", "yy  22"]


def test_markdown_aligns_numeric_columns_right():
    grid = Grid.of(["row", "n"], [["a", "1"]])
    assert grid.markdown() == "| row | n |\n|---|---:|\n| a | 1 |"
    assert Grid.of(["m", "x"], [["a", "1"]], numeric=False).markdown().splitlines()[1] == "|---|---|"


def test_records_and_json():
    grid = Grid.of(["row", "n"], [["a", "1"], ["b", "2"]])
    assert grid.records() == [{"row": "a", "n": "1"}, {"row": "b", "n": "2"}]
    assert json.loads(grid.json()) == grid.records()


def test_a_row_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="a row of 1 cells in a table of 2 columns"):
        Grid.of(["row", "n"], [["a"]])
