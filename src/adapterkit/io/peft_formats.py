"""PEFT's format of the methods that are one table row each (LoHa, LoKr, VeRA, OFT, AdaLoRA), and the pieces every
PEFT reader shares (the option check, PEFT's per-module pattern rule).

A row names the PEFT type, the tensors (adapterkit parameter -> PEFT key suffix; PEFT saves each module's
tensors as `base_model.model.<module path>.<suffix>`), the options copied as they are (adapterkit field ->
PEFT option), the options written and read only with one value, and those that change nothing once the
weights exist. Targets are written as the modules' full paths; per-module ranks and alphas as
rank_pattern/alpha_pattern keyed by the escaped full path, and read back as PEFT applies them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..methods.adalora import WEIGHTS as _ADALORA_WEIGHTS
from ..methods.adalora import AdaloraConfig
from ..methods.loha import LohaConfig
from ..methods.lokr import LokrConfig
from ..methods.oft import OftConfig
from ..methods.vera import VeraConfig, projections

PEFT_PREFIX = "base_model.model."
# Options that change nothing once the weights exist, in every PEFT config.
COMMON = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                    "peft_version", "auto_mapping"})
# ... and in the rows' configs: the modules come from the weight keys, the starting values are replaced.
_ROW_INERT = COMMON | {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "init_weights",
                       "rank_pattern", "alpha_pattern"}


def check_options(meta: dict, inert: set[str] | frozenset[str]) -> None:
    for key, value in sorted(meta.items()):
        if key not in inert and value not in (None, False, {}, [], ""):
            raise AdapterkitError(f"the PEFT {meta['peft_type']} option {key}={value!r} has no adapterkit "
                                  "equivalent; merge the adapter with PEFT (merge_and_unload) and use the "
                                  "merged model as the base, or retrain it without that option")


def peft_pattern(pattern: dict, path: str, default):
    """PEFT's per-module value (its get_pattern_key): the first key that matches the end of the path."""
    return next((value for key, value in pattern.items() if re.match(rf"(.*\.)?({key})$", path)), default)


def exact_pattern(values: dict, default) -> dict:
    """A rank or alpha pattern naming each module that differs from the default by its escaped full path."""
    return {re.escape(path): value for path, value in sorted(values.items()) if value != default}


