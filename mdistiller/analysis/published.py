"""Published numbers for `tools/report.py --published`: top-1 keyed by (method, teacher, student), and box AP.

Sources:
- the logit-standardisation paper's (Sun et al., CVPR 2024) CIFAR-100 seed table, which also lists KD, CTKD, DKD and
  MLKD without LS, and the published `cifar_teachers.tar` teachers. Best-epoch top-1, mean of 4-5 runs. `setting`
  is the authors' logged (--base-temp τ, --kd-weight w[, DKD β]) for the LS columns (from ls_settings.py), None
  where they logged none;
- the classic methods on CIFAR-100 (upstream mdistiller's README publishes none): FitNet, AT, SP, VID, RKD, PKT,
  NST, CRD and KD from the CRD paper (Tian et al., ICLR 2020; its code base's README table), OFD and ReviewKD from
  the DKD paper (Zhao et al., CVPR 2022, Tables 6-7). Methods are named by DISTILLER.TYPE (FITNET, REVIEWKD). KD
  numbers of pairs the LS table also has are the LS table's (the two agree on every shared pair). KDSVD has none;
- KD+DOT (Zhao et al., ICCV 2023; upstream's README): CIFAR-100, ImageNet and Tiny-ImageNet, with Tiny-ImageNet's KD.
  Result logs of DOT runs are named `KD+DOT,<teacher>,<student>.txt` (DISTILLER.TYPE + "+DOT" under SOLVER.TRAINER
  dot / crd_dot). The log names carry no data set: the ImageNet and Tiny-ImageNet pairs are ones no CIFAR table has;
- the recent logit methods (spec recent.md): DIST from hunto/DIST_KD's README (CIFAR-100 mean of the authors' runs,
  ImageNet) and, for the pairs outside the DIST paper, the TTM paper's own DIST runs (zkxufo/TTM README); TTM and
  WTTM from zkxufo/TTM's README (CIFAR-100 mean of 5 runs; WTTM also ImageNet); NKD from yzd-v/cls_KD's nkd.md
  (ImageNet only: the authors publish no CIFAR-100 number). RLD's numbers are owed (its paper's tables, not read).
- the recent methods (spec recent.md): SD-KD / SD-DKD / SD-NKD (the SDD README's CIFAR-100 and ImageNet tables),
  KD++ / DKD++ (the ND repo's README tables 1.1 / 1.2), USKD (cls_KD's nkd.md, ImageNet, no teacher: logged as
  `USKD,none,<student>.txt`; ResNet18 / ResNet50 only in their config headers, as their log names are those of CIFAR
  runs). CAT-KD's numbers are owed (its paper's tables were not read), as are USKD's on CIFAR.

Detection (box AP / AP50 / AP75 on MS-COCO, `published_ap`) is a table of its own at the end: the DKD paper's
Faster R-CNN-FPN table as recalled in the spec (detection.md section 4), unconfirmed.
"""

from __future__ import annotations

from typing import NamedTuple

from .ls_settings import ls_setting


class Published(NamedTuple):
    """One published number and the LS setting (τ, w[, β]) it was obtained with (None: not logged / no LS)."""

    top1: float
    setting: tuple | None = None
    source: str = "Sun et al., CVPR 2024 (logit standardisation), CIFAR-100"
    note: str = ""  # a caveat shown beside the number (e.g. "†": not cross-checked against a second copy)

    @property
    def value(self) -> float:
        """The number a table cell is compared with: top-1."""
        return self.top1


TEACHERS: dict[str, float] = {  # cifar_teachers.tar
    "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61, "vgg13": 74.64, "ResNet50": 79.34,
}

