"""A sweep file (YAML), read and checked against its declared schema: the `Sweep` and `Entry` dataclasses below. Each
field's metadata names its kind; `validate_sweep` is the one function that turns the YAML's mapping into a `Sweep`
(unknown keys refused with a did-you-mean, as the training config does), so a key is added by adding a field.

    name: ls_table_cifar100            # default: the file's name
    seeds: [0, 1, 2]                   # every run of every recipe, as `tools/train.py --seeds <n>` (one seed a run)
    opts: [KEY, VALUE, ...]            # overrides for every run (a mapping KEY: VALUE works too)
    matrix: {method: [kd, dkd], pair: [resnet32x4_resnet8x4, ...]}   # fills {method} / {pair} in config patterns
    published: true                    # the report shows the published numbers beside ours
    teacher_seed: 0                    # --train-missing-teachers: the seed of the vanilla teacher runs
    teacher_opts: [KEY, VALUE, ...]    # --train-missing-teachers: overrides for the teacher runs only
    runs:
      - configs/cifar100/vanilla/*.yaml                   # a pattern alone, or an entry:
      - configs: [configs/cifar100/{method}/{pair}.yaml]  # paths or glob patterns (cwd first, then the project)
        flags: [--logit-stand, --base-temp, "2", --kd-weight, "9"]   # tools/train.py flags
        ls: authors                    # the authors' LS flags (and overrides) for each config's pair (ls_settings)
        opts: [KEY, VALUE, ...]        # overrides for this entry's runs (before the sweep's opts)
        seeds: [0]                     # this entry's seeds instead of the sweep's
        matrix: {...}                  # this entry's placeholders (added to, or replacing, the sweep's)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import yaml

from ..errors import MdistillerError, did_you_mean
from ..files import PROJECT_ROOT
from .train import parse_args

SWEEP_DIR = "configs/sweeps"
# The flags an entry may give; --cfg, --seeds and --resume are the sweep's to set.
ENTRY_FLAGS = ("--logit-stand", "--base-temp", "--kd-weight")
# `ls:` values: the authors' setting of each pair (analysis/ls_settings.py); `header` is its former name
LS_VALUES = ("authors", "header")


def _kind(name: str, **extra: Any) -> dict:
    return {"kind": name, **extra}


@dataclass(frozen=True)
class Entry:
    """One item of `runs:`: config patterns and how to train them."""

    configs: tuple[str, ...] = field(metadata=_kind("strings"))
    flags: tuple[str, ...] = field(default=(), metadata=_kind("flags"))
    ls: str | None = field(default=None, metadata=_kind("choice", choices=LS_VALUES))
    opts: tuple[str, ...] = field(default=(), metadata=_kind("opts"))
    seeds: tuple[int, ...] | None = field(default=None, metadata=_kind("seeds"))
    matrix: Mapping[str, tuple[str, ...]] = field(default_factory=dict, metadata=_kind("matrix"))

    @property
    def ls_authors(self) -> bool:
        return self.ls is not None


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    runs: tuple[Entry, ...] = field(metadata=_kind("entries"))
    name: str = field(default="", metadata=_kind("string"))
    description: str = field(default="", metadata=_kind("string"))
    seeds: tuple[int, ...] = field(default=(0,), metadata=_kind("seeds"))
    opts: tuple[str, ...] = field(default=(), metadata=_kind("opts"))
    matrix: Mapping[str, tuple[str, ...]] = field(default_factory=dict, metadata=_kind("matrix"))
    published: bool = field(default=False, metadata=_kind("bool"))
    teacher_seed: int = field(default=0, metadata=_kind("int"))
    teacher_opts: tuple[str, ...] = field(default=(), metadata=_kind("opts"))
    path: str = field(default="", metadata=_kind("internal"))  # the file it was read from

    @property
    def entries(self) -> tuple[Entry, ...]:
        return self.runs


def shipped_sweeps() -> list[str]:
    """The names of the sweep files shipped in configs/sweeps/."""
    folder = PROJECT_ROOT / SWEEP_DIR
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_sweep(name_or_path: str) -> str:
    """A sweep file's path: the path itself, or configs/sweeps/<name>.yaml (working directory, then the project)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    for candidate in (os.path.join(SWEEP_DIR, stem + ".yaml"), str(PROJECT_ROOT / SWEEP_DIR / (stem + ".yaml"))):
        if os.path.isfile(candidate):
            return candidate
    raise MdistillerError(f"no sweep file {name_or_path}: give a YAML file or one of the shipped sweeps "
                          f"({', '.join(shipped_sweeps()) or f'none in {SWEEP_DIR}'})")


def parse_train_args(tokens: Sequence[str], where: str) -> argparse.Namespace:
    """tools/train.py's parse_args, with its usage errors as one-line MdistillerErrors naming where they came from."""
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            return parse_args(list(tokens))
    except SystemExit:
        reason = messages.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
        raise MdistillerError(f"{where}: {reason[0].replace('train.py: ', '')}: {shlex.join(tokens)}") from None


