"""The authors' LS settings (mdistiller/analysis/ls_settings.py): every config header's `# LS:` note agrees with the
table, the table covers exactly the configs whose note names a setting, and the published table reads it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mdistiller.analysis.ls_settings import LS_PAIRS, LS_SETTINGS, LSSetting, ls_setting
from mdistiller.analysis.published import CIFAR100
from mdistiller.cli.sweep_plan import build_recipe

from conftest import REPO

_NUMBERS = re.compile(r"--logit-stand\s+--base-temp\s+([0-9.]+)\s+--kd-weight\s+([0-9.]+)")
_COMMAND = re.compile(r"python tools/train\.py --cfg \S+ --logit-stand --base-temp \S+ --kd-weight \S+(.*)")


def _ls_note(path: Path) -> str | None:
    """The header's `# LS:` note and the comment lines after it, one a line (None: no note)."""
    header = path.read_text().split("\nEXPERIMENT:", 1)[0].splitlines()
    start = next((i for i, line in enumerate(header) if line.startswith("# LS:")), None)
    if start is None:
        return None
    return "\n".join(line.lstrip("#").strip() for line in header[start:])


def _configs_with_notes() -> list[Path]:
    return sorted(p for p in (REPO / "configs").rglob("*.yaml") if _ls_note(p) is not None)


CONFIGS = _configs_with_notes()


def test_notes_are_found():
    assert len(CONFIGS) >= 4 * 14 + 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_a_header_ls_note_agrees_with_the_data(path: Path):
    note = _ls_note(path)
    cfg = build_recipe(str(path), [], [])
    setting = ls_setting(cfg.DATASET.TYPE, cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
    numbers = set(_NUMBERS.findall(" ".join(note.split("\n"))))
    match = _NUMBERS.search(" ".join(note.split("\n")))
    if match is None:  # a note that names no numbers (τ, w placeholders): no setting in the data either
        assert setting is None, f"{path}: the data has {setting}, the header names none"
        return
    assert setting is not None, f"{path}: the header names {match.group(0)!r}, the data has no setting"
    assert (setting.base_temp, setting.kd_weight) == (float(match.group(1)), float(match.group(2))), path
    assert len(numbers) == 1, f"{path}: the note names several settings {numbers}"
    # the full command, where the setting also changes a key (one comment line)
    command = next((m for m in map(_COMMAND.search, note.split("\n")) if m), None)
    assert list(setting.opts) == (shlex.split(command.group(1)) if command else []), path
    assert ("not recorded" in note) == (not setting.logged), path
    if setting.dkd_beta is not None:  # the β the paper reports: the config's own unless the setting overrides it
        beta = float(setting.opts[1]) if setting.opts else cfg.DKD.BETA
        assert beta == setting.dkd_beta, path


def test_every_setting_has_a_config_showing_it():
    shown = set()
    for path in CONFIGS:
        cfg = build_recipe(str(path), [], [])
        shown.add((cfg.DATASET.TYPE, cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT))
    assert set(LS_SETTINGS) <= shown


def test_the_published_table_reads_the_settings():
    assert len(LS_PAIRS) == 14 and {(t, s) for _, t, s in CIFAR100} == set(LS_PAIRS)
    assert CIFAR100[("KD+LS", "resnet32x4", "resnet8x4")].setting == (2, 9)
    assert CIFAR100[("DKD+LS", "vgg13", "vgg8")].setting == (2, 15, 2)
    assert CIFAR100[("DKD+LS", "resnet32x4", "resnet8x4")].setting == (2, 9, 8)
    assert CIFAR100[("CTKD+LS", "vgg13", "vgg8")].setting == (2, 9)
    assert CIFAR100[("MLKD+LS", "wrn_40_2", "wrn_40_1")].setting is None  # not logged
    assert CIFAR100[("KD", "vgg13", "vgg8")].setting is None
    for method in ("KD", "CTKD", "DKD", "MLKD"):
        for teacher, student in LS_PAIRS:
            setting = LS_SETTINGS[("cifar100", method, teacher, student)]
            assert CIFAR100[(f"{method}+LS", teacher, student)].setting == setting.published


def test_a_setting_gives_flags_and_its_published_tuple():
    setting = LSSetting(3, 18, ("DKD.BETA", "2.0"), 2)
    assert setting.flags() == ["--logit-stand", "--base-temp", "3", "--kd-weight", "18"]
    assert setting.published == (3, 18, 2)
    assert LSSetting(2, 9, logged=False).published is None
    assert ls_setting("cifar100", "KD", "resnet8", "resnet8") is None