_LS_COLUMNS = ("KD", "KD+LS", "CTKD", "CTKD+LS", "DKD", "DKD+LS", "MLKD", "MLKD+LS")
# teacher student | KD | KD+LS | CTKD | CTKD+LS | DKD | DKD+LS | MLKD | MLKD+LS  (the LS columns' settings: ls_settings)
_LS_TABLE = """
resnet32x4 resnet8x4   | 73.33 | 76.62 | 73.39 | 76.67 | 76.32 | 77.01 | 77.08 | 78.28
vgg13 vgg8             | 72.98 | 74.36 | 73.52 | 74.47 | 74.68 | 74.81 | 75.18 | 75.22
wrn_40_2 wrn_40_1      | 73.54 | 74.37 | 73.93 | 74.58 | 74.81 | 74.89 | 75.35 | 75.56
wrn_40_2 wrn_16_2      | 74.92 | 76.11 | 75.45 | 76.08 | 76.24 | 76.39 | 76.63 | 76.95
resnet56 resnet20      | 70.66 | 71.43 | 71.19 | 71.34 | 71.97 | 72.32 | 72.19 | 72.33
resnet110 resnet32     | 73.08 | 74.17 | 73.52 | 74.01 | 74.11 | 74.29 | 74.11 | 74.32
resnet110 resnet20     | 70.67 | 71.48 | 70.99 | 71.39 | 71.06 | 71.85 | 71.89 | 72.27
resnet32x4 ShuffleV2   | 74.45 | 75.56 | 75.37 | 76.18 | 77.07 | 77.37 | 78.44 | 78.76
resnet32x4 wrn_16_2    | 74.90 | 75.26 | 74.57 | 75.16 | 75.70 | 76.19 | 76.52 | 77.53
resnet32x4 wrn_40_2    | 77.70 | 77.92 | 77.66 | 77.99 | 78.46 | 78.95 | 79.26 | 79.66
wrn_40_2 resnet8x4     | 73.97 | 77.11 | 74.61 | 77.03 | 75.56 | 76.75 | 77.33 | 77.68
wrn_40_2 MobileNetV2   | 68.36 | 69.23 | 68.34 | 69.53 | 69.28 | 70.01 | 70.78 | 71.61
vgg13 MobileNetV2      | 67.37 | 68.61 | 68.50 | 68.98 | 69.71 | 69.98 | 70.57 | 70.94
ResNet50 MobileNetV2   | 67.35 | 69.02 | 68.67 | 69.36 | 70.35 | 70.45 | 71.04 | 71.19
"""


def _parse_table() -> dict[tuple[str, str, str], Published]:
    table = {}
    for row in _LS_TABLE.strip().splitlines():
        pair, *cells = row.split("|")
        teacher, student = pair.split()
        for method, cell in zip(_LS_COLUMNS, cells):
            base, _, ls = method.partition("+")
            setting = ls_setting("cifar100", base, teacher, student) if ls else None
            table[(method, teacher, student)] = Published(float(cell), None if setting is None else setting.published)
    return table


