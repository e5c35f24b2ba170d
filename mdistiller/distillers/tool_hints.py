"""The command line a one-line refusal tells the user to run, for the tools that derive a file from a teacher
(tools/wkd_cost_matrix.py, tools/kdpp_centers.py)."""

from __future__ import annotations

from ..files import DEFAULT_DATA_ROOT


def teacher_tool_command(script: str, cfg, out: str) -> str:
    """`python tools/<script> -o out` with the config's data set, teacher (and its checkpoint, data root if set)."""
    parts = [f"python tools/{script}", "-o", out, "DATASET.TYPE", cfg.DATASET.TYPE,
             "DISTILLER.TEACHER", cfg.DISTILLER.TEACHER]
    if cfg.DISTILLER.TEACHER_CKPT:
        parts += ["DISTILLER.TEACHER_CKPT", cfg.DISTILLER.TEACHER_CKPT]
    if cfg.DATASET.ROOT != DEFAULT_DATA_ROOT:
        parts += ["DATASET.ROOT", cfg.DATASET.ROOT]
    return " ".join(str(p) for p in parts)
