"""Adapter configs: validated dataclasses, JSON with a format version, and the method registry."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import AdapterkitError

FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses set `method` and implement `validate`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise AdapterkitError naming the bad field and the accepted values."""

    def for_loaded_weights(self) -> AdapterConfig:
        """The same adapter with starting values that cost nothing (no tokenizer, no forward pass):
        what to attach when saved weights replace the starting values at once."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AdapterkitError(
                f"{cls.method} config has unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def options(cls) -> list[Option]:
        """Each option with its type, default, help and CLI flag: for `adapterkit methods` and the CLI."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append(Option(f.name, hints[f.name], default, f.metadata.get("help", ""), flag_of(f)))
        return rows


@dataclass(frozen=True)
class Option:
    name: str
    type: Any
    default: Any
    help: str
    flag: str

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A dataclass field with a help text and, optionally, its CLI flag (default: --field-name)."""
    metadata = {"help": help, "flag": flag}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class Method:
    """One registered method: its name, config class, and attach function
    `attach(adapted_model, config, name) -> list[str]` returning the module paths it touched."""

    name: str
    config_class: type[AdapterConfig]
    attach: typing.Callable
    family: str
    summary: str
    mergeable: bool


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add a method; a duplicate name is refused."""
    if method.name in METHODS:
        raise AdapterkitError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method


def get_method(name: str) -> Method:
    from . import methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise AdapterkitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def config_to_json(config: AdapterConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "method": config.method, "config": config.to_dict()}


def config_from_json(data: dict[str, Any]) -> AdapterConfig:
    if not isinstance(data, dict) or "method" not in data or "config" not in data:
        raise AdapterkitError("adapter_config.json lacks 'method' or 'config'; it was not written by adapterkit")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterkitError(
            f"adapter format version {version!r} is newer than this adapterkit reads ({FORMAT_VERSION}); "
            "upgrade adapterkit")
    return get_method(data["method"]).config_class.from_dict(data["config"])