CRD_SOURCE = "Tian et al., ICLR 2020 (CRD), CIFAR-100"
DKD_SOURCE = "Zhao et al., CVPR 2022 (DKD) Tables 6-7, CIFAR-100"
NOT_CROSS_CHECKED = "†"
_CLASSIC_COLUMNS = ("FITNET", "AT", "SP", "VID", "RKD", "PKT", "NST", "CRD", "OFD", "REVIEWKD", "KD")
_CLASSIC_SOURCES = {"OFD": DKD_SOURCE, "REVIEWKD": DKD_SOURCE}  # every other column: CRD_SOURCE
# teacher student | FitNet | AT | SP | VID | RKD | PKT | NST | CRD | OFD | ReviewKD | KD  ("-": not published;
# "†": a DKD-paper value not cross-checked against a second copy of the table)
_CLASSIC_TABLE = """
wrn_40_2 wrn_16_2      | 73.58 | 74.08 | 73.83 | 74.11 | 73.35 | 74.54 | 73.68 | 75.48 | 75.24 † | 76.12 † | 74.92
wrn_40_2 wrn_40_1      | 72.24 | 72.77 | 72.43 | 73.30 | 72.22 | 73.45 | 72.24 | 74.14 | 74.33   | 75.09   | 73.54
resnet56 resnet20      | 69.21 | 70.55 | 69.67 | 70.38 | 69.61 | 70.34 | 69.60 | 71.16 | 70.98   | 71.89   | 70.66
resnet110 resnet20     | 68.99 | 70.22 | 70.04 | 70.16 | 69.25 | 70.25 | 69.53 | 71.46 | -       | -       | 70.67
resnet110 resnet32     | 71.06 | 72.31 | 72.69 | 72.61 | 71.82 | 72.61 | 71.96 | 73.48 | 73.23 † | 73.89 † | 73.08
resnet32x4 resnet8x4   | 73.50 | 73.44 | 72.94 | 73.09 | 71.90 | 73.64 | 73.30 | 75.51 | 74.95   | 75.63   | 73.33
vgg13 vgg8             | 71.02 | 71.43 | 72.68 | 71.23 | 71.48 | 72.88 | 71.53 | 73.94 | 73.95 † | 74.84 † | 72.98
vgg13 MobileNetV2      | 64.14 | 59.40 | 66.30 | 65.56 | 64.52 | 67.13 | 58.16 | 69.73 | 69.48 † | 70.37 † | 67.37
ResNet50 MobileNetV2   | 63.16 | 58.58 | 68.08 | 67.57 | 64.43 | 66.52 | 64.96 | 69.11 | 69.04   | 69.89   | 67.35
ResNet50 vgg8          | 70.69 | 71.84 | 73.34 | 70.30 | 71.50 | 73.01 | 71.28 | 74.30 | -       | -       | 73.81
resnet32x4 ShuffleV1   | 73.59 | 71.73 | 73.48 | 73.38 | 72.28 | 74.10 | 74.12 | 75.11 | 75.98   | 77.45   | 74.07
resnet32x4 ShuffleV2   | 73.54 | 72.73 | 74.56 | 73.40 | 73.21 | 74.69 | 74.68 | 75.65 | 76.82   | 77.78   | 74.45
wrn_40_2 ShuffleV1     | 73.73 | 73.32 | 74.52 | 73.61 | 72.21 | 73.89 | 74.89 | 76.05 | 75.85 † | 77.14 † | 74.83
"""

DOT_SOURCE = "Zhao et al., ICCV 2023 (DOT), upstream mdistiller README"
# (method, teacher, student): (top-1, data set)
_DOT_NUMBERS = {
    ("KD+DOT", "resnet32x4", "resnet8x4"): (75.12, "CIFAR-100"),
    ("KD+DOT", "vgg13", "vgg8"): (73.77, "CIFAR-100"),
    ("KD+DOT", "resnet32x4", "ShuffleV2"): (75.55, "CIFAR-100"),
    ("KD+DOT", "ResNet34", "ResNet18"): (71.72, "ImageNet"),
    ("KD+DOT", "ResNet50", "MobileNetV1"): (73.09, "ImageNet"),
    ("KD+DOT", "ResNet18", "MobileNetV2"): (64.01, "Tiny-ImageNet"),
    ("KD+DOT", "ResNet18", "ShuffleV2"): (65.75, "Tiny-ImageNet"),
    ("KD", "ResNet18", "MobileNetV2"): (58.35, "Tiny-ImageNet"),
    ("KD", "ResNet18", "ShuffleV2"): (62.26, "Tiny-ImageNet"),
}


