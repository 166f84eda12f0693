"""Combining LoRA adapters (add_weighted_adapter, `adapterkit combine`): each combination against a hand
computation on small tensors, against PEFT 0.21.2's add_weighted_adapter on a tiny LLaMA (same merged
updates, same logits), cat against both adapters running at once, and the CLI end to end."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from peft.utils import merge_utils
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.methods.combining import Combination, merge_tensors, trim
from adapterkit.recipes.common import generation_info

Q0 = "model.layers.0.self_attn.q_proj"  # the first targeted module: its masks are the first drawn


def logits(model, batch=None):
    batch = batch or tiny_batch()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def randomize(adapted, name, seed, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapter_state_dict(name).values():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def update(part):
    """scaling * B @ A, the update a LoRA part adds to its layer's weight."""
    return part.scaling * part.lora_B @ part.lora_A


# ----- by hand, entry by entry, in plain Python ------------------------------------------------------
def sign(v: float) -> int:
    return (v > 0) - (v < 0)


def hand_trim(values: list[float], density: float) -> list[float]:
    k = int(density * len(values))
    kept = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
    return [v if i in kept else 0.0 for i, v in enumerate(values)]


def hand_disjoint(tensors: list[list[float]], weights: list[float], method: str) -> list[float]:
    """Elect a sign per entry (sum of values, or of signs; 0 counts as +), average the agreeing weighted values."""
    out = []
    for j in range(len(tensors[0])):
        values = [t[j] for t in tensors]
        vote = sum(values) if method == "total" else sum(sign(v) for v in values)
        elected = 1 if vote >= 0 else -1
        agree = [i for i, v in enumerate(values) if sign(v) == elected]
        out.append(sum(weights[i] * values[i] for i in agree) / max(len(agree), 1))
    return out


def hand(tensors: list[torch.Tensor], weights: list[float], rule: str, density: float, method: str = "total",
         masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    flat = [t.flatten().tolist() for t in tensors]
    if rule == "ties":
        flat = [hand_trim(values, density) for values in flat]
    if rule.startswith("dare"):  # keep where the mask is 1, divided by density
        flat = [[v * m / density for v, m in zip(values, mask.flatten().tolist(), strict=True)]
                for values, mask in zip(flat, masks, strict=True)]
    if rule == "dare_linear":
        out = [sum(w * values[j] for w, values in zip(weights, flat, strict=True)) for j in range(len(flat[0]))]
    else:
        out = hand_disjoint(flat, weights, method)
    return torch.tensor(out).view(tensors[0].shape)


def seeded_masks(seed: int, shapes: list[tuple[int, ...]], density: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full(shape, density), generator=generator) for shape in shapes]


def test_trim_keeps_the_largest_magnitudes():
    t = torch.tensor([[0.5, -2.0, 0.1], [3.0, -0.2, 1.0]])
    assert torch.equal(trim(t, 0.5), torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, 1.0]]))
    assert torch.equal(trim(t, 1.0), t)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_on_small_tensors_by_hand(method):
    a = torch.tensor([[1.0, -0.2, 0.3], [-0.9, 0.5, 0.05]])
    b = torch.tensor([[-0.4, -0.6, 0.2], [0.8, -0.1, 0.7]])
    c = torch.tensor([[-0.3, 0.25, -0.8], [0.1, 0.45, 0.6]])
    weights = [0.7, 0.3, 1.2]
    got = merge_tensors([a, b, c], weights, Combination("ties", density=0.5, majority_sign_method=method))
    assert torch.allclose(got, hand([a, b, c], weights, "ties", 0.5, method), atol=1e-7)
    # entry (0, 0): trimmed values 1.0, -0.4, 0 (c's -0.3 is trimmed): total 0.6 elects +, only a agrees
    assert got[0, 0].item() == pytest.approx(0.7 * 1.0)


@pytest.mark.parametrize("rule", ["dare_linear", "dare_ties"])
def test_dare_on_small_tensors_by_hand(rule):
    a, b = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), torch.randn(4, 5)
    masks = seeded_masks(7, [a.shape, b.shape], 0.6)
    got = merge_tensors([a, b], [0.8, -0.5], Combination(rule, density=0.6, seed=7),
                        torch.Generator().manual_seed(7))
    assert torch.allclose(got, hand([a, b], [0.8, -0.5], rule, 0.6, masks=masks), atol=1e-6)
    assert 0 < sum(int(m.sum()) for m in masks) < 40  # something was dropped, something kept


