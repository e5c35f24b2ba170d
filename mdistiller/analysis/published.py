"""Published CIFAR-100 top-1 numbers, for `tools/report.py --published`.

Sources: the logit-standardisation paper's (Sun et al., CVPR 2024) seed table, which also lists KD, CTKD, DKD and MLKD
without LS, and the published `cifar_teachers.tar` teachers. Best-epoch top-1, mean of 4-5 runs. `setting` is the
authors' logged (--base-temp τ, --kd-weight w[, DKD β]) for the LS columns, None where they logged none.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    """One published number and the LS setting (τ, w[, β]) it was obtained with (None: not logged / no LS)."""

    top1: float
    setting: tuple | None = None
    source: str = "Sun et al., CVPR 2024 (logit standardisation), CIFAR-100"


TEACHERS: dict[str, float] = {  # cifar_teachers.tar
    "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61, "vgg13": 74.64, "ResNet50": 79.34,
}

_LS_COLUMNS = ("KD", "KD+LS", "CTKD", "CTKD+LS", "DKD", "DKD+LS", "MLKD", "MLKD+LS")
# teacher student | KD | KD+LS (τ,w) | CTKD | CTKD+LS | DKD | DKD+LS (τ,w,β) | MLKD | MLKD+LS (τ,w)
_LS_TABLE = """
resnet32x4 resnet8x4   | 73.33 | 76.62 (2,9) | 73.39 | 76.67 | 76.32 | 77.01 (2,9,8)  | 77.08 | 78.28 (2,9)
vgg13 vgg8             | 72.98 | 74.36 (3,9) | 73.52 | 74.47 | 74.68 | 74.81 (2,15,2) | 75.18 | 75.22 (2,6)
wrn_40_2 wrn_40_1      | 73.54 | 74.37 (2,9) | 73.93 | 74.58 | 74.81 | 74.89 (2,12,2) | 75.35 | 75.56
wrn_40_2 wrn_16_2      | 74.92 | 76.11 (2,9) | 75.45 | 76.08 | 76.24 | 76.39 (2,12,2) | 76.63 | 76.95
resnet56 resnet20      | 70.66 | 71.43 (2,9) | 71.19 | 71.34 | 71.97 | 72.32 (3,18,2) | 72.19 | 72.33
resnet110 resnet32     | 73.08 | 74.17 (2,9) | 73.52 | 74.01 | 74.11 | 74.29 (2,15,2) | 74.11 | 74.32
resnet110 resnet20     | 70.67 | 71.48 (4,12) | 70.99 | 71.39 | 71.06 | 71.85 (2,15,2) | 71.89 | 72.27
resnet32x4 ShuffleV2   | 74.45 | 75.56 (2,9) | 75.37 | 76.18 | 77.07 | 77.37 (2,9,8)  | 78.44 | 78.76 (2,6)
resnet32x4 wrn_16_2    | 74.90 | 75.26 (3,9) | 74.57 | 75.16 | 75.70 | 76.19 (2,9,2)  | 76.52 | 77.53
resnet32x4 wrn_40_2    | 77.70 | 77.92 (3,9) | 77.66 | 77.99 | 78.46 | 78.95 (2,9,8)  | 79.26 | 79.66
wrn_40_2 resnet8x4     | 73.97 | 77.11 (2,9) | 74.61 | 77.03 | 75.56 | 76.75 (2,18,2) | 77.33 | 77.68
wrn_40_2 MobileNetV2   | 68.36 | 69.23 (3,9) | 68.34 | 69.53 | 69.28 | 70.01 (2,15,2) | 70.78 | 71.61
vgg13 MobileNetV2      | 67.37 | 68.61 (3,9) | 68.50 | 68.98 | 69.71 | 69.98 (3,9,2)  | 70.57 | 70.94 (2,6)
ResNet50 MobileNetV2   | 67.35 | 69.02 (3,1) | 68.67 | 69.36 | 70.35 | 70.45 (2,15,2) | 71.04 | 71.19
"""
_CTKD_LS_SETTING = (2, 9)  # "CTKD+LS logs all use (2,9)"


def _parse_cell(text: str) -> Published:
    value, _, setting = text.strip().partition(" ")
    numbers = tuple(int(v) for v in setting.strip("() ").split(",")) if setting else None
    return Published(float(value), numbers)


def _parse_table() -> dict[tuple[str, str, str], Published]:
    table = {}
    for row in _LS_TABLE.strip().splitlines():
        pair, *cells = row.split("|")
        teacher, student = pair.split()
        for method, cell in zip(_LS_COLUMNS, cells):
            entry = _parse_cell(cell)
            if method == "CTKD+LS":
                entry = entry._replace(setting=_CTKD_LS_SETTING)
            table[(method, teacher, student)] = entry
    return table


PAIRS: list[tuple[str, str]] = [tuple(row.split("|")[0].split()) for row in _LS_TABLE.strip().splitlines()]
CIFAR100: dict[tuple[str, str, str], Published] = _parse_table()


def published_top1(method: str, teacher: str, student: str) -> Published | None:
    """The published number for a table row (`KD`, `KD+LS`, `DKD`, ..., or `teacher`) and a pair, if there is one."""
    if method == "teacher":
        return Published(TEACHERS[teacher], None, "cifar_teachers.tar") if teacher in TEACHERS else None
    return CIFAR100.get((method, teacher, student))
