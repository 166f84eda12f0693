"""A mixed batch's product for adapters shaped out = act(x D^T + c) U^T + e: LoRA and its variants (no c,
no act) and bottleneck adapters. Every such adapter at a site joins one gathered group whatever its width
(rank, bottleneck size), and each row is computed with its own adapter's weights only, in one of two forms
chosen per call:

- side by side: the present adapters' D and U concatenated along the width, one product over all their
  columns, each row's columns of other adapters masked to zero. Every weight is read once, which wins while
  few adapters are present (at decoding, 32 rows by one token, a per-row product mostly reads weights);
- per row: each row's own D and U gathered, zero-padded to the widest, one batched product per row. Its
  work does not grow with the number of adapters present, so it wins when many are.

Masked columns, padding and the rows of no such adapter contribute exactly 0 (zeros, never a product
with 0 that an inf could turn into NaN). Built once per composition (which adapter each row runs) and
reused by every decoding step while the rows stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Side by side while the total width is at most this many times the widest adapter's (measured on one
# CPU thread, 32 rows of 576 features: at one token a row the two forms cost the same near 4 adapters of
# one width, at 32 tokens near 2).
SIDE_BY_SIDE_ONE_TOKEN = 4
SIDE_BY_SIDE_TOKENS = 2


class Composition:
    """One mixed batch's rows over a group's adapters.

    `parts` holds per adapter (D [w, in], c [w] or None, U [out, w], e [out] or None, *what else its kind
    needs); `slots` per row the index of its adapter in `parts`, len(parts) for a row of none. `self.parts`
    keeps the adapters present, in the order of `per_row_values`.
    """

    def __init__(self, parts: list[tuple], slots: torch.Tensor):
        self.rows = len(slots)
        wanted = slots.tolist()
        present = sorted(set(wanted) - {len(parts)})
        own = {slot: i for i, slot in enumerate(present)}
        self.local = torch.tensor([own.get(s, len(present)) for s in wanted], dtype=torch.long, device=slots.device)
        self.parts = [parts[i] for i in present]
        self.widths = [p[0].shape[0] for p in self.parts]
        self.width, self.widest = sum(self.widths), max(self.widths, default=0)
        D0, U0 = parts[0][0], parts[0][2]
        self.in_features, self.out_features = D0.shape[1], U0.shape[0]
        biases = [p[3] for p in self.parts]
        self.row_bias = None
        if any(b is not None for b in biases):  # [rows, 1, out]: each row's e, zeros for rows of none
            stack = U0.new_zeros(len(self.parts) + 1, self.out_features)
            for i, b in enumerate(biases):
                if b is not None:
                    stack[i] = b
            self.row_bias = stack[self.local].unsqueeze(1)
        self._side: tuple | None = None
        self._per_row: tuple | None = None

    def product(self, x: torch.Tensor, act=None) -> torch.Tensor:
        """Each row's own act(x D^T + c) U^T + e, as (rows, tokens, out); `act` runs on h (dropout included)."""
        x = x.reshape(self.rows, -1, self.in_features)
        limit = SIDE_BY_SIDE_ONE_TOKEN if x.shape[1] == 1 else SIDE_BY_SIDE_TOKENS
        if self.width <= limit * self.widest:
            D, c, U, hidden = self.side_by_side()
            h = F.linear(x, D, c)
            if act is not None:
                h = act(h)
            if hidden is not None:  # in place unless autograd may need act's output
                h = h.masked_fill_(hidden, 0.0) if act is None or not torch.is_grad_enabled() else h.masked_fill(hidden, 0.0)
            out = F.linear(h, U)
        else:
            D, c, U = self.per_row()
            h = torch.bmm(x, D) if c is None else torch.baddbmm(c, x, D)
            out = torch.bmm(h if act is None else act(h), U)
        return out if self.row_bias is None else out + self.row_bias

    def side_by_side(self) -> tuple:
        """D [width, in], c [width] or None, U [out, width], and per row the columns it must not see."""
        if self._side is None:
            D = torch.cat([p[0] for p in self.parts])
            c = None
            if any(p[1] is not None for p in self.parts):
                c = torch.cat([p[0].new_zeros(w) if p[1] is None else p[1] for p, w in zip(self.parts, self.widths,
                                                                                                 strict=True)])
            U = torch.cat([p[2] for p in self.parts], dim=1)
            owner = torch.repeat_interleave(torch.arange(len(self.parts), device=self.local.device),
                                            torch.tensor(self.widths, device=self.local.device))
            hidden = (owner[None, :] != self.local[:, None]).unsqueeze(1)  # [rows, 1, width]
            self._side = (D, c, U, hidden if bool(hidden.any()) else None)
        return self._side

    def per_row(self) -> tuple:
        """Each row's D^T [rows, in, widest], c [rows, 1, widest] or None, U^T [rows, widest, out]."""
        if self._per_row is None:
            n, w = len(self.parts), self.widest
            D0 = self.parts[0][0]
            D = D0.new_zeros(n + 1, w, self.in_features)
            U = D0.new_zeros(n + 1, self.out_features, w)
            c = D0.new_zeros(n + 1, w) if any(p[1] is not None for p in self.parts) else None
            for i, (d, bias, u, *_) in enumerate(self.parts):
                D[i, :d.shape[0]], U[i, :, :d.shape[0]] = d, u
                if c is not None and bias is not None:
                    c[i, :d.shape[0]] = bias
            self._per_row = (D[self.local].transpose(1, 2), None if c is None else c[self.local].unsqueeze(1),
                             U[self.local].transpose(1, 2))
        return self._per_row

    def per_row_values(self, values: list[torch.Tensor | None], missing: float) -> torch.Tensor:
        """[rows, 1, out]: each row's vector from `values` (one per adapter in parts' order), `missing` where none."""
        stack = self.parts[0][2].new_full((len(self.parts) + 1, self.out_features), missing)
        for i, v in enumerate(values):
            if v is not None:
                stack[i] = v
        return stack[self.local].unsqueeze(1)