# ----- on a tiny LLaMA's adapters, by hand -------------------------------------------------------------
def two_adapters(rank_b=2, alpha_b=6.0, dora=False):
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=2, alpha=4), name="a")
    ak.adapt(adapted, ak.LoraConfig(r=rank_b, alpha=alpha_b, use_dora=dora), name="b")
    randomize(adapted, "a", 1)
    randomize(adapted, "b", 2)
    return adapted


@torch.no_grad()
def test_cat_equals_both_adapters_at_once():
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=2, alpha=4, rank_pattern={"v_proj": 4},
                                                           alpha_pattern={"v_proj": 2.0}), name="a")
    ak.adapt(adapted, ak.LoraConfig(r=3, alpha=6, use_rslora=True), name="b")
    randomize(adapted, "a", 1)
    randomize(adapted, "b", 2)
    adapted.set_active("a", "b")
    both = logits(adapted)
    adapted.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination="cat")
    adapted.set_active("cat")
    assert (logits(adapted) - both).abs().max() <= 1e-5
    parts = adapted.records["cat"].parts
    assert parts[Q0].lora_A.shape[0] == 5 and parts["model.layers.0.self_attn.v_proj"].lora_A.shape[0] == 7


@torch.no_grad()
def test_linear_with_a_negative_weight_by_hand():
    adapted = two_adapters()
    adapted.add_weighted_adapter(["a", "b"], [0.5, -2.0], "lin", combination="linear")
    a, b, lin = (adapted.records[n].parts[Q0] for n in ("a", "b", "lin"))
    ka, kb = math.sqrt(0.5 * a.scaling), math.sqrt(2.0 * b.scaling)  # the sign goes on A only
    expected = (ka * a.lora_B + kb * b.lora_B) @ (ka * a.lora_A - kb * b.lora_A)
    assert lin.scaling == 1.0 and torch.allclose(update(lin), expected, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("rank", [None, 2, 4])
def test_svd_against_torch_linalg_svd_of_the_summed_update(rank):
    adapted = two_adapters(rank_b=3)
    adapted.add_weighted_adapter(["a", "b"], [0.7, 0.4], "svd", combination="svd", svd_rank=rank)
    a, b, svd = (adapted.records[n].parts[Q0] for n in ("a", "b", "svd"))
    summed = 0.7 * update(a) + 0.4 * update(b)
    u, s, vh = torch.linalg.svd(summed)
    r = rank or 3  # default: the largest rank combined
    assert svd.lora_A.shape[0] == r and svd.scaling == 1.0
    assert torch.allclose(update(svd), u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-5)
    if r >= 5:  # 2 + 3: nothing is cut
        assert torch.allclose(update(svd), summed, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("how", ["ties", "dare_linear", "dare_ties"])
def test_pruning_combinations_act_on_the_stacked_factors_by_hand(how):
    adapted = two_adapters()
    weights = [0.9, -0.6]
    adapted.add_weighted_adapter(["a", "b"], weights, how, combination=how, density=0.5, seed=3,
                                 majority_sign_method="frequency")
    a, b, new = (adapted.records[n].parts[Q0] for n in ("a", "b", how))
    weights_a = [math.copysign(math.sqrt(abs(w * p.scaling)), w) for w, p in zip(weights, (a, b), strict=True)]
    weights_b = [math.sqrt(abs(w * p.scaling)) for w, p in zip(weights, (a, b), strict=True)]
    shapes = [a.lora_A.shape, b.lora_A.shape, a.lora_B.shape, b.lora_B.shape]
    masks = seeded_masks(3, shapes, 0.5)  # Q0 comes first; its A's draw before its B's
    expected_a = hand([a.lora_A, b.lora_A], weights_a, how, 0.5, "frequency", masks[:2])
    expected_b = hand([a.lora_B, b.lora_B], weights_b, how, 0.5, "frequency", masks[2:])
    assert torch.allclose(new.lora_A, expected_a, atol=1e-6) and torch.allclose(new.lora_B, expected_b, atol=1e-6)


def test_bad_combinations_are_one_clear_error():
    adapted = two_adapters(rank_b=3)
    with pytest.raises(ak.AdapterkitError, match="needs equal ranks"):
        adapted.add_weighted_adapter(["a", "b"], [1, 1], "t", combination="ties", density=0.5)
    with pytest.raises(ak.AdapterkitError, match="needs a density"):
        adapted.add_weighted_adapter(["a", "a"], [1, 1], "t", combination="dare_ties")
    with pytest.raises(ak.AdapterkitError, match=r"density must be in \(0, 1\]"):
        adapted.add_weighted_adapter(["a", "a"], [1, 1], "t", combination="ties", density=1.5)
    with pytest.raises(ak.AdapterkitError, match="one weight per adapter"):
        adapted.add_weighted_adapter(["a", "b"], [1], "t")
    with pytest.raises(ak.AdapterkitError, match="svd_rank 40 exceeds"):
        adapted.add_weighted_adapter(["a", "b"], [1, 1], "t", combination="svd", svd_rank=40)
    with pytest.raises(ak.AdapterkitError, match="finite numbers"):
        adapted.add_weighted_adapter(["a", "b"], [1, float("nan")], "t")
    ak.adapt(adapted, ak.LoraConfig(r=2, target_modules=["o_proj"]), name="o")
    with pytest.raises(ak.AdapterkitError, match="target different modules"):
        adapted.add_weighted_adapter(["a", "o"], [1, 1], "t")
    dora = two_adapters(dora=True)
    with pytest.raises(ak.AdapterkitError, match="is DoRA"):
        dora.add_weighted_adapter(["a", "b"], [1, 1], "t")
    assert "t" not in adapted.records and "t" not in dora.records


# ----- PEFT's add_weighted_adapter as the oracle ------------------------------------------------------
PEFT_KINDS = ["cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "ties_svd", "dare_linear_svd",
              "dare_ties_svd"]
SETUP = {"x": (4, 8.0), "y": (4, 16.0), "z": (2, 6.0)}  # name: (r, alpha)
TARGETS = ["q_proj", "v_proj"]


def peft_and_ours():
    peft_model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS), adapter_name="x")
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4, alpha=8, target_modules=TARGETS), name="x")
    for name, (r, alpha) in SETUP.items():
        if name != "x":
            peft_model.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
            ak.adapt(adapted, ak.LoraConfig(r=r, alpha=alpha, target_modules=TARGETS), name=name)
    generator = torch.Generator().manual_seed(11)
    ours = {n: adapted.adapter_state_dict(n) for n in SETUP}
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if ".lora_" in key:
                module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
                factor, name, _ = rest.split(".")
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                ours[name][f"{module}.lora_{factor}"].copy_(p)
    return peft_model.eval(), adapted


