"""tools/report.py --published for the classic methods (CRD / DKD paper table) and KD+DOT (upstream's README)."""

from __future__ import annotations

import pytest

from mdistiller.analysis import published as pub
from mdistiller.analysis.report import parse_log_name, report, to_markdown


def _line(best: float, seed: int = 0) -> str:
    return f"best_top1={best:.4f}\tlast_top1={best:.4f}\tseed={seed}\tepochs=240\tconfig_hash=h\trun_dir=/r/{seed}\n"


@pytest.fixture
def logs(tmp_path):
    files = {
        "AT,resnet32x4,resnet8x4.txt": [74.0, 73.0],
        "KD,resnet32x4,resnet8x4.txt": [73.5],
        "KD+DOT,resnet32x4,resnet8x4.txt": [75.0],
        "REVIEWKD,wrn_40_2,wrn_16_2.txt": [76.0],
        "FITNET,wrn_40_2,wrn_16_2.txt": [73.0],
        "KD,resnet32x4,ShuffleV1.txt": [74.0],
        "KDSVD,resnet32x4,resnet8x4.txt": [73.0],
        "OFD,resnet110,resnet20.txt": [70.0],
        "KD+DOT,ResNet34,ResNet18.txt": [71.5],
        "KD+DOT,ResNet18,MobileNetV2.txt": [64.5],
    }
    for name, values in files.items():
        (tmp_path / name).write_text("".join(_line(v, s) for s, v in enumerate(values)))
    return tmp_path


def _cell(table, row, teacher, student):
    return table.cells[(row, (teacher, student))]


def test_classic_numbers_are_the_papers():
    # typed here from the CRD paper's table (RepDistiller README) and DKD Tables 6-7, independently of the module
    expected = {
        ("AT", "resnet32x4", "resnet8x4"): 73.44, ("FITNET", "vgg13", "MobileNetV2"): 64.14,
        ("SP", "ResNet50", "vgg8"): 73.34, ("VID", "wrn_40_2", "wrn_40_1"): 73.30,
        ("RKD", "resnet32x4", "ShuffleV2"): 73.21, ("PKT", "resnet110", "resnet20"): 70.25,
        ("NST", "wrn_40_2", "ShuffleV1"): 74.89, ("CRD", "resnet56", "resnet20"): 71.16,
        ("OFD", "resnet32x4", "ShuffleV1"): 75.98, ("REVIEWKD", "ResNet50", "MobileNetV2"): 69.89,
        ("KD", "ResNet50", "vgg8"): 73.81, ("KD", "wrn_40_2", "ShuffleV1"): 74.83,
        ("KD+DOT", "vgg13", "vgg8"): 73.77, ("KD+DOT", "resnet32x4", "ShuffleV2"): 75.55,
        ("KD+DOT", "ResNet50", "MobileNetV1"): 73.09, ("KD+DOT", "ResNet18", "ShuffleV2"): 65.75,
        ("KD", "ResNet18", "MobileNetV2"): 58.35,
    }
    for key, value in expected.items():
        assert pub.published_top1(*key).top1 == value, key
    assert pub.published_top1("OFD", "resnet110", "resnet20") is None  # "–" in the table
    assert pub.published_top1("REVIEWKD", "ResNet50", "vgg8") is None
    assert all(pub.published_top1("KDSVD", t, s) is None for t, s in pub.PAIRS)
    classic = pub._parse_classic_table()
    assert len([k for k in classic if k[0] == "AT"]) == 13 and len([k for k in classic if k[0] == "OFD"]) == 11
    assert {k for k, v in classic.items() if v.note == "†"} == {
        (m, t, s) for m in ("OFD", "REVIEWKD") for t, s in [("wrn_40_2", "wrn_16_2"), ("resnet110", "resnet32"),
                                                          ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
                                                          ("wrn_40_2", "ShuffleV1")]}


def test_kd_of_the_classic_table_agrees_with_the_ls_table_where_both_have_the_pair():
    classic = pub._parse_classic_table()
    shared = [key for key in classic if key[0] == "KD" and key in pub.CIFAR100]
    assert len(shared) == 10
    assert all(classic[key].top1 == pub.CIFAR100[key].top1 for key in shared)
    assert pub.published_top1("KD", "resnet32x4", "resnet8x4").source == pub.CIFAR100[("KD", "resnet32x4",
                                                                                      "resnet8x4")].source
    assert "CRD" in pub.published_top1("KD", "resnet32x4", "ShuffleV1").source


def test_dot_log_name_is_a_method_of_its_own():
    assert parse_log_name("KD+DOT,resnet32x4,resnet8x4.txt") == ("KD+DOT", "resnet32x4", "resnet8x4", None)
    assert parse_log_name("KD+DOT,resnet32x4,resnet8x4,2,9.txt").ls == ("2", "9")


def test_report_shows_classic_and_dot_numbers_with_marks_and_sources(logs):
    table = report(str(logs), published=True)
    at = _cell(table, "AT", "resnet32x4", "resnet8x4")
    assert at.mean == 73.5 and at.published.top1 == 73.44 and at.diff == pytest.approx(0.06)
    dot = _cell(table, "KD+DOT", "resnet32x4", "resnet8x4")
    assert dot.published.top1 == 75.12 and dot.diff == pytest.approx(-0.12)
    assert _cell(table, "KD+DOT", "ResNet34", "ResNet18").published.top1 == 71.72
    assert "Tiny-ImageNet" in _cell(table, "KD+DOT", "ResNet18", "MobileNetV2").published.source
    assert _cell(table, "KD", "resnet32x4", "ShuffleV1").published.top1 == 74.07
    assert _cell(table, "KDSVD", "resnet32x4", "resnet8x4").published is None
    assert _cell(table, "OFD", "resnet110", "resnet20").published is None
    assert table.rows == ["KD", "KD+DOT", "FITNET", "AT", "OFD", "REVIEWKD", "KDSVD"]
    assert table.columns[:3] == [("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet110", "resnet20")]
    assert table.columns.index(("resnet32x4", "ShuffleV1")) < table.columns.index(("ResNet34", "ResNet18"))
    markdown = to_markdown(table)
    assert "76.00 (n=1) · paper 76.12 † (-0.12)" in markdown
    assert "73.50 ± 0.71 (n=2) · paper 73.44 (+0.06)" in markdown
    assert "Tian et al., ICLR 2020 (CRD)" in markdown and "Zhao et al., ICCV 2023 (DOT)" in markdown
    assert "† after a paper number" in markdown


def test_reports_without_published_numbers_are_unchanged(logs):
    markdown = to_markdown(report(str(logs)))
    assert "paper" not in markdown and "†" not in markdown
