"""A mixed batch's product for adapters shaped out = act(x D^T + c) U^T + e: LoRA and its variants (no c,
no act) and bottleneck adapters. Every such adapter at a site joins one gathered group whatever its width
(rank, bottleneck size), and each row is computed with its own adapter's weights only, in one of two forms
chosen per call:

- side by side: the present adapters' D and U concatenated along the width, one product over all their
  columns, each row's columns of other adapters masked to zero. Every weight is read once, which wins while
  few adapters are present (at decoding, 32 rows by one token, a per-row product mostly reads weights);
- per row: each row's own D and U gathered, zero-padded to the widest, one batched product per row. Its
  work does not grow with the number of adapters present, so it wins when many are.

Only the rows that run one of the group's adapters are computed (`select`, then `add_to` adds their
results back): a site where a few rows of a large batch have an adapter costs those rows only. Masked
columns and padding contribute exactly 0 (zeros, never a product with 0 that an inf could turn into
NaN); rows of no such adapter keep y as it is. Built once per composition (which adapter each row runs)
and reused by every decoding step while the rows stay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Side by side while the total width is at most this many times the widest adapter's (measured on one
# CPU thread, 32 rows of 576 features: at one token a row the two forms cost the same near 4 adapters of
# one width, at 32 tokens near 2).
SIDE_BY_SIDE_ONE_TOKEN = 4
SIDE_BY_SIDE_TOKENS = 2
# Compute only the rows of the group's adapters (index_select, then index_add) while they are at most this
# share of the batch; above it, every row, the others masked (two operators fewer, a few more rows).
SELECT_ROWS_UP_TO = 0.75


class Composition:
    """One mixed batch's rows over a group's adapters.

    `parts` holds per adapter (D [w, in], c [w] or None, U [out, w], e [out] or None, *what else its kind
    needs); `slots` per row the index of its adapter in `parts`, len(parts) for a row of none. `self.parts`
    keeps the adapters present, in the order of `per_row_values`.
    """

    def __init__(self, parts: list[tuple], slots: torch.Tensor):
        wanted = slots.tolist()
        self.batch = len(wanted)
        present = sorted(set(wanted) - {len(parts)})
        own = {slot: i for i, slot in enumerate(present)}
        used = [row for row, slot in enumerate(wanted) if slot in own]
        if len(used) > SELECT_ROWS_UP_TO * self.batch:
            used = list(range(self.batch))
        # The rows computed: all of them, or (index) those of an adapter of the group, in batch order.
        self.index = None if len(used) == self.batch else torch.tensor(used, dtype=torch.long, device=slots.device)
        self.rows = len(used)
        self.local = torch.tensor([own.get(wanted[row], len(present)) for row in used], dtype=torch.long,
                                  device=slots.device)
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

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The computed rows of a batch-first tensor, as (rows, tokens, features)."""
        t = t.reshape(self.batch, -1, t.shape[-1])
        return t if self.index is None else t.index_select(0, self.index)

    def add_to(self, y: torch.Tensor, delta: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """y plus the computed rows' delta (rows, tokens, out); the other rows of y unchanged. `fresh`: y is
        a new tensor of no one else's (a linear layer's output, no autograd), so it is written in place."""
        delta = delta.to(y.dtype)
        inplace = fresh and y.is_contiguous()
        if self.index is None:
            return y.add_(delta.view(y.shape)) if inplace else y + delta.reshape(y.shape)
        rows = y.view(self.batch, -1, y.shape[-1]) if inplace else y.reshape(self.batch, -1, y.shape[-1])
        return rows.index_add_(0, self.index, delta).view(y.shape) if inplace else \
            rows.index_add(0, self.index, delta).reshape(y.shape)

    def added(self, y: torch.Tensor, x: torch.Tensor, act=None, fresh: bool = False) -> torch.Tensor:
        """y plus product(x) on the computed rows, x = select(input); the sum is the product's last step
        (in place if `fresh`, see add_to) where y is all rows in the product's dtype (a decoding step's case)."""
        if self.index is None and y.dtype == self.parts[0][2].dtype:
            inplace = fresh and y.is_contiguous()
            into = y.view(self.batch, -1, self.out_features) if inplace else y.reshape(self.batch, -1, self.out_features)
            return self.product(x, act, into, inplace).view(y.shape)
        return self.add_to(y, self.product(x, act), fresh)

    def product(self, x: torch.Tensor, act=None, into: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        """Each computed row's own act(x D^T + c) U^T + e (plus `into`, if given: (rows, tokens, out), written
        in place if `inplace`), as (rows, tokens, out), from x = select(input); `act` runs on h (dropout included)."""
        x = x.reshape(self.rows, -1, self.in_features)
        limit = SIDE_BY_SIDE_ONE_TOKEN if x.shape[1] == 1 else SIDE_BY_SIDE_TOKENS
        if self.width <= limit * self.widest:
            D, c, U, hidden = self.side_by_side()
            h = F.linear(x, D, c)
            if act is not None:
                h = act(h)
            if hidden is not None:  # in place unless autograd may need act's output
                h = h.masked_fill_(hidden, 0.0) if act is None or not torch.is_grad_enabled() else h.masked_fill(hidden, 0.0)
            if into is None:
                out = F.linear(h, U)
            else:
                flat, h = into.view(-1, self.out_features) if inplace else into.reshape(-1, self.out_features), \
                    h.reshape(-1, h.shape[-1])
                out = (flat.addmm_(h, U.t()) if inplace else torch.addmm(flat, h, U.t())).view(into.shape)
        else:
            D, c, U = self.per_row()
            h = torch.bmm(x, D) if c is None else torch.baddbmm(c, x, D)
            h = h if act is None else act(h)
            out = torch.bmm(h, U) if into is None else into.baddbmm_(h, U) if inplace else torch.baddbmm(into, h, U)
        if self.row_bias is not None:
            out = out.add_(self.row_bias) if into is not None and inplace else out + self.row_bias
        return out

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
            # D^T as a view of [rows, widest, in] and U^T contiguous: the fastest layouts of bmm here
            # (one CPU thread: a strided U^T made the second product 2-3x slower)
            self._per_row = (D[self.local].transpose(1, 2), None if c is None else c[self.local].unsqueeze(1),
                             U.transpose(1, 2)[self.local].contiguous())
        return self._per_row

    def per_row_values(self, values: list[torch.Tensor | None], missing: float) -> torch.Tensor:
        """[rows, 1, out]: each row's vector from `values` (one per adapter in parts' order), `missing` where none."""
        stack = self.parts[0][2].new_full((len(self.parts) + 1, self.out_features), missing)
        for i, v in enumerate(values):
            if v is not None:
                stack[i] = v
        return stack[self.local].unsqueeze(1)
