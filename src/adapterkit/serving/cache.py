"""A decoding batch's key/value cache layer that grows in place.

transformers' DynamicLayer appends each step's keys and values with torch.cat, which copies the whole
cache every step: on the default model with 32 rows that was ~16% of a decoding step's CPU time (a
copy of ~2 MB per layer and tensor at 85 positions, growing with the context). GrowingLayer keeps them
in buffers with room for `ROOM` more positions and writes a step's token into the room; its `keys` and
`values` are views of the filled part, so attention reads the same numbers (torch's CPU attention
gives bitwise the same result on such a view as on a contiguous copy). Assigning `keys` or `values`
(a batch joining or dropping rows) copies the new tensor into a fresh buffer with room.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

ROOM = 64  # positions of spare room a buffer gets when it is (re)made: one whole copy every ROOM steps


def _with_room(t: torch.Tensor | None, room: int = 0) -> tuple[torch.Tensor | None, int]:
    """A buffer holding `t` with room for max(ROOM, room) more positions, and t's length."""
    if t is None or t.dim() != 4:  # None, or lazy_initialization's empty placeholder
        return t, 0
    length = t.shape[-2]
    buffer = t.new_empty(*t.shape[:2], length + max(ROOM, room), t.shape[-1])
    buffer[:, :, :length] = t
    return buffer, length


class GrowingLayer(DynamicLayer):
    """A DynamicLayer (the same results, joinable the same way) that appends into spare room."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        self._stores: dict[str, tuple[torch.Tensor | None, int]] = {"keys": (None, 0), "values": (None, 0)}
        super().__init__()
        if keys is not None:
            self.keys, self.values = keys, values
            self.device, self.is_initialized = keys.device, True

    @classmethod
    def from_layer(cls, layer: DynamicLayer) -> GrowingLayer:
        if not layer.is_initialized:
            return cls()
        return cls(layer.keys, layer.values)

    def _get(self, name: str) -> torch.Tensor | None:
        buffer, length = self._stores[name]
        if buffer is None or buffer.dim() != 4:
            return buffer
        return buffer[:, :, :length]

    keys = property(lambda self: self._get("keys"),
                    lambda self, t: self._stores.__setitem__("keys", _with_room(t)))
    values = property(lambda self: self._get("values"),
                      lambda self, t: self._stores.__setitem__("values", _with_room(t)))

    def join(self, other: GrowingLayer, length: int) -> bool:
        """Append `other`'s rows after these, each right-aligned to `length` positions with zeros before it
        (masked out, and never garbage that could turn the masked scores into NaN), in one copy; False
        (nothing done) where either holds no keys yet or more than `length` positions."""
        pairs = [(self._get(name), other._get(name)) for name in ("keys", "values")]
        if any(t is None or t.dim() != 4 or t.shape[-2] > length for pair in pairs for t in pair):
            return False
        for name, (mine, theirs) in zip(("keys", "values"), pairs, strict=True):
            rows = mine.shape[0]
            buffer = mine.new_empty(rows + theirs.shape[0], mine.shape[1], length + ROOM, mine.shape[-1])
            for part, t in ((buffer[:rows], mine), (buffer[rows:], theirs)):
                part[:, :, :length - t.shape[-2]].zero_()
                part[:, :, length - t.shape[-2]:length] = t
            self._stores[name] = (buffer, length)
        return True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for name, new in (("keys", key_states), ("values", value_states)):
            buffer, length = self._stores[name]
            if buffer is None or buffer.dim() != 4:
                self._stores[name] = _with_room(new)
                continue
            end = length + new.shape[-2]
            if end > buffer.shape[-2]:
                buffer, length = _with_room(buffer[:, :, :length], new.shape[-2])
            buffer[:, :, length:end] = new
            self._stores[name] = (buffer, end)
        return self.keys, self.values


def growing(cache) -> bool:
    """Turn a cache of plain DynamicLayers into GrowingLayers in place; whether rows can join it (only
    plain growing layers can: sliding-window ones keep other state)."""
    layers = cache.layers
    if not all(type(layer) in (DynamicLayer, GrowingLayer) for layer in layers):
        return False
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = GrowingLayer.from_layer(layer)
    return True
