"""One case per registered method, keyed by its name in adapterkit.METHODS: how tests/test_families.py
builds it on a tiny family and what it must then do.

The expected parameter counts are written out from the method's definition and the tiny models'
sizes (tests/tiny_models.py: hidden 32, 2 layers, 4 heads of 8, key/value heads as in KV_HEADS),
not read back from adapterkit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tiny_models import HEADS, HIDDEN, LAYERS, TODAY_FAMILIES, tiny_model
from torch import Tensor

import adapterkit as ak
from adapterkit.architectures import is_linear, linear_shape

K = 4  # virtual tokens of the prompt methods
BOTTLENECK = 8
ENCODER = 16  # encoder / projection width of p-tuning and prefix-tuning
HEAD_DIM = HIDDEN // HEADS
# Optimizer steps on one fixed batch. Each loss_drop below is about half the smallest drop any family
# showed in STEPS steps (torch 2.13, transformers 5.24): lora 1.30, adapter-h 0.83, adapter-p 0.54,
# parallel 1.19, prompt-tuning 0.107, p-tuning 0.167, prefix-tuning 0.73, p-tuning-v2 0.146,
# loha 0.42, lokr 0.51, vera 0.43, oft 0.87.
STEPS = 15
# Key/value heads of each tiny family, from its config in tiny_models.py (grouped or multi-query).
KV_HEADS = {"llama": 2, "mistral": 2, "qwen2": 2, "gemma": 1, "falcon": 1, **dict.fromkeys(TODAY_FAMILIES, 2)}


def kv_width(family: str) -> int:
    """One layer's keys for one token: key/value heads x head size."""
    return KV_HEADS.get(family, HEADS) * HEAD_DIM


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@dataclass(frozen=True)
class MethodCase:
    """The shared scenario's knobs for one method."""

    config: Callable[[str], ak.AdapterConfig]      # family -> the config attached
    starts_as_base: bool                           # exactly the base model's logits before training
    trainable: Callable[[str, ak.AdaptedModel], int]  # (family, adapted) -> expected trainable parameters
    lr: float
    steps: int
    loss_drop: float                               # the last loss must be this much below the first
    mergeable: bool
    check_attached: Callable[[str, ak.AdaptedModel], None] | None = None  # right after adapt
    check_saved: Callable[[ak.AdaptedModel, dict[str, Tensor]], None] | None = None  # the saved tensors
    refuses: Callable[[str], str | None] | None = None  # family -> the error attaching gives (a regex), or None


# ----- LoRA ---------------------------------------------------------------------------------------
def _lora_config(family: str) -> ak.LoraConfig:
    return ak.LoraConfig(r=4, alpha=8, target_modules="all-linear")


def _lora_trainable(family: str, adapted) -> int:
    """r x (in + out) per targeted linear layer (A is r x in, B is out x r)."""
    return sum(4 * sum(linear_shape(adapted.causal_lm.get_submodule(p).base_layer)[:2])
               for p in adapted.records["default"].parts)


def _lora_targets(family: str, adapted) -> None:
    """Default targets: query and value (or the fused qkv) of each layer; all-linear: every linear
    layer of the decoder, not the head."""
    arch = adapted.layout.arch
    default = ak.adapt(tiny_model(family), ak.LoraConfig()).records["default"].parts
    assert len(default) == LAYERS * (1 if arch.qkv else 2)
    targets = adapted.records["default"].parts
    in_layers = [p for p, m in tiny_model(family).named_modules()
                 if p.startswith(arch.layers + ".") and is_linear(m)]  # every linear layer the decoder has
    assert sorted(targets) == sorted(in_layers)
    assert "lm_head" not in targets
    assert all(is_linear(adapted.causal_lm.get_submodule(p).base_layer) for p in targets)


# ----- bottleneck adapters -------------------------------------------------------------------------
def _bottleneck(config_class, per_layer: int, loss_drop: float) -> MethodCase:
    """down d -> b and up b -> d with biases, `per_layer` adapters in each layer."""
    return MethodCase(
        config=lambda family: config_class(bottleneck_size=BOTTLENECK),
        starts_as_base=True,  # identity init: the up-projection starts at zero
        trainable=lambda family, adapted: per_layer * LAYERS * (linear_params(HIDDEN, BOTTLENECK)
                                                                + linear_params(BOTTLENECK, HIDDEN)),
        lr=3e-2, steps=STEPS, loss_drop=loss_drop, mergeable=False)


