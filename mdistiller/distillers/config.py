"""A method's config section, declared beside the method (timm keeps a model's defaults beside the model).

A module declares the keys it owns with `config_section(NAME, {KEY: Key(default, help), SUB: {...}})` at import;
`engine/cfg.py` assembles `CFG` from the shared sections and every registered method section, so a method's keys,
defaults, allowed values and one-line help live in its own file. A section is owned by one module; other methods may
read it (MLKD reads KD's) and say so in their declaration (`Declaration.config_sections`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Union

from yacs.config import CfgNode as CN

from ..errors import MdistillerError


@dataclass(frozen=True)
class Key:
    """One config key: its default (whose type the loader enforces), a one-line help and, for keys that take one of
    a few values, the allowed ones."""

    default: Any
    help: str
    choices: tuple = ()

    def __post_init__(self) -> None:
        if self.choices and self.default not in self.choices:
            raise ValueError(f"default {self.default!r} is not one of the allowed values {self.choices}")


Spec = Union[Key, Mapping[str, "Spec"]]

_SECTIONS: dict[str, Spec] = {}


def _check_spec(spec: Spec, where: str) -> None:
    if isinstance(spec, Key):
        return
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"config section {where} must be a Key or a non-empty mapping of keys, got {spec!r}")
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"config section {where}: key names are non-empty strings, got {key!r}")
        _check_spec(value, f"{where}.{key}")


def config_section(name: str, spec: Spec) -> Spec:
    """Register the top-level config section (or single top-level key) `name`; returns `spec`. A section has one
    declaration: registering another spec under a taken name is an error."""
    _check_spec(spec, name)
    if name in _SECTIONS and _SECTIONS[name] != spec:
        raise ValueError(f"config section {name} is declared twice, with different keys")
    _SECTIONS[name] = spec
    return spec


def method_sections() -> dict[str, Spec]:
    """Every registered method section, by name."""
    return dict(_SECTIONS)


def to_cfgnode(spec: Spec) -> Any:
    """The defaults of a section as a CfgNode (a single Key: its default)."""
    if isinstance(spec, Key):
        return spec.default
    node = CN()
    for key, value in spec.items():
        node[key] = to_cfgnode(value)
    return node


def iter_keys(spec: Spec, prefix: str) -> Iterator[tuple[str, Key]]:
    """(full key name, Key) of every leaf of a section."""
    if isinstance(spec, Key):
        yield prefix, spec
        return
    for key, value in spec.items():
        yield from iter_keys(value, f"{prefix}.{key}")


def lookup(cfg: CN, full_key: str) -> Any:
    """The value of `A.B.C` in cfg."""
    node = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def check_choices(cfg: CN, sections: Iterable[str] | None = None) -> None:
    """Refuse a method key whose value is not one of its allowed values (one line naming the key and the values);
    `sections`: only those (default: every method section)."""
    names = _SECTIONS if sections is None else [name for name in sections if name in _SECTIONS]
    for name in names:
        for full_key, key in iter_keys(_SECTIONS[name], name):
            if key.choices and lookup(cfg, full_key) not in key.choices:
                allowed = ", ".join(str(c) for c in key.choices)
                raise MdistillerError(f"{full_key} {lookup(cfg, full_key)!r} is not one of {allowed}")