# ---- one converter per kind of value; each raises a bare reason, validate_sweep says where ----

class _Bad(Exception):
    pass


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise _Bad(f"{what} must be a string or a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _opts(value: Any, what: str) -> tuple[str, ...]:
    """`[KEY, VALUE, ...]` or `{KEY: VALUE}` -> a flat KEY VALUE tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, dict):
        return tuple(str(v) for item in value.items() for v in item)
    items = _strings(value, what)
    if len(items) % 2:
        raise _Bad(f"{what} must be KEY VALUE pairs, got an odd number of items: {list(items)}")
    return items


def _seeds(value: Any, what: str) -> tuple[int, ...]:
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _Bad(f"{what} must be an integer or a list of integers, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise _Bad(f"{what} lists a seed twice: {seeds}")
    return tuple(int(s) for s in seeds)


def _matrix(value: Any, what: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Bad(f"{what} must map names to lists, got {value!r}")
    return {str(k): _strings(v, f"{what} {k}") for k, v in value.items()}


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(f"{what} must be an integer, got {value!r}")
    return value


def _flags(value: Any, what: str) -> tuple[str, ...]:
    flags = _strings(value, what)
    for token in flags:
        if token.startswith("--") and token not in ENTRY_FLAGS:
            raise _Bad(f"flag {token} is not one an entry may give ({', '.join(ENTRY_FLAGS)}); KEY VALUE overrides "
                       "go in opts")
    try:  # values the tool would refuse are refused here
        extra = parse_train_args(flags, "flags").opts
    except MdistillerError as exc:
        raise _Bad(str(exc).removeprefix("flags: ")) from None
    if extra:
        raise _Bad(f"flags {list(flags)} hold KEY VALUE overrides: put them in opts")
    return flags


def _choice(choices: Sequence[str]) -> Callable[[Any, str], str]:
    def convert(value: Any, what: str) -> str:
        if value not in choices:
            raise _Bad(f"{what} takes `{choices[0]}` (the authors' setting for each config's pair, "
                       f"mdistiller/analysis/ls_settings.py), got {value!r}; explicit settings go in flags")
        return value
    return convert


def _entry(item: Any, what: str) -> Entry:
    if isinstance(item, str):
        return Entry(configs=(item,))
    if not isinstance(item, dict) or "configs" not in item:
        raise _Bad(f"each item of runs is a config pattern or a mapping with configs, got {item!r}")
    entry = _build(Entry, item, "an entry of runs")
    if entry.ls is not None and "--logit-stand" in entry.flags:
        raise _Bad("an entry gives either ls: authors or --logit-stand in flags, not both")
    return entry


def _entries(value: Any, what: str) -> tuple[Entry, ...]:
    if not isinstance(value, list):
        raise _Bad(f"{what} must be a list")
    return tuple(_entry(item, what) for item in value)


_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "strings": _strings, "opts": _opts, "seeds": _seeds, "matrix": _matrix, "int": _int, "flags": _flags,
    "bool": lambda value, what: bool(value), "string": lambda value, what: "" if value is None else str(value),
    "entries": _entries,
}


def _unknown_key(key: str, allowed: Sequence[str], where: str) -> _Bad:
    hint = did_you_mean(key, allowed, 0.6) or f" (keys: {', '.join(allowed)})"
    return _Bad(f"unknown key {key!r} in {where}{hint}")


def _build(schema: type, data: dict, where: str) -> Any:
    """An instance of the schema dataclass from a YAML mapping: unknown keys refused, each value converted by kind."""
    declared = {f.name: f for f in fields(schema) if f.metadata["kind"] != "internal"}
    unknown = [k for k in data if k not in declared]
    if unknown:
        raise _unknown_key(unknown[0], list(declared), where)
    values = {}
    for name, spec in declared.items():
        if name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise _Bad(f"{where} needs `{name}:`")
            continue
        kind = spec.metadata["kind"]
        convert = _choice(spec.metadata["choices"]) if kind == "choice" else _CONVERTERS[kind]
        values[name] = convert(data[name], name)
    return schema(**values)


def validate_sweep(data: Any, path: str) -> Sweep:
    """The Sweep a sweep file's YAML stands for (a bare list is its runs), or a one-line error naming the file."""
    if isinstance(data, list):
        data = {"runs": data}
    if not isinstance(data, dict) or not data.get("runs"):
        raise MdistillerError(f"sweep file {path}: needs `runs:`, a list of configs or glob patterns")
    try:
        sweep = _build(Sweep, data, "the sweep")
    except _Bad as exc:
        raise MdistillerError(f"sweep file {path}: {exc}") from None
    return replace(sweep, name=sweep.name or os.path.splitext(os.path.basename(path))[0], path=path)


def load_sweep(name_or_path: str) -> Sweep:
    """Read and check a sweep file (or a shipped sweep by name)."""
    path = find_sweep(name_or_path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise MdistillerError(f"cannot read sweep file {path}: {str(exc).splitlines()[0]}") from None
    return validate_sweep(data, path)
