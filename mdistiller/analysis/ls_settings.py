"""The authors' logit-standardisation (LS) setting for each pair they ran, as data: `--base-temp τ --kd-weight w`
and any key their run also changed (e.g. `DKD.BETA 2.0`). Read by `tools/sweep.py` (`ls: authors` in a sweep entry)
and by `tools/report.py --published` (the setting beside a paper number); the `# LS:` notes in the config headers
show the same values for people, and tests/test_ls_settings.py fails where a header and this table disagree.

Sources: the logit-standardisation paper's (Sun et al., CVPR 2024) CIFAR-100 logs (KD+LS, CTKD+LS, DKD+LS, MLKD+LS;
"CTKD+LS logs all use (2,9)"), and its ImageNet KD log `r34_r18_kd_ours_2_6.txt`. A pair whose setting the authors
did not log runs at the flags' defaults (τ 2, w 9) and is marked `logged=False`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BASE_TEMP = 2.0  # tools/train.py's --base-temp default
DEFAULT_KD_WEIGHT = 9.0  # tools/train.py's --kd-weight default


@dataclass(frozen=True)
class LSSetting:
    """One pair's LS setting: the flags, the overrides the authors' run also set, and what the papers report."""

    base_temp: float
    kd_weight: float
    opts: tuple[str, ...] = ()  # KEY VALUE overrides beside the flags, e.g. ("DKD.BETA", "2.0")
    dkd_beta: float | None = None  # DKD: the β before LS multiplies it by w (the paper table's third number)
    logged: bool = True  # False: the authors logged no setting; the flags' defaults

    def flags(self) -> list[str]:
        """tools/train.py's LS flags for this setting."""
        return ["--logit-stand", "--base-temp", f"{self.base_temp:g}", "--kd-weight", f"{self.kd_weight:g}"]

    @property
    def published(self) -> tuple | None:
        """(τ, w) or, for DKD, (τ, w, β) as the paper reports it; None where the authors logged none."""
        if not self.logged:
            return None
        numbers = (self.base_temp, self.kd_weight) + (() if self.dkd_beta is None else (self.dkd_beta,))
        return tuple(int(v) if float(v).is_integer() else v for v in numbers)


def _logged(tau: float, w: float) -> LSSetting:
    return LSSetting(tau, w)


_NOT_LOGGED = LSSetting(DEFAULT_BASE_TEMP, DEFAULT_KD_WEIGHT, logged=False)


def _dkd(tau: float, w: float, beta: float, config_beta: bool) -> LSSetting:
    """DKD+LS at (τ, w, β); config_beta: β is the config's own DKD.BETA, else the run overrides it."""
    return LSSetting(tau, w, () if config_beta else ("DKD.BETA", f"{beta:.1f}"), beta)


# (teacher, student) of the logit-standardisation paper's CIFAR-100 table, in its order
LS_PAIRS = (
    ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_40_1"), ("wrn_40_2", "wrn_16_2"),
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet110", "resnet20"), ("resnet32x4", "ShuffleV2"),
    ("resnet32x4", "wrn_16_2"), ("resnet32x4", "wrn_40_2"), ("wrn_40_2", "resnet8x4"), ("wrn_40_2", "MobileNetV2"),
    ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
)

# method -> one setting per pair of LS_PAIRS, in that order
_CIFAR100_BY_METHOD: dict[str, tuple[LSSetting, ...]] = {
    "KD": (_logged(2, 9), _logged(3, 9), _logged(2, 9), _logged(2, 9), _logged(2, 9), _logged(2, 9),
           _logged(4, 12), _logged(2, 9), _logged(3, 9), _logged(3, 9), _logged(2, 9), _logged(3, 9), _logged(3, 9),
           _logged(3, 1)),
    "CTKD": (_logged(2, 9),) * len(LS_PAIRS),
    "DKD": (_dkd(2, 9, 8, True), _dkd(2, 15, 2, False), _dkd(2, 12, 2, False), _dkd(2, 12, 2, False),
            _dkd(3, 18, 2, True), _dkd(2, 15, 2, True), _dkd(2, 15, 2, True), _dkd(2, 9, 8, True),
            _dkd(2, 9, 2, True), _dkd(2, 9, 8, True), _dkd(2, 18, 2, True), _dkd(2, 15, 2, True),
            _dkd(3, 9, 2, False), _dkd(2, 15, 2, False)),
    "MLKD": (_logged(2, 9), _logged(2, 6), _NOT_LOGGED, _NOT_LOGGED, _NOT_LOGGED, _NOT_LOGGED, _NOT_LOGGED,
             _logged(2, 6), _NOT_LOGGED, _NOT_LOGGED, _NOT_LOGGED, _NOT_LOGGED, _logged(2, 6), _NOT_LOGGED),
}

# (DATASET.TYPE, DISTILLER.TYPE, teacher, student) -> the authors' setting
LS_SETTINGS: dict[tuple[str, str, str, str], LSSetting] = {
    **{("cifar100", method, teacher, student): setting
       for method, settings in _CIFAR100_BY_METHOD.items() for (teacher, student), setting in zip(LS_PAIRS, settings)},
    ("imagenet", "KD", "ResNet34", "ResNet18"): _logged(2, 6),
}


def ls_setting(dataset: str, method: str, teacher: str, student: str) -> LSSetting | None:
    """The authors' LS setting for a run (DATASET.TYPE, DISTILLER.TYPE, teacher, student), None if they ran none."""
    return LS_SETTINGS.get((dataset, method, teacher, student))