# ----- prompt methods ------------------------------------------------------------------------------
def _prompt_final_saved(adapted, tensors: dict[str, Tensor]) -> None:
    """The prompt in use is saved beside the weights, so inference needs no encoder."""
    assert torch.equal(tensors["prompt.final"], adapted.input_hooks["default"].final().detach())


def _prompt(config, trainable, loss_drop: float) -> MethodCase:
    return MethodCase(config=config, starts_as_base=False, trainable=trainable, lr=5e-2, steps=STEPS,
                      loss_drop=loss_drop, mergeable=False, check_saved=_prompt_final_saved)


def _p_tuning_trainable(family: str, adapted) -> int:
    """k input embeddings, then an MLP d -> h -> h -> d."""
    return K * HIDDEN + linear_params(HIDDEN, ENCODER) + linear_params(ENCODER, ENCODER) \
        + linear_params(ENCODER, HIDDEN)


def _prefix_tuning_trainable(family: str, adapted) -> int:
    """k embeddings of one layer's key width w, then an MLP w -> h -> layers x (key, value) x w."""
    w = kv_width(family)
    return K * w + linear_params(w, ENCODER) + linear_params(ENCODER, LAYERS * 2 * w)


# ----- (IA)3 -----------------------------------------------------------------------------------------
def _ia3_trainable(family: str, adapted) -> int:
    """One scale per output feature of the key and value projections (or the fused qkv), and per input
    feature of the MLP's output projection, read from the modules' own shapes."""
    model, arch = tiny_model(family), adapted.layout.arch
    total = 0
    for i in range(LAYERS):
        layer = model.get_submodule(f"{arch.layers}.{i}")
        for role in ("qkv",) if arch.qkv else ("k", "v"):
            total += linear_shape(layer.get_submodule(getattr(arch, role)))[1]
        mlp_out = layer.get_submodule(arch.mlp_out)
        total += linear_shape(mlp_out)[0] if is_linear(mlp_out) else 0
    return total


# ----- weight-update methods (LoHa, LoKr, VeRA, OFT) ----------------------------------------------------
def _refuses_conv1d(family: str) -> str | None:
    """PEFT's LoHa, LoKr and OFT take nn.Linear only: a family with Conv1D layers (in x out) is refused."""
    model = tiny_model(family)
    return "it is a Conv1D layer" if any(is_linear(m) and linear_shape(m)[2] for m in model.modules()) else None


def _targeted_shapes(adapted) -> list[tuple[int, int]]:
    """(in, out) of every targeted linear layer."""
    return [linear_shape(adapted.causal_lm.get_submodule(p).base_layer)[:2] for p in adapted.records["default"].parts]


def _loha_trainable(family: str, adapted) -> int:
    """Two pairs W1a/W2a [out, r], W1b/W2b [r, in] per targeted linear layer, r = 2."""
    return sum(2 * 2 * (n_in + n_out) for n_in, n_out in _targeted_shapes(adapted))


