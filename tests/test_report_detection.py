"""tools/report.py on detection runs: box AP result lines, the DKD paper's row labels, AP / AP50 / AP75 from the run
folders' worklogs, nan runs, and a logs folder holding classification and detection results (numbers by hand)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import yaml

from mdistiller.analysis import published as pub
from mdistiller.analysis import report as rep
from mdistiller.analysis import report_detection as det
from mdistiller.cli import report as report_cli
from mdistiller.cli import train as train_tool
from mdistiller.detection import methods  # noqa: F401  (registers the RCNN_* config sections)
from mdistiller.distillers.config import method_sections, to_cfgnode
from mdistiller.engine import cfg as cfg_module
from mdistiller.engine import worklog
from mdistiller.engine.run import append_result
from mdistiller.errors import MdistillerError

from conftest import REPO, run_tool

NAN = math.nan


def _ap_line(best: float, last: float, seed: int, run_dir: Path, recipe: str = "0123456789") -> str:
    """A detection run's line as engine/run.py append_result writes it."""
    return (f"best_AP={best:.4f}\tlast_AP={last:.4f}\tseed={seed}\titers=90000\tconfig_hash={recipe}\t"
            f"run_dir={run_dir}\n")


def _write_run(run_dir: Path, evaluations: dict[int, tuple[float, float, float]], periods: int = 4) -> None:
    """A run folder's worklog.txt through the engine's own writer: a block per period, test_* lines only in the
    evaluated ones (period -> AP, AP50, AP75), best_acc from the first evaluation on, the final best_acc line."""
    run_dir.mkdir(parents=True)
    best = -1.0
    for period in range(1, periods + 1):
        metrics = {"loss_cls": 0.5, "loss_box_reg": 0.25}
        if period in evaluations:
            ap, ap50, ap75 = evaluations[period]
            metrics.update({"test_AP": ap, "test_AP50": ap50, "test_AP75": ap75, "test_APs": NAN, "test_APm": 20.0,
                            "test_APl": 40.0})
            best = max(best, ap)  # as the checkpoints: a nan AP never becomes the best
        if best >= 0:
            metrics["best_acc"] = best
        worklog.write_epoch(str(run_dir), period, 0.02, metrics)
    worklog.write_final(str(run_dir), best)


@pytest.fixture
def logs(tmp_path) -> Path:
    """Detection results of known values (runs under tmp/runs, logs under tmp/logs).

    DKD R101→R18: best 35 / 36 / 37, last 34 / 36 / 35; the student R18 alone 33 / 34 (no run folders); ReviewKD
    R101→R18: 36.5 and a run whose every evaluation was nan (best -1, last nan); ReviewDKD R101→R50 40 with a
    worklog saying 39.5; the student R50 alone 38; DKD R50→MV2 32."""
    runs, folder = tmp_path / "runs", tmp_path / "logs"
    folder.mkdir()
    dkd = [runs / f"dkd{seed}" for seed in range(3)]
    _write_run(dkd[0], {2: (35.0, 55.0, 37.0), 4: (34.0, 54.0, 36.0)})
    _write_run(dkd[1], {2: (36.0, 57.0, 38.0), 4: (36.0, 56.5, 38.5)})  # best reached twice: the first block's
    _write_run(dkd[2], {2: (37.0, 58.0, 39.0), 4: (35.0, NAN, 40.0)})
    reviewkd = [runs / "rkd0", runs / "rkd1"]
    _write_run(reviewkd[0], {4: (36.5, 56.0, NAN)})
    _write_run(reviewkd[1], {2: (NAN, NAN, NAN), 4: (NAN, NAN, NAN)})
    _write_run(runs / "rdkd0", {4: (39.5, 60.0, 43.0)})
    files = {
        "RCNN_DKD,R101-FPN,R18-FPN.txt": [_ap_line(b, la, s, dkd[s]) for s, (b, la) in
                                          enumerate([(35.0, 34.0), (36.0, 36.0), (37.0, 35.0)])],
        "RCNN_NONE,none,R18-FPN.txt": [_ap_line(33.0, 32.5, 0, runs / "gone0"),
                                       _ap_line(34.0, 34.0, 1, runs / "gone1")],
        "RCNN_REVIEWKD,R101-FPN,R18-FPN.txt": [_ap_line(36.5, 36.5, 0, reviewkd[0]),
                                               _ap_line(-1.0, NAN, 1, reviewkd[1])],
        "RCNN_REVIEWDKD,R101-FPN,R50-FPN.txt": [_ap_line(40.0, 40.0, 0, runs / "rdkd0")],
        "RCNN_NONE,none,R50-FPN.txt": [_ap_line(38.0, 38.0, 0, runs / "gone2")],
        "RCNN_DKD,R50-FPN,MV2-FPN.txt": [_ap_line(32.0, 32.0, 0, runs / "gone3")],
    }
    for name, lines in files.items():
        (folder / name).write_text("".join(lines))
    return folder


