"""Small teacher/student pairs for the classic feature distillers' tests (FITNET, VID, OFD, REVIEWKD)."""

from __future__ import annotations

import torch

from mdistiller.distillers import get_distiller_class
from mdistiller.engine.build import build_model
from mdistiller.engine.cfg import default_cfg, merge_opts

# wrn_16_2 (teacher) -> resnet8 (student): both 3 stages at 32, 16, 8 pixels; channels [32, 64, 128] / [16, 32, 64]
TEACHER, STUDENT = "wrn_16_2", "resnet8"
# ReviewKD's lists for that pair, written out from the models' shapes (not computed by the code under test)
PAIR_REVIEWKD_LISTS = ["REVIEWKD.SHAPES", "[1,8,16,32]", "REVIEWKD.OUT_SHAPES", "[1,8,16,32]",
                       "REVIEWKD.IN_CHANNELS", "[16,32,64,64]", "REVIEWKD.OUT_CHANNELS", "[32,64,128,128]"]


def classic_cfg(method: str, student: str = STUDENT, teacher: str = TEACHER, opts: list[str] | None = None,
                dataset: str = "cifar100"):
    """Defaults for `method` on a pair (ReviewKD's lists for the default pair included), with KEY VALUE opts."""
    cfg = default_cfg()
    cfg.DATASET.TYPE = dataset
    cfg.DISTILLER.TYPE, cfg.DISTILLER.STUDENT, cfg.DISTILLER.TEACHER = method, student, teacher
    if method == "REVIEWKD" and (student, teacher) == (STUDENT, TEACHER):
        merge_opts(cfg, PAIR_REVIEWKD_LISTS)
    merge_opts(cfg, list(opts or []))
    return cfg


def build_classic(method: str, student: str = STUDENT, teacher: str = TEACHER, opts: list[str] | None = None,
                  seed: int = 0, dataset: str = "cifar100", num_classes: int = 100):
    """A freshly built distiller with seeded random student and teacher, in train mode."""
    cfg = classic_cfg(method, student, teacher, opts, dataset)
    torch.manual_seed(seed)
    student_model = build_model(student, num_classes, dataset, 32)
    teacher_model = build_model(teacher, num_classes, dataset, 32).eval()
    return get_distiller_class(method)(student_model, teacher_model, cfg).train()


def batch(n: int = 4, seed: int = 1, size: int = 32, classes: int = 100) -> dict:
    """A seeded random batch as the trainer passes it (epoch included)."""
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g), "target": torch.randint(0, classes, (n,), generator=g),
            "epoch": 30}
