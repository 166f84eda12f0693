"""Adapter sites: a wrapper that keeps a base module as a child and lets adapters act around it.

Wrapping keeps the transformers classes untouched (no patched forwards, no __class__ swaps).
Each adapter contributes an `Effect` at a site; several named adapters can share a site, and
a mixed batch runs each adapter's effect on its own rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import AdapterkitError


class Effect(nn.Module):
    """One adapter's contribution at one site. Subclasses override what they change."""

    acts_on_input = False    # transform the site's input before the base module runs
    acts_on_output = False   # transform the site's output
    replaces_base = False    # run instead of the base module (a trained copy)
    mergeable = False
    row_wise = True          # its input keeps the batch rows on dim 0, so a mixed batch can give it some rows
    # It rewrote its base layer's weight when attached (LoRA's PiSSA/OLoRA/LoftQ starts): it then holds
    # `base_change` (tensors saved beside the weights that rebuild the change from the original weight,
    # keyed PART_PATH.BASE_CHANGE.NAME), `rebuild_base(tensors)` and `restore_base()`; no other adapter
    # may share its site.
    changes_base = False

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def replacement(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")

    # A mixed batch runs output effects with equal gather keys at one site as one gathered product, each
    # row with its own adapter's tensors, instead of a loop over adapters (methods/gathered.py builds it).
    # An effect opts in by returning a key.
    def gather_key(self) -> tuple | None:
        return None

    def gather_tensors(self) -> tuple:
        """This adapter's tensors of the gathered product, as its gather_rows reads them."""
        raise NotImplementedError

    def gather_sources(self) -> list[torch.Tensor]:
        """What gather_tensors reads: the group's tensors are reused (without autograd) while none changes."""
        return list(self.parameters())

    def gather_rows(self, per_adapter: list[tuple], slots: torch.Tensor):
        """The rows' gathered form, from every adapter's gather_tensors (in the group's order) and each row's
        slot (its adapter's index there, len(per_adapter) for a row of none); reused while the rows stay."""
        raise NotImplementedError

    def on_output_gathered(self, rows: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor,
                           fresh: bool = False) -> torch.Tensor:
        """on_output for the whole batch, each row with its own tensors from gather_rows; `fresh`: y is a new
        tensor of no one else's (a linear layer's output, no autograd) that it may write in place."""
        raise NotImplementedError


INPUTS = "prompt"    # the key of an adapter's InputHook among its parts (as saved files since 0.1 name it)
EXPORTED = "final"   # tensors a part saves beside its weights are keyed PART_PATH.EXPORTED
BASE_CHANGE = "base_change"  # ... and those that rebuild a changed base weight PART_PATH.BASE_CHANGE.NAME


class InputHook(nn.Module):
    """An adapter part that acts on the model's inputs instead of at a module (the prompt family):
    it rewrites forward's arguments and may drive generate() itself. At most one runs at a time."""

    def prepare(self, adapted, kwargs: dict) -> tuple[dict, int]:
        """forward's arguments with the hook applied, and how many leading output positions to cut off."""
        raise NotImplementedError

    def generate(self, adapted, kwargs: dict):
        """`generate` with the hook applied once (not at every decoding step)."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved beside the weights (keyed EXPORTED), so a reader needs no encoder."""
        return {}


def strip_positions(output, k: int):
    """Cut k leading positions off logits and hidden states, so outputs match the input's length."""
    if k == 0:
        return output
    if getattr(output, "logits", None) is not None:
        output.logits = output.logits[:, k:]
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(h[:, k:] for h in output.hidden_states)
    if getattr(output, "last_hidden_state", None) is not None:
        output.last_hidden_state = output.last_hidden_state[:, k:]
    return output


def cast_for_adapter(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Adapter weights stay fp32 over a bf16 base: cast activations up unless autocast handles it."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(weight.dtype)
    return x


class Dropout(nn.Module):
    """Dropout for adapter inputs: torch's own on fp32 inputs (the same masks as PEFT for a given
    seed), and on bf16/fp16 inputs a mask drawn from 16 random bits an element, four elements per
    64-bit draw, about 3x cheaper than torch's (whose per-element draw was 8% of a bf16 LoRA step).

    The low-precision mask drops with probability round(p * 65536) / 65536 (within 1e-5 of p) and
    scales the kept values by the exact inverse of its keep rate, so the output stays unbiased.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.dtype not in (torch.bfloat16, torch.float16):
            return nn.functional.dropout(x, self.p, training=True)
        dropped = round(self.p * 65536)
        words = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[:x.numel()].view(x.shape)  # uniform over -32768..32767
        return x * (bits >= dropped - 32768) * (65536 / (65536 - dropped))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@dataclass
class AdapterState:
    """What runs now, shared by every site of one adapted model (a plain object, not a module)."""

    active: list[str] = field(default_factory=list)
    disabled: bool = False
    row_adapters: list[str | None] | None = None   # one adapter name (or None) per batch row
    _rows: dict = field(default_factory=dict)   # per mixed batch: row indices and slots, made once

    def rows_of(self, name: str, device: torch.device) -> torch.Tensor | None:
        """Row indices of `name` in a mixed batch; None when the whole batch uses it."""
        if self.row_adapters is None:
            return None
        if name not in self._rows:
            index = [i for i, n in enumerate(self.row_adapters) if n == name]
            self._rows[name] = torch.tensor(index, dtype=torch.long)
        rows = self._rows[name]
        return rows.to(device) if rows.device != device else rows

    def slots_of(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Per batch row, the position of its adapter in `names`; len(names) for rows of other adapters."""
        if names not in self._rows:
            index = {n: i for i, n in enumerate(names)}
            self._rows[names] = torch.tensor([index.get(n, len(names)) for n in self.row_adapters], dtype=torch.long)
        slots = self._rows[names]
        return slots.to(device) if slots.device != device else slots

    def names_running(self, names) -> list[str]:
        if self.disabled:
            return []
        if self.row_adapters is not None:
            wanted = set(self.row_adapters)
            return [n for n in names if n in wanted]
        present = set(names)
        return [n for n in self.active if n in present]  # stacked in the order they were activated


class AdapterSite(nn.Module):
    """Wraps one module of the base model. `base_layer` stays the original module."""

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.effects = nn.ModuleDict()
        self.merged: list[str] = []
        self.checkpointed = False  # recompute this module in backward (gradient checkpointing)
        self._stacks: dict = {}    # gather key -> (stamp of the sources, the adapters' tensors, rows' key, rows)
        self._groups: tuple | None = None  # (signature, gather groups, all their sources), see _gather_groups
        self._plan: tuple | None = None    # (key, plan) of a mixed batch without autograd, see _mixed_plan
        object.__setattr__(self, "_state", state)  # shared, so never registered as a child

    def __getattr__(self, name: str):
        # Model code may read attributes of the wrapped module (weight, in_features, nf...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "effects"):
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, x, *args, use_reentrant=False, **kwargs)
        return self._run(x, *args, **kwargs)

    def _run(self, x: torch.Tensor, *args, **kwargs):
        if self._state.row_adapters is not None and not torch.is_grad_enabled():
            plan = self._mixed_plan(x.device)
            if plan is not None:  # a decoding step of a mixed batch: every running adapter here is gathered
                y = self.base_layer(x, *args, **kwargs)
                extra = ()
                if isinstance(y, tuple):
                    y, extra = y[0], y[1:]
                # A linear layer's output is new and no one else's (no hook of its own kept it): the
                # products add into it in place
                fresh = type(self.base_layer) is nn.Linear and not self.base_layer._forward_hooks
                for effect, rows in plan:
                    out = effect.on_output_gathered(rows, x, y, fresh)
                    y, fresh = out, fresh or out is not y
                return (y, *extra) if extra else y
        names = [n for n in self._state.names_running(self.effects.keys()) if n not in self.merged]
        if not names:
            if self.merged and (self._state.disabled or self._state.row_adapters is not None):
                raise RuntimeError("adapters are merged into the base weights: unmerge() before disabling "
                                   "them or running a mixed batch")
            return self.base_layer(x, *args, **kwargs)
        effects = [(self.effects[n], self._state.rows_of(n, x.device)) for n in names]
        if any(rows is not None and not effect.row_wise for effect, rows in effects):
            raise AdapterkitError("a mixed batch cannot include adapters on mixture-of-experts weights (the experts "
                                  "see routed tokens, not batch rows); run those rows as their own batch")
        x_in = x
        for effect, rows in effects:
            if effect.acts_on_input:
                x_in = _on_rows(x_in, rows, effect.on_input)
        replacing = [(e, r) for e, r in effects if e.replaces_base]
        whole = next((e for e, r in replacing if r is None), None)
        if whole is not None:
            y = whole.replacement(x_in, *args, **kwargs)
        else:
            y = self.base_layer(x_in, *args, **kwargs)
        for effect, rows in replacing:
            if rows is not None:
                y = y.index_copy(0, rows, effect.replacement(x_in.index_select(0, rows), *args, **kwargs).to(y.dtype))
        extra = ()
        if isinstance(y, tuple):  # (hidden, router scores) from some MoE blocks: adapters act on the first
            y, extra = y[0], y[1:]
        if self._state.row_adapters is not None:
            y, effects = self._run_gathered(x_in, y, effects)
        for effect, rows in effects:
            if effect.acts_on_output:
                if rows is None:
                    y = effect.on_output(x_in, y)
                else:
                    y = y.index_copy(0, rows, effect.on_output(x_in.index_select(0, rows), y.index_select(0, rows)))
        return (y, *extra) if extra else y


    def _run_gathered(self, x: torch.Tensor, y: torch.Tensor, effects: list) -> tuple[torch.Tensor, list]:
        """A mixed batch's gathering output effects, one product per key; returns y and the other effects."""
        running = {id(effect) for effect, _ in effects}
        gathered = set()
        for key, (names, members, sources) in self._gather_groups().items():
            if any(id(effect) in running for effect in members):
                y = members[0].on_output_gathered(self._gathered_rows(key, names, members, sources, x.device), x, y)
                gathered.update(id(effect) for effect in members)
        return y, [(effect, rows) for effect, rows in effects if id(effect) not in gathered]

    def _mixed_plan(self, device: torch.device) -> list | None:
        """Without autograd, a mixed batch's (effect, rows) per gathered group running here, or None when
        some running adapter is not gathered (the general path). Kept while the rows' adapters, this
        site's adapters and merges, and every gathered weight (address and version) stay the same."""
        state = self._state
        groups = self._gather_groups()
        sources = self._groups[2]
        key = (self._groups[0], state.disabled, tuple(state.row_adapters),
               [(t.data_ptr(), t._version) for t in sources])
        cached = self._plan
        if cached is not None and cached[0] == key:
            return cached[1]
        names = [n for n in state.names_running(self.effects.keys()) if n not in self.merged]
        members = {id(effect) for _, group, _ in groups.values() for effect in group}
        plan = None
        effects = [self.effects[n] for n in names]
        if effects and all(id(e) in members and e.row_wise and not (e.acts_on_input or e.replaces_base)
                           for e in effects):
            running = set(names)
            plan = [(group[0], self._gathered_rows(k, group_names, group, group_sources, device))
                    for k, (group_names, group, group_sources) in groups.items() if running.intersection(group_names)]
        self._plan = (key, plan)
        return plan

    def _gather_groups(self) -> dict:
        """gather key -> (names, effects, their sources): every adapter of the kind at this site, so a
        stack outlives batches; made again only when the adapters, merges or train/eval mode change.
        The signature holds the effects themselves (compared by identity): an adapter deleted and added
        again under its name is a new one, whose weights may sit where the old one's were, so the stacks
        and plans built from the old one go too."""
        signature = (tuple(self.effects.items()), tuple(self.merged), self.training)
        if self._groups is None or self._groups[0] != signature:
            self._stacks, self._plan = {}, None
            groups: dict = {}
            for name, effect in self.effects.items():
                key = effect.gather_key() if effect.acts_on_output and name not in self.merged else None
                if key is not None:
                    groups.setdefault(key, []).append((name, effect))
            found = {key: (tuple(n for n, _ in pairs), [e for _, e in pairs],
                           [t for _, e in pairs for t in e.gather_sources()]) for key, pairs in groups.items()}
            self._groups = (signature, found, [t for _, _, sources in found.values() for t in sources])
        return self._groups[1]

    def _gathered_rows(self, key: tuple, names: tuple, members: list, sources: list,
                       device: torch.device):
        """The group's rows (its effects' gather_rows): without autograd, the adapters' tensors are reused
        while the weights stay the same, and the rows while the rows' adapters stay too (every step of a
        generate)."""
        reuse = not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))
        stamp = (names, tuple((t.data_ptr(), t._version) for t in sources))
        rows_key = (stamp, tuple(self._state.row_adapters))
        cached = self._stacks.get(key)
        if reuse and cached is not None and cached[0] == stamp:
            if cached[2] == rows_key:
                return cached[3]
            tensors = cached[1]
        else:
            tensors = [effect.gather_tensors() for effect in members]
        rows = members[0].gather_rows(tensors, self._state.slots_of(names, device))
        if reuse:
            self._stacks[key] = (stamp, tensors, rows_key, rows)
        return rows


