"""The base of every method's config: a validated dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import AdapterkitError
from .settings import Option, check_fields, options_of


@dataclass
class AdapterConfig:
    """Base of every method's config. Subclasses set `method` and implement `validate`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, lambda f: f"{self.method} {f.name}")
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
        if not isinstance(values, dict):
            raise AdapterkitError(f"{cls.method} config must be a mapping of option names to values")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AdapterkitError(
                f"{cls.method} config has unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as exc:  # a value of the wrong type that validate() compared or measured
            raise AdapterkitError(f"{cls.method} config has a value of the wrong type ({exc})") from exc

    @classmethod
    def options(cls) -> list[Option]:
        """Each option with its type, default, help and CLI flag: for `adapterkit methods` and the CLI."""
        return options_of(cls)