def _cell(table, row: str, teacher: str, student: str):
    return table.cells[(row, (teacher, student))]


def _md_row(markdown: str, row: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {row} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_result_lines_know_their_metric():
    ap = rep.parse_result_line("best_AP=36.1234\tlast_AP=nan\tseed=2\titers=90000\tconfig_hash=abc\trun_dir=/r\n")
    assert (ap.metric, ap.task, ap.best, ap.seed, ap.iters, ap.epochs, ap.run_dir) == (
        "AP", "detection", 36.1234, 2, 90000, None, "/r")
    assert math.isnan(ap.last) and ap.value("best") == 36.1234
    with pytest.raises(AttributeError, match="no top-1"):
        ap.best_top1  # noqa: B018
    top1 = rep.parse_result_line("best_top1=73.0000\tlast_top1=72.0000\tseed=0\tepochs=240\tconfig_hash=h\trun_dir=/r")
    assert (top1.metric, top1.task, top1.best_top1, top1.last_top1, top1.epochs, top1.iters) == (
        "top1", "classification", 73.0, 72.0, 240, None)
    assert rep.parse_result_line("best_mAP=1\tlast_mAP=1") is None


def test_cells_are_the_hand_computed_means_with_the_papers_labels(logs):
    table = rep.report(str(logs))
    assert table.task == "detection" and table.quantity == "box AP"
    assert table.rows == ["student", "ReviewKD", "DKD", "DKD+ReviewKD"]  # the DKD paper's order
    assert table.columns == [("R101-FPN", "R18-FPN"), ("R101-FPN", "R50-FPN"), ("R50-FPN", "MV2-FPN")]
    dkd = _cell(table, "DKD", "R101-FPN", "R18-FPN")
    assert (dkd.method, dkd.n, dkd.mean, dkd.std, dkd.seeds) == ("RCNN_DKD", 3, 36.0, 1.0, [0, 1, 2])
    student = _cell(table, "student", "R101-FPN", "R18-FPN")
    assert student.mean == 33.5 and student.std == pytest.approx(math.sqrt(0.5))
    reviewkd = _cell(table, "ReviewKD", "R101-FPN", "R18-FPN")  # the never-evaluated run: counted, not averaged
    assert (reviewkd.n, reviewkd.mean, reviewkd.std, reviewkd.unmeasured, reviewkd.seeds) == (1, 36.5, None, 1, [0])
    # the R50 student trained alone is the R101 → R50 student, never the teacher of R50 → MV2
    assert _cell(table, "student", "R101-FPN", "R50-FPN").mean == 38.0
    assert ("student", ("R50-FPN", "MV2-FPN")) not in table.cells
    assert not any(row.startswith("teacher") for row in table.rows)
    markdown = rep.to_markdown(table)
    assert markdown.splitlines()[0] == "Box AP (%), best evaluation: mean ± sample std (n − 1) over seeds, n = runs"
    assert "| method | R101-FPN → R18-FPN | R101-FPN → R50-FPN | R50-FPN → MV2-FPN |" in markdown
    assert _md_row(markdown, "student") == ["33.50 ± 0.71 (n=2)", "38.00 (n=1)", ""]
    assert _md_row(markdown, "ReviewKD") == ["36.50 (n=1; 1 nan)", "", ""]
    assert _md_row(markdown, "DKD") == ["36.00 ± 1.00 (n=3)", "", "32.00 (n=1)"]


def test_last_evaluation_and_a_cell_without_any_number(logs):
    table = rep.report(str(logs), metric="last")
    assert _cell(table, "DKD", "R101-FPN", "R18-FPN").mean == 35.0  # 34, 36, 35
    assert _cell(table, "student", "R101-FPN", "R18-FPN").std == pytest.approx(math.sqrt(1.125))  # 32.5, 34
    (logs / "RCNN_REVIEWKD,R101-FPN,R18-FPN.txt").write_text(_ap_line(-1.0, NAN, 1, logs / "x"))
    table = rep.report(str(logs), metric="last")
    empty = _cell(table, "ReviewKD", "R101-FPN", "R18-FPN")
    assert empty.n == 0 and empty.unmeasured == 1 and math.isnan(empty.mean)
    assert _md_row(rep.to_markdown(table), "ReviewKD") == ["n/a (n=0; 1 nan)", "", ""]
    assert "Box AP (%), last evaluation" in rep.to_markdown(table)


def test_ap_columns_come_from_the_reported_evaluation_in_each_worklog(logs):
    best = rep.report(str(logs), ap_columns=True)
    dkd = _cell(best, "DKD", "R101-FPN", "R18-FPN")
    assert dkd.columns == {"AP50": [55.0, 57.0, 58.0], "AP75": [37.0, 38.0, 39.0]}  # the best AP's blocks
    markdown = rep.to_markdown(best)
    assert markdown.splitlines()[0].startswith("Box AP / AP50 / AP75 (%), best evaluation (AP50 and AP75 of")
    # AP50 55, 57, 58: mean 56.667, std sqrt(4.6667 / 2) = 1.528
    assert _md_row(markdown, "DKD")[0] == "36.00 ± 1.00 / 56.67 ± 1.53 / 38.00 ± 1.00 (n=3)"
    # the nan run is not read; the other's AP75 is nan in its worklog
    assert _md_row(markdown, "ReviewKD")[0] == "36.50 / 56.00 / n/a (n=1; 1 nan; AP75 n=0)"
    # no run folders: AP alone, and a note per run
    assert _md_row(markdown, "student")[0] == "33.50 ± 0.71 / n/a / n/a (n=2; AP50 n=0; AP75 n=0)"
    assert any(note.startswith("no AP50 / AP75 for student (R101-FPN → R18-FPN) seed 1: no worklog at ")
               for note in best.notes)
    # a worklog that is not the result line's run (AP 39.5 there, 40.0 in the line) is not used
    assert _cell(best, "DKD+ReviewKD", "R101-FPN", "R50-FPN").columns == {"AP50": [], "AP75": []}
    assert any("says best AP 39.5000, the result line 40.0000" in note for note in best.notes)

    last = rep.report(str(logs), metric="last", ap_columns=True)
    dkd = _cell(last, "DKD", "R101-FPN", "R18-FPN")
    assert dkd.columns == {"AP50": [54.0, 56.5], "AP75": [36.0, 38.5, 40.0]}  # the last evaluated blocks
    # AP50 54, 56.5: 55.25 ± 1.77; AP75 36, 38.5, 40: mean 38.167, std sqrt(8.1667 / 2) = 2.021
    assert _md_row(rep.to_markdown(last), "DKD")[0] == "35.00 ± 1.00 / 55.25 ± 1.77 / 38.17 ± 2.02 (n=3; AP50 n=2)"


def test_published_coco_numbers_are_a_table_of_their_own(logs):
    # typed from spec detection.md section 4, independently of the module
    assert pub.published_ap("DKD", "R101-FPN", "R18-FPN")[:3] == (35.05, 56.60, 37.54)
    assert pub.published_ap("DKD+ReviewKD", "R50-FPN", "MV2-FPN")[:3] == (34.35, 54.89, 36.61)
    assert pub.published_ap("student", "R101-FPN", "R50-FPN")[:3] == (37.93, 58.84, 41.05)
    assert pub.published_ap("teacher", "R50-FPN", "MV2-FPN")[:3] == (40.22, 61.02, 43.81)
    assert pub.published_ap("ReviewKD", "R101-FPN", "R18-FPN").ap75_note == "*"
    assert pub.published_ap("ReviewKD", "R101-FPN", "R50-FPN").ap75_note == ""
    assert len(pub.COCO_DETECTION) == 8 * 3 and "unconfirmed" in pub.COCO_SOURCE
    assert pub.published_top1("DKD", "R101-FPN", "R18-FPN") is None  # never among the top-1 numbers
    table = rep.report(str(logs), published=True)
    dkd = _cell(table, "DKD", "R101-FPN", "R18-FPN")
    assert dkd.published.ap == 35.05 and dkd.diff == pytest.approx(0.95)
    markdown = rep.to_markdown(table)
    assert _md_row(markdown, "student") == ["33.50 ± 0.71 (n=2) · paper 33.26 (+0.24)",
                                            "38.00 (n=1) · paper 37.93 (+0.07)", ""]
    assert _md_row(markdown, "DKD+ReviewKD")[1] == "40.00 (n=1) · paper 40.65 (-0.65)"
    assert "as recalled in the spec, unconfirmed" in markdown and "* after a paper AP75" not in markdown
    markdown = rep.to_markdown(rep.report(str(logs), published=True, ap_columns=True))
    assert _md_row(markdown, "ReviewKD")[0] == ("36.50 / 56.00 / n/a (n=1; 1 nan; AP75 n=0) · paper 36.75 / 56.72 / "
                                                "34.00* (-0.25)")
    assert "* after a paper AP75: as printed" in markdown


def test_classification_and_detection_results_give_two_tables_never_one(logs):
    (logs / "KD,resnet32x4,resnet8x4.txt").write_text(
        "best_top1=73.0000\tlast_top1=72.0000\tseed=0\tepochs=240\tconfig_hash=h\trun_dir=/r\n")
    classification, detection = rep.reports(str(logs))
    assert (classification.task, detection.task) == ("classification", "detection")
    assert classification.rows == ["KD"] and "student" in detection.rows
    assert rep.reports(str(logs), task="detection")[0].cells.keys() == detection.cells.keys()
    with pytest.raises(MdistillerError, match="holds classification .top-1. and detection .box AP. results"):
        rep.report(str(logs))
    results, _ = rep.read_results(str(logs))
    with pytest.raises(MdistillerError, match="mix top-1 .classification. and box AP .detection."):
        rep.build_table(results)



def test_cli_prints_both_tables_and_writes_the_detection_csv(logs, tmp_path):
    (logs / "KD,resnet32x4,resnet8x4.txt").write_text(
        "best_top1=73.0000\tlast_top1=72.0000\tseed=0\tepochs=240\tconfig_hash=h\trun_dir=/r\n")
    md = tmp_path / "out" / "both.md"
    result = run_tool("report.py", "--logs", str(logs), "--ap-columns", "--markdown", str(md))
    assert result.returncode == 0, result.stderr
    assert result.stdout == md.read_text()
    top1_at = result.stdout.index("Top-1 (%), best-epoch")
    ap_at = result.stdout.index("Box AP / AP50 / AP75 (%), best evaluation")
    assert top1_at == 0 and ap_at > top1_at
    assert "| KD | 73.00 (n=1) |" in result.stdout
    assert ("| DKD | 36.00 ± 1.00 / 56.67 ± 1.53 / 38.00 ± 1.00 (n=3) |  | "
            "32.00 / n/a / n/a (n=1; AP50 n=0; AP75 n=0) |") in result.stdout

    with pytest.raises(MdistillerError, match="--csv writes one table .* pass --task classification or --task "
                       "detection"):
        report_cli.main(["--logs", str(logs), "--csv", str(tmp_path / "t.csv")])
    assert not (tmp_path / "t.csv").exists()

    table_csv = tmp_path / "det.csv"
    result = run_tool("report.py", "--logs", str(logs), "--task", "detection", "--ap-columns", "--published",
                      "--csv", str(table_csv))
    assert result.returncode == 0, result.stderr
    assert "Top-1" not in result.stdout
    rows = list(csv.DictReader(table_csv.open()))
    dkd = next(r for r in rows if r["row"] == "DKD" and r["student"] == "R18-FPN")
    assert (dkd["method"], dkd["n"], dkd["mean"], dkd["std"], dkd["seeds"], dkd["nan"]) == (
        "RCNN_DKD", "3", "36.0000", "1.0000", "0 1 2", "0")
    assert (dkd["ap50_n"], dkd["ap50_mean"], dkd["ap50_std"], dkd["ap75_mean"]) == ("3", "56.6667", "1.5275", "38.0000")
    assert (dkd["published"], dkd["published_ap50"], dkd["published_ap75"], dkd["diff"]) == (
        "35.05", "56.60", "37.54", "+0.9500")
    reviewkd = next(r for r in rows if r["row"] == "ReviewKD")
    assert (reviewkd["n"], reviewkd["nan"], reviewkd["std"], reviewkd["ap75_n"], reviewkd["ap75_mean"]) == (
        "1", "1", "", "0", "")
    assert rep.to_csv(rep.report(str(logs), task="detection")).splitlines()[0].startswith("row,method,teacher,student,")


def test_ap_columns_and_a_task_the_folder_lacks_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "cls"
    folder.mkdir()
    (folder / "NONE,none,resnet8.txt").write_text(
        "best_top1=60.0000\tlast_top1=60.0000\tseed=0\tepochs=240\tconfig_hash=h\trun_dir=/r\n")
    result = run_tool("report.py", "--logs", str(folder), "--ap-columns")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "holds no detection (box AP) results" in result.stderr
    with pytest.raises(MdistillerError, match="AP columns .--ap-columns. are for detection results"):
        rep.build_table(rep.read_results(str(folder))[0], ap_columns=True)
    with pytest.raises(MdistillerError, match=r"no detection results in .* \(it holds classification results\)"):
        rep.reports(str(folder), task="detection")


def test_the_bar_chart_of_a_detection_table(logs, tmp_path):
    pytest.importorskip("matplotlib")
    from mdistiller.analysis.plots import plot_table, table_figure

    table = rep.report(str(logs), metric="last", published=True)
    figure = table_figure(table)
    assert figure.axes[0].get_ylabel() == "box AP (%), last evaluation"
    assert Path(plot_table(table, str(tmp_path / "det.png"))).stat().st_size > 0


COCO_CONFIGS = sorted((REPO / "configs" / "coco").glob("*.yaml"))


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=[p.name for p in COCO_CONFIGS])
def test_the_configs_published_numbers_and_rows_are_the_reports(path):
    """Each configs/coco file names its row of the DKD paper's table in its header and quotes its AP / AP50 / AP75:
    the report's label for its DISTILLER.TYPE must be that row, and published.py must hold the same numbers."""
    header = path.read_text().splitlines()
    at = next(i for i, line in enumerate(header) if line.startswith("# Published AP / AP50 / AP75"))
    row = re.search(r"table, (\S+) row\)", header[at]).group(1)
    numbers = tuple(float(v) for v in re.findall(r"\d+\.\d+", header[at + 1])[:3])
    distiller = yaml.safe_load(path.read_text())["DISTILLER"]
    assert det.label(distiller["TYPE"]) == row
    teacher = distiller.get("TEACHER") or next(t for t, s in pub.COCO_PAIRS if s == distiller["STUDENT"])
    assert pub.published_ap(row, teacher, distiller["STUDENT"])[:3] == numbers