@torch.no_grad()
@pytest.mark.parametrize("how", PEFT_KINDS)
def test_same_update_and_logits_as_peft(how, monkeypatch):
    peft_model, adapted = peft_and_ours()
    names = ["x", "z"] if how in ("cat", "svd") else ["x", "y"]  # cat and svd take unequal ranks
    weights, seed = [0.7, -0.4], 5
    options = {"density": 0.5} if "ties" in how or "dare" in how else {}
    original = merge_utils.random_pruning
    drawn = []

    def seeded_first(*args, **kwargs):  # PEFT draws from the global generator: seed it at its first draw
        if not drawn:
            torch.manual_seed(seed)
        drawn.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded_first)
    peft_model.add_weighted_adapter(names, weights, "m", combination_type=how, **options)
    adapted.add_weighted_adapter(names, weights, "m", combination=how, seed=seed, **options)
    assert bool(drawn) == ("dare" in how)
    for path in adapted.records["m"].parts:
        theirs = peft_model.base_model.model.get_submodule(path).get_delta_weight("m")
        ours = adapted.records["m"].parts[path].delta_weight()
        assert ours.abs().max() > 1e-3 and (ours - theirs).abs().max() <= 1e-5, path
    peft_model.set_adapter("m")
    adapted.set_active("m")
    assert (logits(adapted) - logits(tiny_model("llama"))).abs().max() > 1e-3
    assert (logits(adapted) - logits(peft_model)).abs().max() <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("how", ["svd", "ties"])