DIST_SOURCE = "Huang et al., NeurIPS 2022 (DIST), hunto/DIST_KD README"
TTM_SOURCE = "Zheng & Yang, ICLR 2024 (TTM / WTTM), zkxufo/TTM README"
NKD_SOURCE = "Yang et al., ICCV 2023 (NKD), yzd-v/cls_KD nkd.md"
# (method, teacher, student): (top-1, source, data set)
_RECENT_NUMBERS = {
    ("DIST", "wrn_40_2", "wrn_40_1"): (74.43, DIST_SOURCE, "CIFAR-100"),
    ("DIST", "resnet56", "resnet20"): (71.75, DIST_SOURCE, "CIFAR-100"),
    ("DIST", "resnet32x4", "resnet8x4"): (76.31, DIST_SOURCE, "CIFAR-100"),
    ("DIST", "ResNet50", "MobileNetV2"): (68.66, DIST_SOURCE, "CIFAR-100"),
    ("DIST", "resnet32x4", "ShuffleV1"): (76.34, DIST_SOURCE, "CIFAR-100"),
    ("DIST", "resnet32x4", "ShuffleV2"): (77.35, DIST_SOURCE, "CIFAR-100"),
    ("DIST", "ResNet34", "ResNet18"): (72.07, DIST_SOURCE, "ImageNet"),
    ("DIST", "ResNet50", "MobileNetV1"): (73.24, DIST_SOURCE, "ImageNet"),
    ("WTTM", "ResNet34", "ResNet18"): (72.19, TTM_SOURCE, "ImageNet"),
    ("WTTM", "ResNet50", "MobileNetV1"): (73.09, TTM_SOURCE, "ImageNet"),
    ("NKD", "ResNet34", "ResNet18"): (71.96, NKD_SOURCE, "ImageNet"),
    ("NKD", "ResNet50", "MobileNetV1"): (72.58, NKD_SOURCE, "ImageNet"),
}
_DIST_BY_TTM_SOURCE = f"{TTM_SOURCE} (the TTM paper's own DIST run), CIFAR-100"
# teacher student | TTM | WTTM | DIST (the TTM paper's run; "-": the DIST paper's own number above)
_TTM_TABLE = """
wrn_40_2 wrn_16_2      | 76.23 | 76.37 | 75.51
wrn_40_2 wrn_40_1      | 74.32 | 74.58 | -
resnet56 resnet20      | 71.83 | 71.92 | -
resnet110 resnet20     | 71.46 | 71.67 | 71.65
resnet110 resnet32     | 73.97 | 74.13 | 73.69
resnet32x4 resnet8x4   | 76.17 | 76.06 | -
vgg13 vgg8             | 74.33 | 74.44 | 73.89
vgg13 MobileNetV2      | 68.98 | 69.16 | 68.50
ResNet50 MobileNetV2   | 69.24 | 69.59 | -
ResNet50 vgg8          | 74.87 | 74.82 | 74.11
resnet32x4 ShuffleV1   | 74.18 | 74.37 | -
resnet32x4 ShuffleV2   | 76.57 | 76.55 | -
wrn_40_2 ShuffleV1     | 75.39 | 75.42 | 76.40
"""


def _parse_recent() -> dict[tuple[str, str, str], Published]:
    table = {key: Published(top1, None, f"{source}, {dataset}") for key, (top1, source, dataset) in
             _RECENT_NUMBERS.items()}
    for row in _TTM_TABLE.strip().splitlines():
        pair, *cells = row.split("|")
        teacher, student = pair.split()
        for method, cell, source in zip(("TTM", "WTTM", "DIST"), cells,
                                        (f"{TTM_SOURCE}, CIFAR-100",) * 2 + (_DIST_BY_TTM_SOURCE,)):
            if cell.strip() != "-":
                table[(method, teacher, student)] = Published(float(cell), None, source)
    return table