@dataclass(frozen=True)
class PeftFormat:
    """One method's PEFT format."""

    peft_type: str
    config_class: type[AdapterConfig]
    tensors: dict[str, str]                 # adapterkit parameter -> PEFT key suffix
    options: dict[str, str]                 # adapterkit config field -> PEFT option, values as they are
    fixed: dict[str, Any] = field(default_factory=dict)   # PEFT options with the one value adapterkit has
    inert: frozenset[str] = frozenset()     # more options that change nothing once the weights exist
    patterns: bool = False                  # r and alpha per module (rank_pattern / alpha_pattern)
    fan_in_fan_out: bool = False            # PEFT's flag for Conv1D targets (weights stored in x out)
    # Tensors outside the modules (VeRA's shared projection), or replacing a module's (AdaLoRA keeps only the
    # triplets its rank pattern keeps): written from the parts; read_extra checks them and may rewrite weights.
    write_extra: Callable[[AdapterConfig, dict], dict[str, torch.Tensor]] | None = None
    read_extra: Callable[[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict] | None = None
    write_meta: Callable[[AdapterConfig, dict], dict] | None = None  # more PEFT options, from the parts


_VERA_KEYS = ("base_model.vera_A", "base_model.vera_B")


def _vera_projection(config: VeraConfig, parts: dict) -> dict[str, torch.Tensor]:
    """VeRA's shared A and B, which PEFT saves once (save_projection=True, its default)."""
    projection = next(iter(parts.values())).projection
    return dict(zip(_VERA_KEYS, (projection.a.clone().contiguous(), projection.b.clone().contiguous()), strict=True))


def _vera_check_projection(meta: dict, extra: dict[str, torch.Tensor], weights: dict) -> dict:
    """PEFT's saved A and B must be those projection_prng_key gives: adapterkit draws them, never loads them."""
    stray = sorted(set(extra) - set(_VERA_KEYS))
    if stray:
        raise AdapterkitError(f"the PEFT VERA file holds {stray[0]}, which adapterkit cannot read")
    if extra:
        if len(extra) != 2:
            raise AdapterkitError("the PEFT VERA file holds one of vera_A and vera_B without the other")
        a, b = (extra[k] for k in _VERA_KEYS)
        seed = meta.get("projection_prng_key", 0)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not all(
                torch.equal(t.float(), want) for t, want in zip((a, b), projections(seed, a.shape[0], a.shape[1],
                                                                                    b.shape[0]), strict=True)):
            raise AdapterkitError(f"the PEFT VERA projections vera_A/vera_B are not the ones projection_prng_key="
                                  f"{seed} draws, and adapterkit draws them instead of loading them; re-save the "
                                  "adapter with PEFT from a model made with that key, or merge it with PEFT")
    return {}


def _oft_block_size(meta: dict, extra: dict[str, torch.Tensor], weights: dict) -> dict:
    """OFT's block size from the saved blocks [in / b, b (b - 1) / 2] (PEFT derives it per layer when r is
    given, and adjusts a size that does not divide): one size for all layers, or an error."""
    if extra:
        raise AdapterkitError(f"the PEFT OFT file holds {sorted(extra)[0]}, which adapterkit cannot read")
    sizes = {round((1 + math.sqrt(1 + 8 * t.shape[-1])) / 2) for t in weights.values()}
    if len(sizes) != 1:
        raise AdapterkitError(f"the PEFT OFT adapter has blocks of sizes {sorted(sizes)} in different layers; "
                              "adapterkit takes one block size per adapter: merge it with PEFT (merge_and_unload)")
    return {"block_size": sizes.pop()}


def _adalora_kept(config: AdaloraConfig, parts: dict) -> dict[str, torch.Tensor]:
    """The triplets PEFT's file holds per module (PEFT drops those its rank pattern drops): the kept ones, and
    any whose Lambda grew back since the allocator last zeroed it (so the file gives the same update)."""
    if not config.rank_pattern:
        return {}
    return {path: torch.tensor(config.rank_pattern[path]) | (part.lora_E.detach().view(-1).cpu() != 0)
            for path, part in parts.items()}


def _adalora_pruned(config: AdaloraConfig, parts: dict) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, keep in _adalora_kept(config, parts).items():
        a, b, e = (getattr(parts[path], n).detach().float().cpu() for n in _ADALORA_WEIGHTS)
        for name, kept in zip(_ADALORA_WEIGHTS, (a[keep], b[:, keep], e[keep]), strict=True):
            tensors[f"{PEFT_PREFIX}{path}.{name}"] = kept.contiguous()
    return tensors


def _adalora_meta(config: AdaloraConfig, parts: dict) -> dict:
    """PEFT's rank_pattern ({module path}.lora_E -> kept per triplet); total_step, which PEFT requires, is the
    smallest that fits when the adapter never trained (it changes nothing at inference)."""
    kept = _adalora_kept(config, parts)
    return {"rank_pattern": {f"{path}.lora_E": keep.tolist() for path, keep in kept.items()} or None,
            "total_step": config.total_step or config.tinit + config.tfinal + 1}


def _adalora_unpruned(meta: dict, extra: dict[str, torch.Tensor], weights: dict) -> dict:
    """PEFT's kept triplets back in their places among init_r, the dropped ones zero (the same update)."""
    if extra:
        raise AdapterkitError(f"the PEFT ADALORA file holds {sorted(extra)[0]}, which adapterkit cannot read")
    r, saved = meta.get("init_r", AdaloraConfig().init_r), meta.get("rank_pattern") or {}
    pattern = {}
    for path in sorted({key.rpartition(".")[0] for key in weights}):
        keep = torch.tensor(saved.get(f"{path}.lora_E", [True] * r), dtype=torch.bool)
        lacking = [n for n in _ADALORA_WEIGHTS if f"{path}.{n}" not in weights]
        if lacking:
            raise AdapterkitError(f"the PEFT ADALORA file lacks {lacking[0]} of {path}")
        a, b, e = (weights[f"{path}.{n}"] for n in _ADALORA_WEIGHTS)
        n = int(keep.sum())
        if len(keep) != r or a.shape[0] != n or b.shape[1] != n or e.shape != (n, 1):
            raise AdapterkitError(f"the PEFT ADALORA tensors of {path} do not hold the {n} triplets its rank_pattern "
                                  f"keeps of init_r={r}; the folder is inconsistent")
        full = (a.new_zeros(r, a.shape[1]), b.new_zeros(b.shape[0], r), e.new_zeros(r, 1))
        full[0][keep], full[1][:, keep], full[2][keep] = a, b, e
        weights.update({f"{path}.{name}": t for name, t in zip(_ADALORA_WEIGHTS, full, strict=True)})
        pattern[path] = keep.tolist()
    return {"rank_pattern": pattern if saved else {}}


FORMATS: dict[str, PeftFormat] = {
    "loha": PeftFormat(
        "LOHA", LohaConfig, {k: k for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
        {"r": "r", "alpha": "alpha", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout"},
        fixed={"use_effective_conv2d": False}, patterns=True),
    "lokr": PeftFormat(
        "LOKR", LokrConfig, {k: k for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
        {k: k for k in ("r", "alpha", "rank_dropout", "module_dropout", "rank_dropout_scale", "decompose_both",
                        "decompose_factor")},
        fixed={"use_effective_conv2d": False}, patterns=True),
    "vera": PeftFormat(
        "VERA", VeraConfig, {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"},
        {"r": "r", "projection_prng_key": "projection_prng_key", "d_initial": "d_initial", "dropout": "vera_dropout"},
        fixed={"bias": "none"}, inert=frozenset({"save_projection"}), fan_in_fan_out=True,
        write_extra=_vera_projection, read_extra=_vera_check_projection),
    "oft": PeftFormat(
        "OFT", OftConfig, {"oft_R": "oft_R.weight"},
        {"block_size": "oft_block_size", "use_cayley_neumann": "use_cayley_neumann",
         "num_cayley_neumann_terms": "num_cayley_neumann_terms"},
        fixed={"coft": False, "block_share": False, "bias": "none"},
        inert=frozenset({"r", "eps", "fan_in_fan_out", "module_dropout"}),  # module_dropout: never applied by PEFT
        read_extra=_oft_block_size),
    "adalora": PeftFormat(
        "ADALORA", AdaloraConfig, {n: n for n in _ADALORA_WEIGHTS},
        {**{k: k for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                           "total_step")}, "alpha": "lora_alpha", "dropout": "lora_dropout"},
        fixed={"bias": "none"}, fan_in_fan_out=True,
        # r: AdaLoRA ignores it (init_r); use_rslora: AdaLoRA's scale is alpha / ranknum whatever it says
        inert=frozenset({"r", "init_lora_weights", "use_rslora", "megatron_core", "qalora_group_size"}),
        write_extra=_adalora_pruned, write_meta=_adalora_meta, read_extra=_adalora_unpruned),
}
BY_PEFT_TYPE = {f.peft_type: method for method, f in FORMATS.items()}


def format_to_peft(config: AdapterConfig, parts: dict, common: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PEFT adapter_config.json content, PEFT tensors) of an adapter of a method in FORMATS."""
    fmt = FORMATS[config.method]
    tensors = {f"{PEFT_PREFIX}{path}.{theirs}": getattr(part, ours).detach().float().cpu().contiguous()
               for path, part in parts.items() for ours, theirs in fmt.tensors.items()
               if getattr(part, ours, None) is not None}
    if fmt.write_extra is not None:
        tensors.update(fmt.write_extra(config, parts))
    meta = {**common, **{theirs: getattr(config, ours) for ours, theirs in fmt.options.items()}, **fmt.fixed,
            "target_modules": sorted(parts), "modules_to_save": None}
    if fmt.write_meta is not None:
        meta.update(fmt.write_meta(config, parts))
    if fmt.patterns:
        pairs = {path: config.rank_and_alpha(path) for path in parts}
        meta["rank_pattern"] = exact_pattern({p: ra[0] for p, ra in pairs.items()}, config.r)
        meta["alpha_pattern"] = exact_pattern({p: ra[1] for p, ra in pairs.items()}, config.alpha)
    if fmt.fan_in_fan_out:
        meta["fan_in_fan_out"] = any(part.transposed for part in parts.values())
    return meta, tensors


def format_from_peft(method: str, meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[AdapterConfig, dict]:
    """adapterkit's (config, weights keyed by module path) for a PEFT folder of a method in FORMATS."""
    fmt = FORMATS[method]
    check_options(meta, _ROW_INERT | fmt.inert | set(fmt.options.values()) | set(fmt.fixed)
                  | ({"fan_in_fan_out"} if fmt.fan_in_fan_out else set()))
    for key, value in fmt.fixed.items():
        if meta.get(key, value) != value:
            raise AdapterkitError(f"the PEFT {fmt.peft_type} option {key}={meta[key]!r} is not read by adapterkit "
                                  f"(it reads {key}={value!r}); merge the adapter with PEFT (merge_and_unload) and "
                                  "use the merged model as the base")
    theirs_to_ours = {theirs: ours for ours, theirs in fmt.tensors.items()}
    pattern = re.compile(rf"^(?:base_model\.model\.)?(.+)\.({'|'.join(map(re.escape, theirs_to_ours))})$")
    weights, extra = {}, {}
    for key, tensor in tensors.items():
        match = pattern.match(key)
        if match is None:
            extra[key] = tensor
        else:
            weights[f"{match[1]}.{theirs_to_ours[match[2]]}"] = tensor
    paths = sorted({key.rpartition(".")[0] for key in weights})
    if not paths:
        raise AdapterkitError(f"the PEFT {fmt.peft_type} file holds none of its weights "
                              f"({', '.join(fmt.tensors.values())})")
    values = {ours: meta[theirs] for ours, theirs in fmt.options.items() if meta.get(theirs) is not None}
    if fmt.read_extra is not None:
        values.update(fmt.read_extra(meta, extra, weights))
    elif extra:
        raise AdapterkitError(f"the PEFT {fmt.peft_type} file holds {sorted(extra)[0]}, which adapterkit cannot read")
    if fmt.patterns:
        defaults = fmt.config_class()
        r, alpha = values.get("r", defaults.r), values.get("alpha", defaults.alpha)
        values["rank_pattern"] = exact_pattern(
            {p: peft_pattern(meta.get("rank_pattern") or {}, p, r) for p in paths}, r)
        values["alpha_pattern"] = exact_pattern(
            {p: peft_pattern(meta.get("alpha_pattern") or {}, p, alpha) for p in paths}, alpha)
    return fmt.config_class(**values, target_modules=paths), weights
