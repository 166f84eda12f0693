"""Mixed batches (one adapter per row) through the gathered product: every row equals its adapter run
alone over the whole batch, for LoRA and DoRA, with ranks, biases and rows without an adapter mixed in;
stacks are reused only while the weights stay the same; gradients reach each adapter as when run alone."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods import gathered
from adapterkit.methods.adalora import AdaloraConfig, AdaloraEffect
from adapterkit.methods.bottleneck import AdapterHConfig, AdapterPConfig, ParallelConfig, SeriesAdapter
from adapterkit.methods.lora_effects import DoraEffect, LoraEffect

ADAPTERS = {  # name: LoRA settings; two ranks in one gathered group
    "a": dict(r=4, alpha=8), "b": dict(r=4, alpha=4), "c": dict(r=2, alpha=8), "d": dict(r=4, alpha=8),
}
ROWS = ["a", "b", None, "c", "a", "d", "b", "c"]


def _adapters(use_dora: bool, bias: str = "none"):
    model = tiny_model("llama")
    with torch.no_grad():  # non-zero base biases, so DoRA's base term (y - bias) is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is None and module.out_features == 64:
                module.bias = torch.nn.Parameter(torch.randn(module.out_features) * 0.1)
    adapted = None
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        config = ak.LoraConfig(**settings, use_dora=use_dora, bias=bias, target_modules="all-linear")
        adapted = ak.adapt(adapted or model, config, name=name)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in adapted.adapter_state_dict(name).values():
                p.add_(torch.randn_like(p) * 0.2)
    return adapted.eval()


def _alone(adapted, ids, name):
    if name is None:
        with adapted.disabled():
            return adapted(input_ids=ids).logits
    adapted.set_active(name)
    return adapted(input_ids=ids).logits


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
@torch.no_grad()
def test_gathered_rows_equal_each_adapter_alone(use_dora, bias, monkeypatch):
    adapted = _adapters(use_dora, bias)
    ids = tiny_batch(batch=len(ROWS), length=7)["input_ids"]
    alone = {name: _alone(adapted, ids, name) for name in set(ROWS)}

    def refuse(*args):
        raise AssertionError("a mixed batch ran an adapter row by row instead of gathered")

    monkeypatch.setattr(LoraEffect, "on_output", refuse)
    monkeypatch.setattr(DoraEffect, "on_output", refuse)
    mixed = adapted(input_ids=ids, adapter_names=ROWS).logits
    for row, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)
    assert not torch.allclose(alone["a"], alone["d"], atol=1e-3)  # the adapters do differ


@torch.no_grad()
def test_a_reused_stack_follows_changed_weights():
    adapted = _adapters(use_dora=False)
    ids = tiny_batch(batch=len(ROWS), length=5)["input_ids"]
    adapted(input_ids=ids, adapter_names=ROWS)  # fills the stacks
    for p in adapted.adapter_state_dict("c").values():
        p.mul_(-1.5)  # in place, as an optimizer step or load_state_dict would
    mixed = adapted(input_ids=ids, adapter_names=ROWS).logits
    torch.testing.assert_close(mixed[3], _alone(adapted, ids, "c")[3], atol=1e-5, rtol=0)
    adapted.delete("d")
    rows = [n if n != "d" else None for n in ROWS]
    mixed = adapted(input_ids=ids, adapter_names=rows).logits
    torch.testing.assert_close(mixed[5], _alone(adapted, ids, None)[5], atol=1e-5, rtol=0)


def test_gradients_of_a_mixed_batch_equal_each_adapters_own():
    adapted = _adapters(use_dora=False)
    adapted.train()
    ids = tiny_batch(batch=len(ROWS), length=6)["input_ids"]
    adapted(input_ids=ids, labels=ids, adapter_names=ROWS).logits.float().pow(2).mean().backward()
    params = {n: adapted._parameters_of(adapted.records[n]) for n in ADAPTERS}
    mixed = {n: {k: p.grad.clone() for k, p in params[n].items()} for n in ADAPTERS}
    adapted.zero_grad()
    for name in ADAPTERS:  # each adapter alone, over its own rows: the same sum of squares over the batch
        rows = [i for i, n in enumerate(ROWS) if n == name]
        adapted.set_active(name)
        logits = adapted(input_ids=ids[rows]).logits.float()
        (logits.pow(2).sum() / (len(ROWS) * logits[0].numel())).backward()
        for key, p in params[name].items():
            torch.testing.assert_close(p.grad, mixed[name][key], atol=1e-6, rtol=1e-4)


BOTTLENECKS = {  # two shapes of series adapter, a parallel one (fed by a captured input: row by row), LoRA
    "h": lambda: AdapterHConfig(bottleneck_size=6, non_linearity="gelu", scaling=0.7),
    "p": lambda: AdapterPConfig(bottleneck_size=6, non_linearity="gelu", scaling=0.7),
    "p8": lambda: AdapterPConfig(bottleneck_size=8, non_linearity="gelu", scaling="learned"),
    "par": lambda: ParallelConfig(bottleneck_size=6, location="mlp", non_linearity="tanh", scaling=2.0),
    "lora": lambda: ak.LoraConfig(r=4, target_modules="all-linear"),
}


@torch.no_grad()
def test_bottleneck_rows_gather_and_equal_each_adapter_alone(monkeypatch):
    adapted = tiny_model("llama")
    for i, (name, config) in enumerate(BOTTLENECKS.items()):
        adapted = ak.adapt(adapted, config(), name=name)
        torch.manual_seed(i)
        for p in adapted._parameters_of(adapted.records[name]).values():
            p.add_(torch.randn_like(p) * 0.2)
    adapted.eval()
    rows = ["h", "par", None, "p8", "lora", "p", "h", "p8"]
    ids = tiny_batch(batch=len(rows), length=7)["input_ids"]
    alone = {name: _alone(adapted, ids, name) for name in set(rows)}
    monkeypatch.setattr(SeriesAdapter, "on_output", lambda *a: pytest.fail("a series adapter ran row by row"))
    mixed = adapted(input_ids=ids, adapter_names=rows).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "falcon", "opt", "qwen3"])
@torch.no_grad()
def test_gathered_rows_across_families(family):
    adapted = tiny_model(family)
    for i, (name, config) in enumerate({"a": ak.LoraConfig(r=4, target_modules="all-linear"),
                                        "b": ak.LoraConfig(r=4, target_modules="all-linear"),
                                        "h": AdapterHConfig(bottleneck_size=6)}.items()):
        adapted = ak.adapt(adapted, config, name=name)
        torch.manual_seed(i)
        for p in adapted._parameters_of(adapted.records[name]).values():
            p.add_(torch.randn_like(p) * 0.2)
    adapted.eval()
    rows = ["a", None, "b", "h"]
    ids = tiny_batch(batch=len(rows), length=6)["input_ids"]
    mixed = adapted(input_ids=ids, adapter_names=rows).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], _alone(adapted, ids, name)[row], atol=1e-5, rtol=0)


FORMS = {"side-by-side": 10**6, "per-row": 0}  # gathered.py's width limits that force one form of the product
KINDS = {  # LoRA of two ranks (one with bias deltas), DoRA of two ranks, AdaLoRA: all in one group per site
    "r4": lambda: ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "r2b": lambda: ak.LoraConfig(r=2, alpha=8, bias="lora_only", target_modules="all-linear"),
    "dora3": lambda: ak.LoraConfig(r=3, alpha=4, use_dora=True, target_modules="all-linear"),
    "dora5": lambda: ak.LoraConfig(r=5, alpha=4, use_dora=True, target_modules=["q_proj", "o_proj"]),
    "ada": lambda: AdaloraConfig(init_r=6, target_r=2, alpha=3, target_modules="all-linear"),
}


def _with(adapted, configs: dict):
    for i, (name, config) in enumerate(configs.items()):
        adapted = ak.adapt(adapted, config(), name=name)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in adapted._parameters_of(adapted.records[name]).values():
                p.add_(torch.randn_like(p) * 0.2)
    return adapted.eval()


SELECTS = {"rows-selected": 1.0, "all-rows": 0.0}  # gathered.SELECT_ROWS_UP_TO: compute the group's rows only, or all


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("length", [1, 5])
@pytest.mark.parametrize("select", SELECTS)
@torch.no_grad()
def test_lora_dora_adalora_of_mixed_ranks_run_as_one_group(form, length, select, monkeypatch):
    """Every low-rank adapter at a site, ranks 2 to 6, in one gathered group: padded (per row) or masked (side
    by side), each row equals its adapter alone; plain LoRA rows next to DoRA rows are left unscaled."""
    model = tiny_model("llama")
    with torch.no_grad():  # a base bias on q, so DoRA's base term (y - bias) is exercised
        q = model.model.layers[0].self_attn.q_proj
        q.bias = torch.nn.Parameter(torch.randn(q.out_features) * 0.1)
    adapted = _with(model, KINDS)
    rows = ["dora3", "r4", None, "ada", "r2b", "dora5", "r4", "dora3", "ada"]
    ids = tiny_batch(batch=len(rows), length=length)["input_ids"]
    alone = {name: _alone(adapted, ids, name) for name in set(rows)}
    monkeypatch.setattr(gathered, "SIDE_BY_SIDE_ONE_TOKEN", FORMS[form])
    monkeypatch.setattr(gathered, "SIDE_BY_SIDE_TOKENS", FORMS[form])
    monkeypatch.setattr(gathered, "SELECT_ROWS_UP_TO", SELECTS[select])
    for kind in (LoraEffect, DoraEffect, AdaloraEffect):
        monkeypatch.setattr(kind, "on_output", lambda *a: pytest.fail("an adapter ran row by row"))
    mixed = adapted(input_ids=ids, adapter_names=rows).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)
    site = model.model.layers[0].self_attn.q_proj
    assert [names for names, _, _ in site._gather_groups().values()] == [tuple(KINDS)]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("select", SELECTS)
@torch.no_grad()
def test_bottlenecks_of_mixed_sizes_run_as_one_group(form, select, monkeypatch):
    adapted = _with(tiny_model("llama"), {
        "h6": lambda: AdapterHConfig(bottleneck_size=6, non_linearity="gelu", scaling=0.7),
        "p3": lambda: AdapterPConfig(bottleneck_size=3, non_linearity="gelu", scaling="learned"),
        "p9": lambda: AdapterPConfig(bottleneck_size=9, non_linearity="gelu", scaling=1.3)})
    rows = ["p9", "h6", None, "p3", "h6", "p9"]
    ids = tiny_batch(batch=len(rows), length=4)["input_ids"]
    alone = {name: _alone(adapted, ids, name) for name in set(rows)}
    monkeypatch.setattr(gathered, "SIDE_BY_SIDE_TOKENS", FORMS[form])
    monkeypatch.setattr(gathered, "SELECT_ROWS_UP_TO", SELECTS[select])
    monkeypatch.setattr(SeriesAdapter, "on_output", lambda *a: pytest.fail("a series adapter ran row by row"))
    mixed = adapted(input_ids=ids, adapter_names=rows).logits
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)
    site = adapted.causal_lm.model.layers[0].mlp.down_proj
    assert [names for names, _, _ in site._gather_groups().values()] == [("h6", "p3", "p9")]


@torch.no_grad()
def test_an_adapter_deleted_and_added_again_under_its_name_is_the_new_one():
    """The sites' cached groups, stacks and decoding plans follow the adapter objects, not their names or the
    addresses of their weights (a new adapter of the same shapes may get the freed memory of the old)."""
    adapted = _adapters(use_dora=False)
    ids = tiny_batch(batch=len(ROWS), length=3)["input_ids"]
    adapted(input_ids=ids, adapter_names=ROWS)  # fills the groups, stacks and plans
    for replaced in ("d", "b"):  # the last added (the sites' names in the same order), then another one
        adapted.delete(replaced)
        ak.adapt(adapted, ak.LoraConfig(**ADAPTERS[replaced], target_modules="all-linear"), name=replaced)
        torch.manual_seed(7)
        for p in adapted.adapter_state_dict(replaced).values():
            p.add_(torch.randn_like(p) * 0.3)
        adapted.eval()
        mixed = adapted(input_ids=ids, adapter_names=ROWS).logits
        for row, name in enumerate(ROWS):
            torch.testing.assert_close(mixed[row], _alone(adapted, ids, name)[row], atol=1e-5, rtol=0)


@torch.no_grad()
def test_decoding_steps_follow_rows_joining_and_leaving():
    """A served batch changes its rows between steps (a request joins, one finishes): each step's rows run
    their own adapters, whatever the cached plan of the step before."""
    adapted = _adapters(use_dora=True)
    ids = tiny_batch(batch=len(ROWS), length=4)["input_ids"]
    alone = {name: _alone(adapted, ids, name) for name in set(ROWS)}
    for rows in (ROWS, ROWS[::-1], ["a"] * 8, [None, "c"] * 4, ROWS, [None] * 8, ROWS):
        mixed = adapted(input_ids=ids, adapter_names=rows).logits
        for row, name in enumerate(rows):
            torch.testing.assert_close(mixed[row], alone[name][row], atol=1e-5, rtol=0)
        plan = adapted.causal_lm.model.layers[0].self_attn.q_proj._plan[1]  # ran the cached decoding plan
        assert plan is None if set(rows) == {None} else len(plan) == 1