def _on_rows(x: torch.Tensor, rows: torch.Tensor | None, fn) -> torch.Tensor:
    if rows is None:
        return fn(x)
    return x.index_copy(0, rows, fn(x.index_select(0, rows)))


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Set the module at a logical path (one that looks through sites) to `new`."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    while isinstance(parent, AdapterSite):  # the child lives in the wrapped module
        parent = parent.base_layer
    setattr(parent, child, new)


def base_module(root: nn.Module, path: str) -> nn.Module:
    """The original module at `path`, looking through a site that wraps it."""
    module = root.get_submodule(path)
    return module.base_layer if isinstance(module, AdapterSite) else module


def logical_modules(root: nn.Module, prefix: str = ""):
    """(path, module) of every base module, with sites looked through and adapter parts skipped."""
    for name, child in root.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, AdapterSite):
            inner = child.base_layer
            yield path, inner
            yield from logical_modules(inner, path + ".")
        else:
            yield path, child
            yield from logical_modules(child, path + ".")


def site_at(root: nn.Module, path: str, state: AdapterState) -> AdapterSite:
    """The site wrapping `path`, created on first use."""
    module = root.get_submodule(path)
    if isinstance(module, AdapterSite):
        return module
    site = AdapterSite(module, state)
    site.train(module.training)
    replace_module(root, path, site)
    return site


def refuse_shared_base_change(root: nn.Module, name: str, parts: dict[str, nn.Module]) -> None:
    """An adapter that rewrote a base weight shares that layer with no other adapter: the other one would
    run on a base it was not made for. Before refusing, the new adapter's own base changes are undone."""
    for path, part in parts.items():
        others = getattr(root.get_submodule(path), "effects", {}) if isinstance(part, Effect) else {}
        clash = next((other for other, effect in others.items() if effect.changes_base or part.changes_base), None)
        if clash is not None:
            for new in parts.values():
                if isinstance(new, Effect) and new.changes_base:
                    new.restore_base()
            changer = clash if others[clash].changes_base else name
            raise AdapterkitError(f"adapter {changer!r} rewrote the base weight of {path} (its LoRA init), so adapters "
                                  f"{clash!r} and {name!r} cannot share that layer; use another model instance, or "
                                  "target other modules")