def _lokr_trainable(family: str, adapted) -> int:
    """decompose_factor 4, r 2: out = a c, in = b d with a = b = 4 (a 1-wide output, the shared-expert gate of
    some MoE blocks, is 1 x 1); W1 whole [a, b], W2 split [c, 2] [2, d] (r < max(c, d) / 2: every targeted
    layer of the tiny models reads at least 32 features, so d >= 8)."""
    def split(n: int) -> tuple[int, int]:
        return (4, n // 4) if n % 4 == 0 else (1, n)
    return sum(split(n_out)[0] * split(n_in)[0] + 2 * (split(n_out)[1] + split(n_in)[1])
               for n_in, n_out in _targeted_shapes(adapted))


def _vera_trainable(family: str, adapted) -> int:
    """lambda_b over the output features and lambda_d over r = 16, per targeted linear layer (the shared
    projections are frozen)."""
    return sum(n_out + 16 for _, n_out in _targeted_shapes(adapted))


def _adalora_trainable(family: str, adapted) -> int:
    """init_r = 4 triplets per targeted linear layer: Q [4, in], P [out, 4], Lambda [4, 1]."""
    return sum(4 * (n_in + n_out + 1) for n_in, n_out in _targeted_shapes(adapted))


def _oft_trainable(family: str, adapted) -> int:
    """Blocks of size 8: in / 8 skew-symmetric blocks of 8 x 7 / 2 = 28 numbers per targeted linear layer."""
    return sum(n_in // 8 * 28 for n_in, _ in _targeted_shapes(adapted))


CASES: dict[str, MethodCase] = {
    "lora": MethodCase(config=_lora_config, starts_as_base=True, trainable=_lora_trainable, lr=1e-2, steps=STEPS,
                       loss_drop=0.6, mergeable=True, check_attached=_lora_targets),
    "adapter-h": _bottleneck(ak.AdapterHConfig, per_layer=2, loss_drop=0.4),  # after attention and after the MLP
    "adapter-p": _bottleneck(ak.AdapterPConfig, per_layer=1, loss_drop=0.25),  # after the MLP
    "parallel": _bottleneck(ak.ParallelConfig, per_layer=1, loss_drop=0.5),   # beside the MLP
    "prompt-tuning": _prompt(lambda family: ak.PromptTuningConfig(num_virtual_tokens=K),
                             lambda family, adapted: K * HIDDEN, loss_drop=0.05),
    "p-tuning": _prompt(lambda family: ak.PTuningConfig(num_virtual_tokens=K, encoder_hidden_size=ENCODER),
                        _p_tuning_trainable, loss_drop=0.08),
    "prefix-tuning": _prompt(
        lambda family: ak.PrefixTuningConfig(num_virtual_tokens=K, encoder_hidden_size=ENCODER),
        _prefix_tuning_trainable, loss_drop=0.3),
    "ia3": MethodCase(config=lambda family: ak.get_method("ia3").config_class(), starts_as_base=True,
                      trainable=_ia3_trainable, lr=5e-2, steps=STEPS, loss_drop=0.2, mergeable=True),
    "loha": MethodCase(config=lambda family: ak.get_method("loha").config_class(r=2, target_modules="all-linear"),
                       starts_as_base=True, trainable=_loha_trainable, lr=1e-2, steps=STEPS, loss_drop=0.2,
                       mergeable=True, refuses=_refuses_conv1d),
    "lokr": MethodCase(config=lambda family: ak.get_method("lokr").config_class(
                           r=2, decompose_factor=4, target_modules="all-linear"),
                       starts_as_base=True, trainable=_lokr_trainable, lr=1e-2, steps=STEPS, loss_drop=0.25,
                       mergeable=True, refuses=_refuses_conv1d),
    "vera": MethodCase(config=lambda family: ak.get_method("vera").config_class(r=16, target_modules="all-linear"),
                       starts_as_base=True, trainable=_vera_trainable, lr=5e-2, steps=STEPS, loss_drop=0.2,
                       mergeable=True),
    "oft": MethodCase(config=lambda family: ak.get_method("oft").config_class(block_size=8, target_modules="all-linear"),
                      starts_as_base=True, trainable=_oft_trainable, lr=1e-2, steps=STEPS, loss_drop=0.4,
                      mergeable=True, refuses=_refuses_conv1d),
    # A long schedule: 15 steps drop a few triplets (a layer left with none would end with Lambda at its
    # starting zero); tests/test_adalora.py runs schedules to their end.
    "adalora": MethodCase(config=lambda family: ak.get_method("adalora").config_class(
                              init_r=4, target_r=3, tinit=2, tfinal=3, total_step=400, target_modules="all-linear"),
                          starts_as_base=True, trainable=_adalora_trainable, lr=1e-2, steps=STEPS, loss_drop=0.2,
                          mergeable=True),
    "p-tuning-v2": _prompt(lambda family: ak.PTuningV2Config(num_virtual_tokens=K),  # prefixes trained directly
                           lambda family, adapted: K * LAYERS * 2 * kv_width(family), loss_drop=0.07),
}