def test_same_update_as_peft_on_a_transposed_layer(how):
    """GPT-2's Conv1D keeps its weight as (in, out): the combined factors still give PEFT's update."""
    config = dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(tiny_model("gpt2"), peft.LoraConfig(lora_alpha=4, **config), adapter_name="x")
    peft_model.add_adapter("y", peft.LoraConfig(lora_alpha=2, **config))
    adapted = ak.adapt(tiny_model("gpt2"), ak.LoraConfig(r=2, alpha=4, target_modules=["c_attn"]), name="x")
    ak.adapt(adapted, ak.LoraConfig(r=2, alpha=2, target_modules=["c_attn"]), name="y")
    generator = torch.Generator().manual_seed(3)
    for key, p in peft_model.named_parameters():
        if ".lora_" in key:
            module, _, rest = key.removeprefix("base_model.model.").partition(".lora_")
            factor, name, _ = rest.split(".")
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            adapted.adapter_state_dict(name)[f"{module}.lora_{factor}"].copy_(p)
    options = {"density": 0.6} if how == "ties" else {}
    peft_model.add_weighted_adapter(["x", "y"], [0.6, 0.9], "m", combination_type=how, **options)
    adapted.add_weighted_adapter(["x", "y"], [0.6, 0.9], "m", combination=how, **options)
    for path, part in adapted.records["m"].parts.items():
        theirs = peft_model.base_model.model.get_submodule(path).get_delta_weight("m")
        assert part.delta_weight().abs().max() > 1e-3 and (part.delta_weight() - theirs).abs().max() <= 1e-5, path
    peft_model.set_adapter("m")
    adapted.set_active("m")
    assert (logits(adapted) - logits(peft_model)).abs().max() <= 1e-5


# ----- the CLI, end to end ------------------------------------------------------------------------------
def saved_adapter(model_dir, folder, seed, r=2, alpha=4.0, **options):
    model, tokenizer = ak.load_model(str(model_dir))
    adapted = ak.adapt(model, ak.LoraConfig(r=r, alpha=alpha, **options), tokenizer=tokenizer)
    randomize(adapted, "default", seed)
    adapted.records["default"].trained_steps = 5
    adapted.generation_info = generation_info(tokenizer, "bare")
    adapted.save(folder)
    return folder


def combined_logits(model_dir, folder):
    model, _ = ak.load_model(str(model_dir))
    return logits(ak.load(model, folder))


@torch.no_grad()
def by_hand_logits(model_dir, sources, weights):
    """The base model with sum_i w_i s_i B_i A_i added to each targeted weight, by plain algebra."""
    model, _ = ak.load_model(str(model_dir))
    for folder, w in zip(sources, weights, strict=True):
        meta = json.loads((folder / "adapter_config.json").read_text())
        scaling = meta["config"]["alpha"] / meta["config"]["r"]
        tensors = load_file(folder / "adapter_model.safetensors")
        for module in meta["modules"]:
            delta = tensors[f"{module}.lora_B"] @ tensors[f"{module}.lora_A"]
            model.get_submodule(module).weight += w * scaling * delta
    return logits(model)


@pytest.mark.parametrize("how, extra", [("cat", []), ("svd", ["--svd-rank", "5"])])
def test_cli_combines_saved_adapters_exactly(tiny_llama_dir, tmp_path, how, extra, capsys):
    a = saved_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    b = saved_adapter(tiny_llama_dir, tmp_path / "b", seed=2, r=3, alpha=9.0)
    out = tmp_path / "out"
    assert main(["combine", str(a), str(b), "--weights", "-0.7,0.3", "--how", how, *extra, "--model",
                 str(tiny_llama_dir), "--output", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 5 and meta["trained_steps"] == 5
    assert meta["fingerprint"]["max_change"] > 1e-3
    assert (combined_logits(tiny_llama_dir, out) - by_hand_logits(tiny_llama_dir, [a, b], [-0.7, 0.3])).abs().max() \
        <= 1e-5
    assert main(["verify", str(out), "--model", str(tiny_llama_dir)]) == 0


def test_cli_dare_is_seeded(tiny_llama_dir, tmp_path):
    a = saved_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    b = saved_adapter(tiny_llama_dir, tmp_path / "b", seed=2)

    def run(out, seed):
        assert main(["combine", str(a), str(b), "--weights", "0.5,0.5", "--how", "dare_ties", "--density", "0.5",
                     "--seed", str(seed), "--output", str(tmp_path / out)]) == 0  # the model recorded in them
        return load_file(tmp_path / out / "adapter_model.safetensors")

    first, again, other = run("x", 1), run("y", 1), run("z", 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert any((t == 0).any() for t in first.values())  # entries were dropped
    model, _ = ak.load_model(str(tiny_llama_dir))
    assert (logits(ak.load(model, tmp_path / "x")) - logits(ak.load_model(str(tiny_llama_dir))[0])).abs().max() > 0


def test_cli_refuses_a_combination_that_changes_nothing(tiny_llama_dir, tmp_path, capsys):
    a = saved_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    out = tmp_path / "out"
    assert main(["combine", str(a), str(a), "--weights", "1,-1", "--how", "linear", "--model", str(tiny_llama_dir), "--output",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gives exactly the base model's logits" in err[0] and not out.exists()
