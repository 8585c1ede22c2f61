"""Config fields and their values: the ``option`` helper, type checks, command-line text, recipes.

Shared by the training configs (sdtune.config) and the other commands' configs
(sdtune.command_configs); no torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal  # noqa: F401  (Literal: resolving the configs' string annotations)

import yaml

from sdtune.errors import ConfigError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file into a flat dict of option values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a recipe YAML such as recipes/sd15/lora.yaml")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected 'option: value' lines, got {type(values).__name__}")
    values.pop("method", None)
    return values


def build_config(config_cls: type, values: dict[str, Any], source: str = "option") -> Any:
    """Make a config from option values, rejecting every unknown name at once, each with a suggestion."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    normalized = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = [f"'{key}'{did_you_mean(key.replace('-', '_'), names)}" for key in values if key.replace("-", "_") not in names]
    if unknown:
        raise ConfigError(f"unknown {source} {', '.join(unknown)}")
    try:
        return config_cls(**normalized)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def did_you_mean(name: str, candidates: typing.Iterable[str], prefix: str = "") -> str:
    """'; did you mean '--rank'?' for the closest candidate (with ``prefix``), or '' if none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def field_choices(f: dataclasses.Field) -> tuple | None:
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    args = [a for a in _union_args(f.type) if typing.get_origin(a) is Literal]
    return typing.get_args(args[0]) if args else None


def field_base_type(f: dataclasses.Field) -> type:
    """The scalar type of a field (bool/int/float/str), ignoring Optional and Literal."""
    for arg in _union_args(f.type):
        if arg is type(None):
            continue
        if typing.get_origin(arg) is Literal:
            return type(typing.get_args(arg)[0])
        return arg
    raise TypeError(f"unsupported field type {f.type!r}")


def parse_value(f: dataclasses.Field, text: str) -> Any:
    """Parse a command-line string into the field's type ('none' gives None where allowed)."""
    if text.lower() in ("none", "null") and type(None) in _union_args(f.type):
        return None
    kind = field_base_type(f)
    if kind is bool:
        try:
            return parse_bool(text)
        except ValueError as err:
            raise ConfigError(f"--{f.name}: {err}") from None
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{f.name}: expected {kind.__name__}, got '{text}'") from None


def parse_bool(text: str) -> bool:
    """'1/true/yes/on' or '0/false/no/off' (any case); anything else raises ValueError."""
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got '{text}'")


def _union_args(tp: Any) -> tuple:
    if isinstance(tp, str):  # from __future__ annotations: resolve the string
        tp = eval(tp, {**vars(typing), **globals()}, {})  # config classes use only typing names and builtins
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def check_type(f: dataclasses.Field, value: Any) -> None:
    args = _union_args(f.type)
    if value is None:
        if type(None) not in args:
            raise ValueError(f"{f.name} is required and cannot be empty")
        return
    choices = field_choices(f)
    if choices is not None:
        if value not in choices:
            raise ValueError(f"{f.name}: '{value}' is not one of {', '.join(map(str, choices))}{did_you_mean(str(value), map(str, choices))}")
        return
    kind = field_base_type(f)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ValueError(f"{f.name}: expected {kind.__name__}, got {json.dumps(value) if not isinstance(value, str) else repr(value)}")
