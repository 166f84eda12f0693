"""The method protocol and its registry. Core asks a method for its parts and never names one.

A method is one module in this package: a config dataclass, the parts it attaches (an `Effect` at
a module site, or an `InputHook` on the model's inputs), and one `register_method` call.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterkitError
from .combining import Combination


class Method:
    """What a method supplies. Subclass it, set the class attributes, implement `attach`, and
    override the optional steps it supports."""

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    family: ClassVar[str]        # low-rank, adapter, prompt, ...
    summary: ClassVar[str]
    mergeable: ClassVar[bool] = False
    # The learning rates `study --lrs auto` pilots: around the rate the method usually trains at.
    study_lrs: ClassVar[tuple[float, ...]] = (1e-4, 3e-4, 1e-3)

    def __init__(self, config_class: type[AdapterConfig] | None = None, summary: str | None = None):
        """One class may serve several presets: each registered with its own config class and summary."""
        if config_class is not None:
            self.name, self.config_class = config_class.method, config_class
        if summary is not None:
            self.summary = summary

    def attach(self, adapted, config: AdapterConfig) -> dict[str, nn.Module]:
        """The adapter's parts keyed by the module path they act at (an InputHook under sites.INPUTS)."""
        raise NotImplementedError

    def lr_ratio(self, config: AdapterConfig, key: str) -> float:
        """Learning-rate multiplier of one adapter weight (its path inside the adapter)."""
        return 1.0

    def combine(self, adapted, names: list[str], weights: list[float], new_name: str, how: Combination) -> None:
        """A new adapter `new_name` combining adapters `names` of this method, weighted, as `how` says."""
        raise AdapterkitError(f"{self.name} adapters cannot be combined; add_weighted_adapter takes LoRA adapters")


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method; a duplicate name is refused."""
    if method.name in METHODS:
        raise AdapterkitError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise AdapterkitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
