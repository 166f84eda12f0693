"""Choosing the modules an adapter attaches to: by name, by regex, or by role in the table."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from .architectures import is_linear
from .errors import AdapterkitError
from .sites import logical_modules


def match_modules(model: nn.Module, targets: str | list[str], accept: Callable[[nn.Module], bool] = is_linear,
                  kind: str = "linear", exclude: tuple[str, ...] = ()) -> list[str]:
    """Paths of modules named by `targets`.

    A list matches a module whose path equals an entry or ends with "." + entry (PEFT's rule);
    a single string is a regular expression matched against the whole path; "all-linear" takes
    every linear layer except the output head. Names that match nothing, or match a module of the
    wrong kind, are an error that lists what the model has.
    """
    modules = dict(logical_modules(model))
    if targets == "all-linear":
        found = [p for p, m in modules.items() if is_linear(m) and p not in exclude]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AdapterkitError(f"target_modules regex {targets!r} is invalid: {exc}") from exc
        found = [p for p in modules if pattern.fullmatch(p)]
    else:
        found = [p for p in modules if any(p == t or p.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in modules)]
        if unmatched:
            raise AdapterkitError(f"target_modules {unmatched} match no module; this model's {kind} modules "
                                  f"are named: {', '.join(short_names(model, accept))}")
    if not found:
        raise AdapterkitError(f"target_modules {targets!r} match no module; this model's {kind} modules "
                              f"are named: {', '.join(short_names(model, accept))}")
    wrong = [p for p in found if not accept(modules[p])]
    if wrong:
        raise AdapterkitError(f"target {wrong[0]} is a {type(modules[wrong[0]]).__name__}, not a {kind} module; "
                              f"{kind} modules are named: {', '.join(short_names(model, accept))}")
    return found


def short_names(model: nn.Module, accept: Callable[[nn.Module], bool] = is_linear) -> list[str]:
    """Distinct last path components of the accepted modules (q_proj, c_attn, ...), for messages."""
    names = []
    for path, module in logical_modules(model):
        last = path.rpartition(".")[2]
        if accept(module) and last not in names:
            names.append(last)
    return names
