"""Settings dataclasses: one place per default, type, bound and help text.

Adapter configs and the recipes' settings declare their fields with `option()`. From that one
declaration come the CLI flags (cli.py), the YAML keys (`from_mapping`), the conversion of text
values (`convert`) and the validation of every value before any work starts (`check_fields`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from .errors import AdapterkitError


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, as every adapterkit command prints them, and no abbreviated
    flags (`--learning-rat` must not silently mean --learning-rate)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"adapterkit: error: {message} (see `{self.prog} --help`)\n")


def option(default: Any, help: str, flag: str | None = None, *, minimum: float | None = None,
           maximum: float | None = None, above: float | None = None, choices: tuple | None = None,
           aliases: tuple[str, ...] = (), cli: bool = True, required: bool = False,
           positional: bool = False) -> Any:
    """A dataclass field with its help text, CLI flag (default --field-name) and bounds.

    minimum/maximum are inclusive, `above` exclusive; `aliases` are extra flag names (LLM-Adapters'
    spellings); `cli=False` keeps a field out of the command line; `required` refuses None (the
    default of a required setting, so YAML can still supply it); `positional` makes it an argument.
    """
    metadata = {"help": help, "flag": flag, "minimum": minimum, "maximum": maximum, "above": above,
                "choices": choices, "aliases": aliases, "cli": cli, "required": required, "positional": positional}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class Option:
    """One field as the CLI and `adapterkit methods` show it."""

    name: str
    type: Any
    default: Any
    help: str
    flag: str
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def options_of(cls) -> list[Option]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append(Option(f.name, hints[f.name], default, f.metadata.get("help", ""), flag_of(f),
                           tuple(f.metadata.get("aliases") or ()), f.metadata.get("choices")))
    return rows


def type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ----- converting text (a flag's value, a YAML string) to a field's type ---------------------------
def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def takes_list(hint: Any) -> bool:
    """Whether a field's type admits a list (its flag may then be repeated)."""
    return any(typing.get_origin(m) is list for m in _members(hint))


def _one(text: str, hint: Any) -> Any:
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "yes", "1", "on"):
            return True
        if lowered in ("false", "no", "0", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    if hint is str:
        return text
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        if text.strip().startswith("[") and '"' in text:
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError("expected a list")
            return [_one(str(v), item) if not isinstance(v, item) else v for v in values]
        text = text.strip().removeprefix("[").removesuffix("]")  # [a,b] as python-fire scripts take it
        return [_one(part.strip().strip("'"), item) for part in text.split(",") if part.strip()]
    if origin is dict:
        if text.strip().startswith("{"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return value
        mapping = {}
        for item in (part.strip() for part in text.split(",") if part.strip()):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ValueError("expected NAME=VALUE pairs separated by commas, or JSON")
            mapping[key.strip()] = _number(value.strip())
        return mapping
    raise ValueError(f"cannot read a {type_name(hint)} from text")


def _number(text: str) -> int | float | str:
    """A mapping value: an integer, a number, or the text itself (the field's own check judges it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def convert(text: str, hint: Any, name: str = "value") -> Any:
    """A text value as the field's type. Members of a union are tried in their declared order, a
    plain string last (so "q_proj,v_proj" is a list, "0.5" a number); the keyword 'all-linear' stays
    a string. Raises AdapterkitError naming the setting."""
    members = _members(hint)
    if str in members and text == "all-linear":
        return text
    errors = []
    for member in sorted(members, key=lambda m: m is str):
        try:
            return _one(text, member)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    raise AdapterkitError(f"{name}: {text!r} is not a valid {type_name(hint)} ({errors[0]})")


# ----- checking values ----------------------------------------------------------------------------
def _fits(value: Any, hint: Any) -> bool:
    if value is None:
        return hint is type(None) or type(None) in typing.get_args(hint) or hint is Any
    for member in _members(hint):
        origin = typing.get_origin(member) or member
        if member is Any:
            return True
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if member is bool and isinstance(value, bool):
            return True
        if member is str and isinstance(value, str):
            return True
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(member) or (Any,)
            if all(_fits(v, item) for v in value):
                return True
        if origin is dict and isinstance(value, dict):
            return True
    return False


def check_fields(obj: Any, label: typing.Callable[[dataclasses.Field], str] = flag_of) -> None:
    """Every field's type, bounds and choices; one error naming the setting, what it got and what it takes."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, meta, name = getattr(obj, f.name), f.metadata, label(f)
        if value is None and meta.get("required"):
            raise AdapterkitError(f"{name} is required")
        if not _fits(value, hints[f.name]):
            raise AdapterkitError(f"{name} must be a {type_name(hints[f.name])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise AdapterkitError(f"{name} must be a finite number, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if meta.get("minimum") is not None and value < meta["minimum"]:
                raise AdapterkitError(f"{name} must be at least {meta['minimum']}, got {value!r}")
            if meta.get("maximum") is not None and value > meta["maximum"]:
                raise AdapterkitError(f"{name} must be at most {meta['maximum']}, got {value!r}")
            if meta.get("above") is not None and not value > meta["above"]:
                raise AdapterkitError(f"{name} must be greater than {meta['above']}, got {value!r}")
        if meta.get("choices") and value is not None and value not in meta["choices"]:
            raise AdapterkitError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")


def from_mapping(cls, values: dict[str, Any], source: str, text_values: bool = False) -> dict[str, Any]:
    """Field values of `cls` from a mapping (YAML, JSON): keys may use - or _; unknown keys are an
    error naming the source. With `text_values`, strings are converted to the fields' types."""
    if not isinstance(values, dict):
        raise AdapterkitError(f"{source}: expected a mapping of setting names to values, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise AdapterkitError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")
        if isinstance(value, str) and (text_values or not _fits(value, hints[name])):
            value = convert(value, hints[name], f"{source}: {key}")
        out[name] = value
    return out
