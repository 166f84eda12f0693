"""Trained token rows: tokens added to the vocabulary whose rows alone train, beside any method.

An adapter config's `new_tokens` are added to the tokenizer and the base's embeddings are resized to
hold them (PEFT's `trainable_token_indices` on a resized base). The adapter keeps only the tokens' rows,
[tokens, hidden], as ordinary parts: an Effect at the input embeddings putting the rows in for those
ids, and one at an untied output head computing those logit columns from its own rows (a tied head
reads the embedding part's rows: one shared row per token). The other rows of both tables stay the
base's. Merging writes the rows into the (resized) tables. The modules are found through transformers'
get_input_embeddings / get_output_embeddings, never by name.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import AdapterConfig
from .errors import AdapterkitError
from .sites import AdapterSite, Effect, cast_for_adapter, logical_modules

ROWS = "rows"  # the parameter of a token-rows part: saved as <module path>.rows, [tokens, hidden]


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    return module.base_layer if isinstance(module, AdapterSite) else module


def token_tables(model: nn.Module) -> tuple[str, nn.Module, str | None, nn.Module | None]:
    """(path, module) of the input embeddings and of the output head (None when the model has none)."""
    embeddings = _unwrapped(model.get_input_embeddings())
    head = _unwrapped(model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    paths = {id(module): path for path, module in logical_modules(model)}
    if id(embeddings) not in paths or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise AdapterkitError(f"new tokens need the model's input embedding table; {type(model).__name__} "
                              "exposes none through get_input_embeddings()")
    head_path = paths.get(id(head)) if head is not None else None
    return paths[id(embeddings)], embeddings, head_path, head if head_path is not None else None


def is_tied(embeddings: nn.Module, head: nn.Module | None) -> bool:
    return head is not None and head.weight is embeddings.weight


def extend_vocabulary(model: nn.Module, tokenizer, config: AdapterConfig) -> AdapterConfig:
    """Add the config's new tokens to the tokenizer and resize the model's tables to hold their rows;
    returns the config with the rows' ids. A config that already has ids (a saved adapter) must get the
    same ids: its tokens are added where the tokenizer lacks them. Called again, it changes nothing."""
    ids, tokens = config.token_ids, config.new_tokens
    if ids is None and not tokens:
        return config
    if tokens:
        if tokenizer is None:
            if ids is None:
                raise AdapterkitError("new_tokens need the model's tokenizer: pass tokenizer= to adapterkit.adapt")
        else:
            vocab = tokenizer.get_vocab()
            if ids is None:
                present = next((t for t in tokens if t in vocab), None)
                if present is not None:
                    raise AdapterkitError(f"new token {present!r} is already in the vocabulary (id {vocab[present]}); "
                                          "drop it from --new-tokens or pick a token the tokenizer lacks")
            tokenizer.add_tokens([t for t in tokens if t not in vocab])
            got = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
            if ids is not None and got != list(ids):
                raise AdapterkitError(f"this tokenizer gives the adapter's tokens {tokens} the ids {got}, the adapter "
                                      f"was trained with {list(ids)}; load it with its base model's own tokenizer")
            ids = got
    _resize(model, max(ids) + 1, config.token_head)
    return dataclasses.replace(config, token_ids=list(ids))


@torch.no_grad()
def _resize(model: nn.Module, rows: int, head_rows: bool) -> None:
    """Grow the tables to `rows` (transformers' resize, ties kept), new rows the mean of the old ones:
    a choice that draws nothing, so a fresh base resized at load time equals the one trained on."""
    _, embeddings, _, head = token_tables(model)
    old = embeddings.weight.shape[0]
    if rows <= old:
        return
    if isinstance(model.get_input_embeddings(), AdapterSite) or isinstance(model.get_output_embeddings(), AdapterSite):
        raise AdapterkitError("adding tokens resizes the embeddings, and another adapter already acts on them; "
                              "add the adapter with new tokens first")
    if head is not None and not is_tied(embeddings, head) and not head_rows:
        raise AdapterkitError(f"the adapter trains rows of tokens beyond the base vocabulary ({old} rows) but not "
                              "their output-head rows, so their logits depend on how that base was resized; "
                              "load it onto the resized base it was trained on")
    with torch.random.fork_rng(devices=[]):  # transformers' resize draws starting rows we replace below
        model.resize_token_embeddings(rows, mean_resizing=False)
    _, embeddings, _, head = token_tables(model)
    for table in {id(m.weight): m.weight for m in (embeddings, head) if m is not None}.values():
        table[old:] = table[:old].float().mean(0).to(table.dtype)
    if head is not None and getattr(head, "bias", None) is not None:
        head.bias[old:] = 0


class TokenRows(Effect):
    """The trained rows of some tokens in one table: looked up in place of the embedding rows, or giving
    those logit columns at the output head. `shared`: a tied head's part reads the embedding part's rows."""

    acts_on_output = True
    mergeable = True

    def __init__(self, table: nn.Module, ids: list[int], head: bool, shared: TokenRows | None = None):
        super().__init__()
        self.head = head
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self._shared = [shared] if shared is not None else []  # a list: not registered, not saved twice
        if shared is None:
            self.rows = nn.Parameter(table.weight.detach()[ids].float().clone())  # start at the table's rows (PEFT's)
        scale = getattr(table, "embed_scale", None)  # embeddings that scale their lookups
        self.register_buffer("scale", torch.as_tensor(scale).float() if scale is not None and not head else None,
                             persistent=False)
        bias = getattr(table, "bias", None) if head else None
        self.register_buffer("bias", bias.detach()[ids].float().clone() if bias is not None else None,
                             persistent=False)

    @property
    def tied(self) -> bool:
        """A tied head's part: it holds no rows of its own."""
        return bool(self._shared)

    def weight(self) -> torch.Tensor:
        return self._shared[0].rows if self._shared else self.rows

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = self.weight()
        if self.head:
            logits = cast_for_adapter(x, rows) @ rows.t()
            if self.bias is not None:
                logits = logits + self.bias
            return y.index_copy(-1, self.token_ids, logits.to(y.dtype))
        match = x.unsqueeze(-1) == self.token_ids  # [..., tokens]: which rows each position takes
        looked_up = rows[match.long().argmax(-1)]
        if self.scale is not None:
            looked_up = looked_up * self.scale
        return torch.where(match.any(-1, keepdim=True), looked_up.to(y.dtype), y)

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        if self._shared:
            return  # a tied head: the embedding part writes the one shared table
        weight = base_layer.weight
        if sign > 0:
            if not torch.isfinite(self.rows).all():
                raise AdapterkitError("merge would produce non-finite weights: a trained token row holds NaN or inf")
            self.original = weight[self.token_ids].clone()
            weight[self.token_ids] = self.rows.to(weight.dtype)
        else:
            weight[self.token_ids] = self.original
            del self.original


def token_row_parts(adapted, config: AdapterConfig) -> dict[str, nn.Module]:
    """The parts holding the config's token rows, keyed by module path (none without token ids)."""
    if config.token_ids is None:
        return {}
    model = adapted.causal_lm
    embedding_path, embeddings, head_path, head = token_tables(model)
    if max(config.token_ids) >= embeddings.weight.shape[0]:
        raise AdapterkitError(f"token id {max(config.token_ids)} is beyond the embedding table's "
                              f"{embeddings.weight.shape[0]} rows; add the tokens with token_rows.extend_vocabulary")
    parts: dict[str, nn.Module] = {embedding_path: TokenRows(embeddings, config.token_ids, head=False)}
    if head is not None and is_tied(embeddings, head):
        parts[head_path] = TokenRows(head, config.token_ids, head=True, shared=parts[embedding_path])
    elif head is not None and config.token_head:
        parts[head_path] = TokenRows(head, config.token_ids, head=True)
    return parts
