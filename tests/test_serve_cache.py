"""The serving batch's growing cache layer: the same keys, values and logits as transformers' DynamicLayer
(which appends by concatenation), through appends past its spare room, rows joining and rows leaving."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from adapterkit.serving import cache as growing_cache
from adapterkit.serving.cache import GrowingLayer, growing


@pytest.fixture
def small_room(monkeypatch):
    monkeypatch.setattr(growing_cache, "ROOM", 3)  # regrow every few steps


def _kv(generator, rows, length):
    return (torch.randn(rows, 2, length, 4, generator=generator), torch.randn(rows, 2, length, 4, generator=generator))


def test_appends_equal_concatenation_through_regrowth_joins_and_leaves(small_room):
    generator = torch.Generator().manual_seed(0)
    plain, grown = DynamicLayer(), GrowingLayer()
    for step in range(20):
        k, v = _kv(generator, plain.keys.shape[0] if step else 3, 5 if step == 0 else 1 + (step % 4 == 0))
        expected, got = plain.update(k, v), grown.update(k, v)
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g)
        assert grown.get_seq_length() == plain.get_seq_length()
        if step == 8:  # rows leave and leading columns go (Batch.keep)
            for layer in (plain, grown):
                layer.keys, layer.values = layer.keys[[0, 2], :, 2:], layer.values[[0, 2], :, 2:]
            k_join, v_join = _kv(generator, 1, 3)
        if step == 12:  # a row joins, left-padded with zeros (Batch.join): by hand, and by GrowingLayer.join
            length = plain.keys.shape[-2]
            zeros = torch.zeros(1, 2, length - 3, 4)
            plain.keys = torch.cat([plain.keys, torch.cat([zeros, k_join], -2)])
            plain.values = torch.cat([plain.values, torch.cat([zeros, v_join], -2)])
            assert grown.join(GrowingLayer(k_join, v_join), length)
            assert not grown.join(GrowingLayer(k_join, v_join), 2)  # longer than the length asked: refused
        if step > 12:
            assert grown.keys.shape[0] == 3
    # the stored tensors are not the caller's: later appends never write into a tensor handed in
    k, v = _kv(generator, 3, 2)
    layer = GrowingLayer(k.clone(), v.clone())
    layer.update(*_kv(generator, 3, 1))
    assert torch.equal(layer.keys[:, :, :2], k)


@torch.no_grad()
def test_decoding_with_growing_layers_gives_the_same_logits(small_room):
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    runs = []
    for convert in (False, True):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, m, p = out.cache, mask, positions[:, -1:] + 1
        if convert:
            assert growing(cache)
        logits = [out.logits[:, -1]]
        for _ in range(12):
            token = logits[-1].argmax(-1, keepdim=True)
            m = torch.cat([m, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=m, position_ids=p, cache=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            p = p + 1
        assert all(type(layer) is (GrowingLayer if convert else DynamicLayer) for layer in cache.layers)
        runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])


def test_sliding_window_caches_stay_as_they_are():
    class Cache:
        layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)]

    cache = Cache()
    assert not growing(cache)
    assert type(cache.layers[0]) is DynamicLayer