SDD_SOURCE = "Wei et al., CVPR 2024 (SDD), the authors' README"
KDPP_SOURCE = "Wang et al., arXiv 2305.17007 (KD++ / DKD++), the authors' README"
USKD_SOURCE = "Yang et al., ICCV 2023 (USKD), cls_KD nkd.md, no teacher"
# (method, teacher, student): (top-1, source, data set)
_RECENT_FEATURE_NUMBERS = {
    **{(method, teacher, student): (top1, SDD_SOURCE, "CIFAR-100")
       for (teacher, student), values in {
           ("resnet32x4", "ShuffleV1"): (76.30, 77.30, 76.34), ("wrn_40_2", "ShuffleV1"): (76.65, 77.21, 76.81),
           ("ResNet50", "MobileNetV2"): (69.55, 71.36, 70.25), ("vgg13", "MobileNetV2"): (68.79, 70.25, 69.50),
           ("resnet32x4", "ShuffleV2"): (76.67, 78.05, 77.07), ("ResNet50", "vgg8"): (74.89, 75.86, 74.62)}.items()
       for method, top1 in zip(("SDD_KD", "SDD_DKD", "SDD_NKD"), values)},
    ("SDD_KD", "ResNet50", "MobileNetV1"): (72.24, SDD_SOURCE, "ImageNet"),
    ("SDD_DKD", "ResNet50", "MobileNetV1"): (73.08, SDD_SOURCE, "ImageNet"),
    ("SDD_NKD", "ResNet50", "MobileNetV1"): (73.12, SDD_SOURCE, "ImageNet"),
    **{(method, teacher, student): (top1, KDPP_SOURCE, "CIFAR-100")
       for (teacher, student), values in {
           ("resnet56", "resnet20"): (72.53, 72.16), ("wrn_40_2", "wrn_40_1"): (74.59, 75.02),
           ("resnet32x4", "resnet8x4"): (75.54, 76.28), ("ResNet50", "MobileNetV2"): (70.10, 70.82),
           ("resnet32x4", "ShuffleV1"): (75.45, 77.11), ("resnet32x4", "ShuffleV2"): (76.42, 77.49)}.items()
       for method, top1 in zip(("KDPP", "DKDPP"), values)},
    ("KDPP", "ResNet34", "ResNet18"): (71.98, KDPP_SOURCE, "ImageNet"),
    ("KDPP", "ResNet50", "MobileNetV1"): (72.77, KDPP_SOURCE, "ImageNet"),
    ("DKDPP", "ResNet34", "ResNet18"): (72.07, KDPP_SOURCE, "ImageNet"),
    ("DKDPP", "ResNet50", "MobileNetV1"): (72.63, KDPP_SOURCE, "ImageNet"),
    # USKD's ImageNet ResNet18 (70.79) and ResNet50 (77.07) are left out: their log names (`USKD,none,ResNet18.txt`)
    # are those of CIFAR runs of the zoo models of the same names
    **{("USKD", "none", student): (top1, USKD_SOURCE, "ImageNet")
       for student, top1 in (("ResNet101", 78.54), ("MobileNetV1", 70.38))},
}


def _parse_classic_table() -> dict[tuple[str, str, str], Published]:
    table = {}
    for row in _CLASSIC_TABLE.strip().splitlines():
        pair, *cells = row.split("|")
        teacher, student = pair.split()
        if len(cells) != len(_CLASSIC_COLUMNS):
            raise ValueError(f"classic table row {pair.strip()!r} has {len(cells)} cells")
        for method, cell in zip(_CLASSIC_COLUMNS, cells):
            value, _, mark = cell.strip().partition(" ")
            if value == "-":
                continue
            table[(method, teacher, student)] = Published(
                float(value), None, _CLASSIC_SOURCES.get(method, CRD_SOURCE), mark.strip())
    return table


def _all_numbers() -> dict[tuple[str, str, str], Published]:
    numbers = _parse_classic_table()
    numbers.update(_parse_table())  # KD of the pairs both tables hold: the LS table's (the same values)
    for key, (top1, dataset) in _DOT_NUMBERS.items():
        numbers[key] = Published(top1, None, f"{DOT_SOURCE}, {dataset}")
    numbers.update(_parse_recent())
    for key, (top1, source, dataset) in _RECENT_FEATURE_NUMBERS.items():
        numbers[key] = Published(top1, None, f"{source}, {dataset}")
    return numbers


def _pairs_in_order() -> list[tuple[str, str]]:
    pairs = [tuple(row.split("|")[0].split()) for row in _LS_TABLE.strip().splitlines()]
    classic = [tuple(row.split("|")[0].split()) for row in _CLASSIC_TABLE.strip().splitlines()]
    dot = [(teacher, student) for _, teacher, student in _DOT_NUMBERS]
    recent = [(teacher, student) for _, teacher, student in [*_parse_recent(), *_RECENT_FEATURE_NUMBERS]]
    for pair in classic + dot + recent:
        if pair not in pairs:
            pairs.append(pair)
    return pairs


PAIRS: list[tuple[str, str]] = _pairs_in_order()
CIFAR100: dict[tuple[str, str, str], Published] = _parse_table()  # the LS table alone
PUBLISHED: dict[tuple[str, str, str], Published] = _all_numbers()


