"""tools/report.py on hand-made logs (numbers computed by hand), and --seeds sweeps feeding it."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from mdistiller.analysis.report import parse_log_name, report, to_csv, to_markdown
from mdistiller.engine.worklog import read as read_worklog
from mdistiller.errors import MdistillerError

from conftest import REPO, run_overrides, run_tool

VANILLA = str(REPO / "configs/cifar100/vanilla/resnet8.yaml")


def _line(best: float, last: float, seed: int, recipe: str, run: str) -> str:
    return (f"best_top1={best:.4f}\tlast_top1={last:.4f}\tseed={seed}\tepochs=240\tconfig_hash={recipe}\t"
            f"run_dir=/runs/{run}\n")


@pytest.fixture
def logs(tmp_path) -> Path:
    """Known values: KD 73/74/75 (mean 74, std 1), KD+LS(2,9) 76/77, DKD 72 alone, two vanilla models, a file
    holding two recipes, and files the report must skip."""
    folder = tmp_path / "logs"
    folder.mkdir()
    files = {
        "KD,resnet32x4,resnet8x4.txt": [(73, 72, 0, "aaaa"), (74, 73, 1, "aaaa"), (75, 77, 2, "aaaa")],
        "KD,resnet32x4,resnet8x4,2,9.txt": [(76, 75.5, 0, "bbbb"), (77, 76.5, 1, "bbbb")],
        "DKD,resnet56,resnet20.txt": [(72, 71, 0, "cccc")],
        "NONE,none,resnet32x4.txt": [(79, 78, 0, "dddd"), (79.5, 79, 1, "dddd")],
        "NONE,none,resnet8x4.txt": [(72.5, 72, 0, "eeee")],
        "NONE,none,resnet8.txt": [(60, 60, 0, "ffff")],
        "KD,resnet56,resnet20.txt": [(70, 70, 0, "h1"), (71, 71, 1, "h1"), (50, 50, 0, "h2")],
    }
    for name, rows in files.items():
        (folder / name).write_text("".join(_line(*row, run=f"{name}-{row[2]}") for row in rows))
    (folder / "README.md").write_text("not a result file")
    (folder / "notes.txt").write_text("scratch")
    with open(folder / "DKD,resnet56,resnet20.txt", "a") as f:
        f.write("garbage line\n")
    return folder


def _cell(table, row: str, teacher: str, student: str):
    return table.cells[(row, (teacher, student))]


def test_log_names_give_method_pair_and_ls_setting():
    assert parse_log_name("KD,resnet32x4,resnet8x4.txt") == ("KD", "resnet32x4", "resnet8x4", None)
    assert parse_log_name("KD,resnet32x4,resnet8x4,2,9.txt") == ("KD", "resnet32x4", "resnet8x4", ("2", "9"))
    assert parse_log_name("DKD,wrn_40_2,wrn_16_2,2.5,12.txt").ls == ("2.5", "12")
    assert parse_log_name("MLKD,vgg13,vgg8,LS.txt").ls == ()
    assert parse_log_name("notes.txt") is None and parse_log_name("README.md") is None


def test_means_and_stds_are_the_hand_computed_ones(logs):
    table = report(str(logs))
    kd = _cell(table, "KD", "resnet32x4", "resnet8x4")
    assert (kd.n, kd.mean, kd.std, kd.seeds) == (3, 74.0, 1.0, [0, 1, 2])
    ls = _cell(table, "KD+LS (τ=2, w=9)", "resnet32x4", "resnet8x4")  # its own row, never mixed with KD
    assert ls.n == 2 and ls.mean == 76.5 and ls.std == pytest.approx(math.sqrt(0.5))
    dkd = _cell(table, "DKD", "resnet56", "resnet20")
    assert dkd.n == 1 and dkd.mean == 72.0 and dkd.std is None
    teacher = _cell(table, "teacher (vanilla)", "resnet32x4", "resnet8x4")
    assert teacher.mean == 79.25 and teacher.std == pytest.approx(math.sqrt(0.125))
    assert _cell(table, "student (vanilla)", "resnet32x4", "resnet8x4").mean == 72.5
    assert _cell(table, "vanilla", "", "resnet8").mean == 60.0  # a model no pair uses: its own column
    # two recipes in one file: two rows, never averaged together
    assert _cell(table, "KD [h1]", "resnet56", "resnet20").mean == 70.5
    assert _cell(table, "KD [h2]", "resnet56", "resnet20").mean == 50.0
    assert table.rows[:3] == ["teacher (vanilla)", "student (vanilla)", "KD"]
    assert table.rows.index("KD+LS (τ=2, w=9)") < table.rows.index("DKD")
    assert table.columns[0] == ("resnet32x4", "resnet8x4") and table.columns[-1] == ("", "resnet8")
    assert any("DKD,resnet56,resnet20.txt line 2" in note for note in table.notes)
    assert any("skipped notes.txt" in note for note in table.notes)


def test_last_uses_the_last_epoch_accuracy(logs):
    kd = _cell(report(str(logs), metric="last"), "KD", "resnet32x4", "resnet8x4")
    assert kd.mean == 74.0 and kd.std == pytest.approx(math.sqrt(7.0))  # 72, 73, 77


def test_published_numbers_and_differences(logs):
    table = report(str(logs), published=True)
    kd = _cell(table, "KD", "resnet32x4", "resnet8x4")
    assert kd.published.top1 == 73.33 and kd.diff == pytest.approx(0.67)
    ls = _cell(table, "KD+LS (τ=2, w=9)", "resnet32x4", "resnet8x4")
    assert ls.published.top1 == 76.62 and ls.published.setting == (2, 9) and ls.diff == pytest.approx(-0.12)
    assert _cell(table, "DKD", "resnet56", "resnet20").diff == pytest.approx(0.03)
    assert _cell(table, "teacher (vanilla)", "resnet32x4", "resnet8x4").diff == pytest.approx(-0.17)
    assert _cell(table, "student (vanilla)", "resnet32x4", "resnet8x4").published is None
    markdown = to_markdown(table)
    assert "| KD | 74.00 ± 1.00 (n=3) · paper 73.33 (+0.67) |" in markdown
    assert "76.50 ± 0.71 (n=2) · paper 76.62 (-0.12)" in markdown
    assert "72.00 (n=1) · paper 71.97 (+0.03)" in markdown


def test_published_setting_is_named_when_it_differs(tmp_path):
    (tmp_path / "KD,resnet110,resnet20,2,9.txt").write_text(_line(71.0, 70.0, 0, "x", "a"))
    markdown = to_markdown(report(str(tmp_path), published=True))
    assert "71.00 (n=1) · paper 71.48 at τ=4, w=12 (-0.48)" in markdown  # the authors used (4, 12) there


def test_cli_prints_and_writes_markdown_and_csv(logs, tmp_path):
    md, table_csv = tmp_path / "out" / "table.md", tmp_path / "out" / "table.csv"
    result = run_tool("report.py", "--logs", str(logs), "--published", "--markdown", str(md), "--csv", str(table_csv))
    assert result.returncode == 0, result.stderr
    assert result.stdout == md.read_text()
    assert "| method | resnet32x4 → resnet8x4 | resnet56 → resnet20 | resnet8 |" in result.stdout
    rows = list(csv.DictReader(table_csv.open()))
    kd = next(r for r in rows if r["row"] == "KD" and r["student"] == "resnet8x4")
    assert (kd["n"], kd["mean"], kd["std"], kd["seeds"], kd["published"], kd["diff"]) == (
        "3", "74.0000", "1.0000", "0 1 2", "73.33", "+0.6700")
    ls = next(r for r in rows if r["ls_base_temp"] == "2")
    assert (ls["method"], ls["ls_kd_weight"], ls["published_setting"]) == ("KD", "9", "2,9")


def test_cli_without_results_is_one_line(tmp_path):
    result = run_tool("report.py", "--logs", str(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: no result files")
    assert len(result.stderr.splitlines()) == 1


def test_read_worklog_keeps_the_last_copy_of_an_epoch(tmp_path):
    block = "-------------------------\nepoch: {e}\nlr: 0.05\nloss_ce: {v}\n-------------------------\n"
    (tmp_path / "worklog.txt").write_text(block.format(e=1, v=2.0) + block.format(e=1, v=1.5)
                                          + block.format(e=2, v=1.0) + "best_acc\t50.0000\n")
    epochs = read_worklog(str(tmp_path / "worklog.txt"))
    assert [(e["epoch"], e["loss_ce"]) for e in epochs] == [(1, 1.5), (2, 1.0)]
    with pytest.raises(MdistillerError, match="worklog not found"):
        read_worklog(str(tmp_path / "missing.txt"))


def test_seeds_sweep_runs_each_seed_and_the_report_aggregates_them(tmp_path, cifar100_tiny_root):
    train_tool = importlib.import_module("mdistiller.cli.train")
    args = ["--cfg", VANILLA, *run_overrides(tmp_path, cifar100_tiny_root), "SOLVER.BATCH_SIZE", "32"]
    runs = train_tool.main(["--seeds", "0,1", *args])
    names = [Path(r["run_dir"]).name for r in runs]
    assert names == [f"vanilla,resnet8,SOLVER.EPOCHS:1,SOLVER.BATCH_SIZE:32,seed:{s}" for s in (0, 1)]
    log_file = tmp_path / "logs" / "NONE,none,resnet8.txt"
    lines = log_file.read_text().splitlines()
    assert [line.split("\t")[2] for line in lines] == ["seed=0", "seed=1"]
    assert len({line.split("\t")[4] for line in lines}) == 1, "the seeds of one recipe share its config_hash"
    a, b = (torch.load(Path(r["run_dir"]) / "student_latest", weights_only=False)["model"] for r in runs)
    assert not torch.equal(a["fc.weight"], b["fc.weight"]), "different seeds, different runs"
    cell = report(str(tmp_path / "logs")).cells[("vanilla", ("", "resnet8"))]
    assert cell.n == 2 and cell.seeds == [0, 1]
    train_tool.main(["--resume", "--seeds", "0,1", *args])  # finished: nothing to do, no duplicate lines
    assert log_file.read_text().splitlines() == lines
    with pytest.raises(MdistillerError, match="already holds a run: pass --resume"):
        train_tool.main(["--seeds", "1,2", *args])
    with pytest.raises(MdistillerError, match="either with --seeds or as EXPERIMENT.SEED"):
        train_tool.main(["--seeds", "3", *args, "EXPERIMENT.SEED", "3"])
    with pytest.raises(MdistillerError, match="comma-separated integers"):
        train_tool.main(["--seeds", "0,x", *args])
    assert to_csv(report(str(tmp_path / "logs"))).count("\n") == 2


def test_results_of_runs_keeps_exactly_the_given_runs_one_line_each(logs):
    from mdistiller.analysis.report import RunRef, results_of_runs

    kd = str(logs / "KD,resnet32x4,resnet8x4.txt")
    with open(kd, "a") as f:  # seed 1 of that recipe trained again in its own folder: the later line wins
        f.write(_line(74.5, 74, 1, "aaaa", run="KD,resnet32x4,resnet8x4.txt-1"))
    runs = [RunRef(kd, "aaaa", 1, "/runs/KD,resnet32x4,resnet8x4.txt-1"),
            RunRef(kd, "aaaa", 2, "/elsewhere"),  # same recipe and seed from another folder: still its result
            RunRef(kd, "aaaa", 9, "/runs/x"),  # no such seed
            RunRef(str(logs / "NONE,none,resnet8.txt"), "ffff", 0, "/runs/NONE,none,resnet8.txt-0")]
    results, missing = results_of_runs([*runs, runs[0]])
    assert [line.best_top1 for line in results[parse_log_name("KD,resnet32x4,resnet8x4.txt")]] == [74.5, 75.0]
    assert [line.best_top1 for line in results[parse_log_name("NONE,none,resnet8.txt")]] == [60.0]
    assert missing == [runs[2]] and len(results) == 2