def test_the_engine_writes_lines_the_report_reads(tmp_path, monkeypatch):
    for name in ("RCNN_DKD", "RCNN_REVIEWKD"):  # in CFG only when mdistiller.detection came before the engine
        if name not in cfg_module.CFG:
            monkeypatch.setitem(cfg_module.CFG, name, to_cfgnode(method_sections()[name]))
    cfg = train_tool.load_cfg(str(REPO / "configs/coco/DKD-R18-R101.yaml"), ["LOG.RESULTS_DIR", str(tmp_path)])
    cfg.EXPERIMENT.SEED = 3
    path = append_result(cfg, str(tmp_path / "run"), {"best_acc": 35.12346, "last_acc": NAN})
    assert Path(path).name == "RCNN_DKD,R101-FPN,R18-FPN.txt"
    cell = rep.report(str(tmp_path)).cells[("DKD", ("R101-FPN", "R18-FPN"))]
    assert (cell.values, cell.seeds, cell.unmeasured) == ([35.1235], [3], 0)
    line = rep.read_results(str(tmp_path))[0][rep.parse_log_name(Path(path).name)][0]
    assert (line.metric, line.iters, line.epochs) == ("AP", cfg.SOLVER.MAX_ITER, None) and math.isnan(line.last)


def test_the_coco_sweeps_report_is_a_box_ap_table(tmp_path, monkeypatch):
    from mdistiller.cli import sweep as sweep_cli
    from mdistiller.cli import sweep_file, sweep_plan

    for name in ("RCNN_DKD", "RCNN_REVIEWKD"):
        if name not in cfg_module.CFG:
            monkeypatch.setitem(cfg_module.CFG, name, to_cfgnode(method_sections()[name]))
    where = ["LOG.PREFIX", str(tmp_path / "output"), "LOG.RESULTS_DIR", str(tmp_path / "logs")]
    plan = sweep_plan.plan_sweep(sweep_file.load_sweep("coco"), where)
    finished = {"DKD-R18-R101.yaml": (35.5, 35.0), "Baseline-R18.yaml": (33.0, 32.0)}
    for run in plan.runs:
        if Path(run.config).name in finished:
            best, last = finished[Path(run.config).name]
            append_result(run.cfg, run.run_dir, {"best_acc": best, "last_acc": last})
    report = sweep_cli.main(["--report", "coco", *where, "--published"])["report"]
    assert f"2 of {len(plan.runs)} runs finished" in report
    assert "| student | 33.00 (n=1) · paper 33.26 (-0.26) |" in report
    assert "| DKD | 35.50 (n=1) · paper 35.05 (+0.45) |" in report
    assert "Top-1" not in report and report.count("Box AP (%), best evaluation") == 1
    assert (tmp_path / "output" / "sweeps" / "coco" / "report.csv").read_text().startswith("row,method,teacher,")