def published_top1(method: str, teacher: str, student: str) -> Published | None:
    """The published number for a table row (`KD`, `KD+LS`, `DKD`, `AT`, `KD+DOT`, ..., or `teacher`) and a pair,
    if there is one."""
    if method == "teacher":
        return Published(TEACHERS[teacher], None, "cifar_teachers.tar") if teacher in TEACHERS else None
    return PUBLISHED.get((method, teacher, student))


# ---- detection: a separate table, never mixed with the top-1 numbers above ----

COCO_SOURCE = ("Zhao et al., CVPR 2022 (DKD), MS-COCO val2017, Faster R-CNN-FPN: as recalled in the spec, "
               "unconfirmed (check arXiv 2203.08679 before quoting)")
COCO_AP75_TYPO = "*"  # printed AP75 below the printed AP: a typo the DKD paper carried from the ReviewKD paper


class PublishedAP(NamedTuple):
    """One published detection result (box AP, AP50, AP75, %) and a mark on a doubtful value (`ap75_note`)."""

    ap: float
    ap50: float
    ap75: float
    source: str = COCO_SOURCE
    ap75_note: str = ""

    @property
    def value(self) -> float:
        """The number a table cell is compared with: box AP."""
        return self.ap


# The model names are DISTILLER.TEACHER / STUDENT; the rows are the report's detection labels (analysis/report.py).
COCO_PAIRS: list[tuple[str, str]] = [("R101-FPN", "R18-FPN"), ("R101-FPN", "R50-FPN"), ("R50-FPN", "MV2-FPN")]
# row | AP / AP50 / AP75 of each pair in COCO_PAIRS' order (spec detection.md section 4)
_COCO_TABLE = """
teacher      | 42.04 / 62.48 / 45.88 | 42.04 / 62.48 / 45.88 | 40.22 / 61.02 / 43.81
student      | 33.26 / 53.61 / 35.26 | 37.93 / 58.84 / 41.05 | 29.47 / 48.87 / 30.90
KD           | 33.97 / 54.66 / 36.62 | 38.35 / 59.41 / 41.71 | 30.13 / 50.28 / 31.35
FitNet       | 34.13 / 54.16 / 36.71 | 38.76 / 59.62 / 41.80 | 30.20 / 49.80 / 31.69
FGFI         | 35.44 / 55.51 / 38.17 | 39.44 / 60.27 / 43.04 | 31.16 / 50.68 / 32.92
ReviewKD     | 36.75 / 56.72 / 34.00* | 40.36 / 60.97 / 44.08 | 33.71 / 53.15 / 36.13
DKD          | 35.05 / 56.60 / 37.54 | 39.25 / 60.90 / 42.73 | 32.34 / 53.77 / 34.01
DKD+ReviewKD | 37.01 / 57.53 / 39.85 | 40.65 / 61.51 / 44.44 | 34.35 / 54.89 / 36.61
"""


def _parse_coco_table() -> dict[tuple[str, str, str], PublishedAP]:
    table = {}
    for line in _COCO_TABLE.strip().splitlines():
        row, *cells = (part.strip() for part in line.split("|"))
        if len(cells) != len(COCO_PAIRS):
            raise ValueError(f"COCO table row {row!r} has {len(cells)} cells")
        for (teacher, student), cell in zip(COCO_PAIRS, cells):
            ap, ap50, ap75 = (part.strip() for part in cell.split("/"))
            note = COCO_AP75_TYPO if ap75.endswith(COCO_AP75_TYPO) else ""
            table[(row, teacher, student)] = PublishedAP(float(ap), float(ap50), float(ap75.rstrip(COCO_AP75_TYPO)),
                                                         ap75_note=note)
    return table


COCO_DETECTION: dict[tuple[str, str, str], PublishedAP] = _parse_coco_table()


def published_ap(row: str, teacher: str, student: str) -> PublishedAP | None:
    """The published COCO numbers of a detection table row (`student`, `DKD`, `ReviewKD`, `DKD+ReviewKD`, ...) and
    teacher → student pair, if there are any."""
    return COCO_DETECTION.get((row, teacher, student))
