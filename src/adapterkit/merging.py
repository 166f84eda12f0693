"""Merging adapters into the base weights: explicit, checked algebra (fp32, finite results, a record of
what is merged per site), as a part of AdaptedModel kept in its own module."""

from __future__ import annotations

from torch import nn

from .errors import AdapterkitError
from .sites import base_module, logical_modules, replace_module


class Merging:
    """merge / unmerge / merge_and_unload of AdaptedModel (which supplies records, sites and state)."""

    def merge(self, name: str | None = None) -> None:
        """Fold an adapter into the base weights (exact algebra in fp32); forward then skips it."""
        name = name or self._single_name()
        record = self._record(name)
        if record.merged:
            raise AdapterkitError(f"adapter {name!r} is already merged")
        not_mergeable = [p for p, part in record.parts.items() if not getattr(part, "mergeable", False)]
        if not_mergeable:
            raise AdapterkitError(
                f"{record.config.method} adapter {name!r} cannot be merged into the base weights "
                f"(e.g. at {not_mergeable[0]}); use it unmerged, or train a mergeable method (see `adapterkit methods`)")
        tied = self._tied_parameters()
        for path, part in record.parts.items():
            if part.replaces_base and any(id(p) in tied for p in base_module(self.causal_lm, path).parameters()):
                raise AdapterkitError(f"{path} shares its weight with another module (tied embeddings): merging "
                                      f"its trained copy would change both; keep adapter {name!r} unmerged")
        for path, part in record.parts.items():
            site = self.causal_lm.get_submodule(path)
            part.merge_into(site.base_layer, +1.0)
            site.merged.append(name)
        record.merged = True

    def _tied_parameters(self) -> set[int]:
        """ids of base parameters registered under more than one module."""
        owners: dict[int, int] = {}
        for _, module in logical_modules(self.causal_lm):
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        return {key for key, count in owners.items() if count > 1}

    def unmerge(self, name: str | None = None) -> None:
        """Undo `merge`."""
        name = name or self._single_name()
        record = self._record(name)
        if not record.merged:
            raise AdapterkitError(f"adapter {name!r} is not merged")
        for path, part in record.parts.items():
            site = self.causal_lm.get_submodule(path)
            part.merge_into(site.base_layer, -1.0)
            site.merged.remove(name)
        record.merged = False

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain transformers model, sites removed."""
        for name in self.state.active:
            if not self.records[name].merged:
                self.merge(name)
        for path, _ in list(self.sites()):
            replace_module(self.causal_lm, path, self.causal_lm.get_submodule(path).base_layer)
        self.records.clear()
        self.state.active = []
        return self.causal_lm
