"""Hugging Face PEFT folders: write adapterkit adapters in PEFT's format, and read PEFT's folders.

A PEFT folder is adapter_config.json (PEFT's config dataclass, marked by `peft_type`) and
adapter_model.safetensors. LoRA is saved as `base_model.model.<module path>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r]: the matrices adapterkit keeps, also on GPT-2's Conv1D (PEFT's
fan_in_fan_out=True transposes only the base weight); DoRA adds `.lora_magnitude_vector` [out]. Modules
whose rank or alpha differ from r and alpha are written as rank_pattern/alpha_pattern entries keyed by
their escaped full path, and read back per module as PEFT applies them. Prompt methods are saved by PEFT
as one tensor, `prompt_embeddings`: the encoder's output (the virtual embeddings [k, d], or the prefixes
flattened as [k, layers, (key, value), kv_heads, head_dim]), which PEFT loads in inference mode without
the P-Tuning encoder or the prefix projection. So a PEFT P-Tuning folder reads as prompt tuning and a
projected prefix as a direct one: the same logits, without the (unsaved) encoder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..methods import get_method
from ..methods.lora import LoraConfig, LoraEffect
from ..methods.lora_init import changes_base
from ..methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from ..sites import INPUTS
from ..token_rows import ROWS, TokenRows
from . import fingerprint
from .files import check_output, write_files
from .native import CONFIG_FILE, WEIGHTS_FILE
from .peft_formats import BY_PEFT_TYPE, FORMATS, PEFT_PREFIX, format_from_peft, format_to_peft
from .peft_formats import COMMON as _COMMON
from .peft_formats import check_options as _check_options
from .peft_formats import exact_pattern as _exact
from .peft_formats import peft_pattern as _peft_pattern

EMBEDDINGS_KEY = "prompt_embeddings"
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's trained token rows [tokens, hidden], per table
PEFT_TYPES = {"lora": "LORA", "prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING",
              "prefix-tuning": "PREFIX_TUNING", "p-tuning-v2": "PREFIX_TUNING",
              **{method: f.peft_type for method, f in FORMATS.items()}}
# LoRA tensors, the only ones written or read: adapterkit parameter <-> PEFT key suffix (DoRA: magnitude).
LORA_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
_FROM_PEFT = {theirs: ours for ours, theirs in LORA_KEYS.items()}
_LORA_KEY = re.compile(rf"^(?:base_model\.model\.)?(.+)\.({'|'.join(map(re.escape, _FROM_PEFT))})$")
_KEY_HINTS = {"lora_embedding_": "LoRA on an embedding layer", ".bias": "trained biases (bias or lora_bias)",
              "modules_to_save": "modules_to_save"}
# Options that change nothing once the weights exist (LoRA's modules come from the weight keys, so the
# options that chose them, layers_to_transform and layers_pattern included, are honoured as saved).
_LORA_INERT = _COMMON | {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out", "use_rslora",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "bias", "use_dora", "rank_pattern",
    "alpha_pattern", "megatron_core", "qalora_group_size", "ensure_weight_tying", "eva_config"}
_PROMPT_INERT = _COMMON | {
    "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
    "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout",
    "prefix_projection", "init_weights"}
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # these leave the base weights alone
_CHECK_NAME = "peft-export-check"


# ----- reading PEFT folders ------------------------------------------------------------------------
def is_peft_folder(directory: str | Path) -> bool:
    """True when the folder's adapter_config.json is PEFT's (it has `peft_type`)."""
    try:
        meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "peft_type" in meta


def read_peft(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PEFT config json, tensors) of a PEFT folder; safetensors only, never pickle."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterkitError(f"{directory / CONFIG_FILE} cannot be read as JSON ({exc})") from exc
    if not isinstance(meta, dict) or "peft_type" not in meta:
        raise AdapterkitError(f"{directory} is not a PEFT adapter folder ({CONFIG_FILE} has no peft_type)")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterkitError(f"{directory} holds its PEFT weights only as adapter_model.bin, a pickle "
                                  "file, which adapterkit never loads; re-save it with PEFT as safetensors "
                                  "(model.save_pretrained(dir, safe_serialization=True))")
        raise AdapterkitError(f"{directory} has no {WEIGHTS_FILE}; the PEFT adapter folder is incomplete")
    try:
        return meta, load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterkitError(f"{weights} is not a readable safetensors file ({exc})") from exc


def load_peft(adapted, directory: str | Path, name: str = "default", trainable: bool = False):
    """Attach the PEFT adapter saved in `directory` to an AdaptedModel."""
    meta, tensors = read_peft(directory)
    config, weights = from_peft(meta, tensors, adapted.layout.shape)
    _attach(adapted, config, weights, name, trainable)
    return adapted


def from_peft(meta: dict, tensors: dict[str, torch.Tensor], shape) -> tuple[AdapterConfig, dict]:
    """adapterkit's (config, weights keyed by module path) for a PEFT config and its tensors."""
    kind = meta.get("peft_type")
    if meta.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterkitError(f"the PEFT adapter is for task {meta['task_type']}; adapterkit adapts causal "
                              "LMs (task_type CAUSAL_LM)")
    if kind == "LORA":
        return _lora_from_peft(meta, tensors)
    if kind in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        return _prompt_from_peft(meta, tensors, shape)
    if kind in BY_PEFT_TYPE:
        return format_from_peft(BY_PEFT_TYPE[kind], meta, tensors)
    raise AdapterkitError(f"PEFT type {kind!r} has no adapterkit equivalent; adapterkit reads LORA, "
                          f"PROMPT_TUNING, P_TUNING, PREFIX_TUNING, {', '.join(BY_PEFT_TYPE)} (merge other "
                          "adapters into the base with PEFT's merge_and_unload, where PEFT can)")


def _tokens_from_peft(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """PEFT's trainable_token_indices: (config values, rows keyed by module path, the other tensors)."""
    indices = meta.get("trainable_token_indices")
    rows = {k: t for k, t in tensors.items() if k.endswith("." + TOKEN_KEY)}
    rest = {k: t for k, t in tensors.items() if k not in rows}
    if indices is None:
        if rows:
            raise AdapterkitError(f"the PEFT file holds {sorted(rows)[0]} but its config no trainable_token_indices")
        return {}, {}, rest
    lists = list(indices.values()) if isinstance(indices, dict) else [indices]
    if not lists or any(list(ids) != list(lists[0]) for ids in lists):
        raise AdapterkitError(f"the PEFT trainable_token_indices {indices!r} train different tokens in different "
                              "tables; adapterkit trains the same tokens' rows in the embeddings and the head")
    ids = [int(i) for i in lists[0]]
    weights = {}
    for key, tensor in rows.items():
        if tuple(tensor.shape[:1]) != (len(ids),) or tensor.dim() != 2:
            raise AdapterkitError(f"the PEFT tensor {key} has shape {tuple(tensor.shape)}, not one row for each of "
                                  f"the {len(ids)} trainable_token_indices")
        weights[f"{key.removeprefix(PEFT_PREFIX)[:-len(TOKEN_KEY) - 1]}.{ROWS}"] = tensor
    if not weights:
        raise AdapterkitError(f"the PEFT config has trainable_token_indices but the file holds no {TOKEN_KEY}")
    return {"token_ids": ids, "token_head": len(weights) > 1}, weights, rest


def _lora_from_peft(meta: dict, tensors: dict[str, torch.Tensor]):
    token_values, token_weights, tensors = _tokens_from_peft(meta, tensors)
    meta = {k: v for k, v in meta.items() if k != "trainable_token_indices"}
    _check_options(meta, _LORA_INERT)
    if meta.get("bias", "none") != "none":
        raise AdapterkitError(f"PEFT LoRA with bias={meta['bias']!r} (trained base biases) is not read yet; "
                              "merge it with PEFT (merge_and_unload) and use the merged model")
    init = meta.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterkitError(f"PEFT init_lora_weights={init!r} rewrites the base weights, so this adapter "
                              "only fits PEFT's modified base; convert it with PEFT first (save_pretrained "
                              "with path_initial_model_for_weight_conversion)")
    weights = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            what = next((v for k, v in _KEY_HINTS.items() if k in key), "an unknown tensor")
            raise AdapterkitError(f"the PEFT LoRA file holds {key} ({what}), which adapterkit cannot read")
        weights[f"{match[1]}.{_FROM_PEFT[match[2]]}"] = tensor
    paths = sorted({key.rpartition(".")[0] for key in weights})
    if not paths:
        raise AdapterkitError("the PEFT LoRA file holds no lora_A/lora_B weights")
    dora = bool(meta.get("use_dora"))
    needed = ("lora_A", "lora_B", "magnitude") if dora else ("lora_A", "lora_B")
    lacking = [(p, n) for p in paths for n in needed if f"{p}.{n}" not in weights]
    if lacking:
        raise AdapterkitError(f"the PEFT LoRA file lacks {LORA_KEYS[lacking[0][1]]} of {lacking[0][0]}")
    r, alpha = meta.get("r", 8), meta.get("lora_alpha", 8)
    ranks = {p: weights[f"{p}.lora_A"].shape[0] for p in paths}  # PEFT's rank_pattern, as applied
    alphas = {p: _peft_pattern(meta.get("alpha_pattern") or {}, p, alpha) for p in paths}
    config = LoraConfig(r=r, alpha=alpha, dropout=meta.get("lora_dropout") or 0.0, target_modules=paths,
                        use_rslora=bool(meta.get("use_rslora")), use_dora=dora,
                        init="gaussian" if init == "gaussian" else "default",
                        rank_pattern=_exact(ranks, r), alpha_pattern=_exact(alphas, alpha), **token_values)
    return config, {**weights, **token_weights}


def _prompt_from_peft(meta: dict, tensors: dict[str, torch.Tensor], shape):
    _check_options(meta, _PROMPT_INERT)
    if (meta.get("num_transformer_submodules") or 1) != 1:
        raise AdapterkitError("the PEFT prompt adapter has 2 transformer submodules (encoder-decoder); "
                              "adapterkit adapts decoder-only causal LMs")
    if set(tensors) != {EMBEDDINGS_KEY}:
        raise AdapterkitError(f"a PEFT {meta['peft_type']} file holds exactly {EMBEDDINGS_KEY}; this one "
                              f"holds {sorted(tensors)}")
    k, weights = meta.get("num_virtual_tokens"), {f"{INPUTS}.embedding.weight": tensors[EMBEDDINGS_KEY]}
    if meta["peft_type"] != "PREFIX_TUNING":  # P-Tuning too: PEFT saved the encoder's output only
        return PromptTuningConfig(num_virtual_tokens=k), weights
    saved = (meta.get("num_layers"), meta.get("num_attention_heads"), meta.get("token_dim"))
    ours = (shape.layers, shape.kv_heads, shape.kv_heads * shape.head_dim)
    if saved != ours:
        raise AdapterkitError(f"the PEFT prefix was made for (layers, key/value heads, width) {saved}, this "
                              f"model has {ours}; load it onto its own base model")
    config = PrefixTuningConfig(num_virtual_tokens=k, prefix_projection=False, encoder_hidden_size=None)
    return config, weights


def _attach(adapted, config: AdapterConfig, weights: dict, name: str, trainable: bool) -> None:
    adapted.add_adapter(config, name, trainable=trainable, weights_follow=True)
    try:
        adapted.load_adapter_state_dict(weights, name)
    except AdapterkitError:
        adapted.delete(name)
        raise


# ----- writing PEFT folders ------------------------------------------------------------------------
def refuse_unexportable(config: AdapterConfig) -> None:
    """One clear error for an adapter PEFT cannot hold, naming what to do instead."""
    method = get_method(config.method)
    own = "keep it in adapterkit's own format (adapterkit.load(model, DIR), or --adapter DIR)"
    if config.method not in PEFT_TYPES:
        merge = ", or merge it into the base (adapterkit merge)" if method.mergeable else \
            "; it cannot be merged either (non-linear)"
        what = "PEFT has no" if method.family == "adapter" else "adapterkit does not write PEFT's format of"
        raise AdapterkitError(f"{what} {config.method} ({method.family} method) yet: {own}{merge}"
                              if what != "PEFT has no" else f"PEFT has no {config.method} ({method.family} method): "
                              f"{own}{merge}")
    if config.token_ids is not None and not isinstance(config, LoraConfig):
        raise AdapterkitError(f"PEFT keeps trained token rows (trainable_token_indices) only beside LoRA, and this is "
                              f"a {config.method} adapter with new tokens: {own}")
    if isinstance(config, LoraConfig) and config.target_parameters:
        raise AdapterkitError(f"exporting LoRA on fused expert weights (target_parameters) to PEFT is not supported "
                              f"yet: merge it into the base (adapterkit merge), or {own}")
    if isinstance(config, LoraConfig) and (config.bias != "none" or config.modules_to_save):
        raise AdapterkitError(f"exporting LoRA with bias={config.bias!r} or modules_to_save to PEFT is not "
                              f"supported yet: merge it into the base (adapterkit merge), or {own}")
    if isinstance(config, LoraConfig) and config.init == "loftq":
        raise AdapterkitError(f"a LoftQ adapter fits only its NF4-quantized base (W - Q is not low-rank), so no PEFT "
                              f"LoRA holds it for the original base: {own}, or merge it into the base "
                              "(adapterkit merge)")
    if isinstance(config, PrefixTuningConfig) and config.layers is not None:
        raise AdapterkitError(f"PEFT's prefix tuning puts prefixes in every layer, so a {config.method} "
                              f"adapter with layers={config.layers} has no PEFT equivalent; {own}")


def to_peft(adapted, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PEFT adapter_config.json content, PEFT tensors) of adapter `name`."""
    record = adapted._record(name)
    if record.merged:
        raise AdapterkitError(f"adapter {name!r} is merged into the base weights: unmerge() it to export it")
    config = record.config
    refuse_unexportable(config)
    common = {"peft_type": PEFT_TYPES[config.method], "task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": getattr(adapted.causal_lm.config, "_name_or_path", None) or None}
    if isinstance(config, LoraConfig):
        return _lora_to_peft(config, record.parts, common)
    if config.method in FORMATS:
        return format_to_peft(config, record.parts, common)
    return _prompt_to_peft(config, record.parts[INPUTS], adapted.layout.shape, common)


def _lora_to_peft(config: LoraConfig, parts: dict, common: dict):
    token_parts = {path: part for path, part in parts.items() if isinstance(part, TokenRows)}
    parts = {path: part for path, part in parts.items() if path not in token_parts}
    odd = [path for path, part in parts.items() if not isinstance(part, LoraEffect)]
    if odd:
        raise AdapterkitError(f"the LoRA adapter's part at {odd[0]} is not a low-rank update; not exportable")
    tensors = {f"{PEFT_PREFIX}{path}.{theirs}": getattr(part, ours).detach().float().cpu().contiguous()
               for path, part in parts.items() for ours, theirs in LORA_KEYS.items()
               if getattr(part, ours, None) is not None}
    ranks_alphas = {path: config.rank_and_alpha(path) for path in parts}
    r, alpha, converted = config.r, config.alpha, changes_base(config.init)
    if converted:  # PEFT's conversion for the original base: s (B A - B0 A0) = s' [B, -B0] [A; A0]
        for path, part in parts.items():
            start = {key: t.float().cpu() for key, t in part.base_change.items()}
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.cat(
                [tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"], start["lora_A"]]).contiguous()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.cat(
                [tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"], -start["lora_B"]], dim=1).contiguous()
        factor = math.sqrt(2) if config.use_rslora else 2.0  # the same scaling at twice the rank
        r, alpha = 2 * r, alpha * factor
        ranks_alphas = {path: (2 * pr, pa * factor) for path, (pr, pa) in ranks_alphas.items()}
    ranks, alphas = ({path: pair[i] for path, pair in ranks_alphas.items()} for i in (0, 1))
    meta = {**common, "r": r, "lora_alpha": alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(parts), "bias": "none", "use_rslora": config.use_rslora,
            "use_dora": config.use_dora, "rank_pattern": _exact(ranks, r), "alpha_pattern": _exact(alphas, alpha),
            "fan_in_fan_out": any(part.transposed for part in parts.values()),  # GPT-2's Conv1D
            "init_lora_weights": "gaussian" if config.init == "gaussian" else True, "modules_to_save": None}
    own = {path: part for path, part in token_parts.items() if not part.tied}  # a tied head shares the rows
    if own:  # a list targets the input embeddings; a table per module when an untied head has rows too
        tensors.update({f"{PEFT_PREFIX}{path}.{TOKEN_KEY}": part.rows.detach().float().cpu().contiguous()
                        for path, part in own.items()})
        ids = list(config.token_ids)
        meta["trainable_token_indices"] = ids if len(own) == 1 else {path: ids for path in sorted(own)}
    return meta, tensors


def _prompt_to_peft(config, part, shape, common: dict):
    with torch.no_grad():
        final = part.final().detach().float().cpu()
    meta = {**common, "num_virtual_tokens": config.num_virtual_tokens, "num_transformer_submodules": 1,
            "num_layers": shape.layers}
    if isinstance(config, PrefixTuningConfig):  # [layers, 2, kv_heads, k, head_dim] -> [k, everything]
        embeddings = final.permute(3, 0, 1, 2, 4).reshape(config.num_virtual_tokens, -1)
        token_dim = shape.kv_heads * shape.head_dim
        meta.update(token_dim=token_dim, num_attention_heads=shape.kv_heads,
                    prefix_projection=config.prefix_projection,
                    encoder_hidden_size=config.encoder_hidden_size or token_dim)
    else:
        embeddings, dim = final, final.shape[1]
        meta.update(token_dim=dim, num_attention_heads=shape.heads)
        if isinstance(config, PTuningConfig):
            meta.update(encoder_reparameterization_type=config.encoder_type.upper(), encoder_num_layers=2,
                        encoder_hidden_size=config.encoder_hidden_size or dim,
                        encoder_dropout=config.encoder_dropout)
        else:
            meta.update(prompt_tuning_init="RANDOM")  # the embeddings are loaded; no tokenizer needed
    return meta, {EMBEDDINGS_KEY: embeddings.contiguous()}


def check_round_trip(adapted, name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> float:
    """Read the PEFT tensors back (in memory) onto the same base; the probe logits must be the adapter's."""
    config, weights = from_peft(meta, tensors, adapted.layout.shape)
    record = adapted._record(name)
    if any(getattr(part, "changes_base", False) for part in record.parts.values()):
        return _check_converted(record, config, weights)
    _attach(adapted, config, weights, _CHECK_NAME, trainable=False)
    try:
        want = torch.tensor(fingerprint.compute(adapted, name)["adapted"])
        got = torch.tensor(fingerprint.compute(adapted, _CHECK_NAME)["adapted"])
    finally:
        adapted.delete(_CHECK_NAME)
    drift = fingerprint.relative_drift(got, want)
    tolerance = fingerprint.TOLERANCE.get(next(adapted.causal_lm.parameters()).dtype, 5e-2) / 10
    if not drift <= tolerance:
        raise AdapterkitError(f"the PEFT files read back give logits that drift by {drift:.3g} from the "
                              f"adapter's (> {tolerance:g}); nothing written")
    return drift


def _check_converted(record, config: LoraConfig, weights: dict[str, torch.Tensor]) -> float:
    """A converted export is for the original base, which this model no longer holds: its update read back
    must be the adapter's update relative to that base, s (B A - B0 A0), at every module."""
    drift = 0.0
    for path, part in record.parts.items():
        with torch.no_grad():
            got = config.scaling_for(*config.rank_and_alpha(path)) * (
                weights[f"{path}.lora_B"].float() @ weights[f"{path}.lora_A"].float())
            start = part.base_change
            now, initial = (part.scaling * (b.float() @ a.float()) for b, a in
                            ((part.lora_B, part.lora_A), (start["lora_B"], start["lora_A"])))
            scale = max(now.abs().max().item(), initial.abs().max().item(), 1e-12)  # the update may be 0 at step 0
        drift = max(drift, (got - (now - initial).cpu()).abs().max().item() / scale)
    if not drift <= 1e-5:
        raise AdapterkitError(f"the converted PEFT update read back drifts by {drift:.3g} from the adapter's "
                              "(> 1e-05); nothing written")
    return drift


def export_peft(adapted, output: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Write adapter `name` of `adapted` as a PEFT folder that `peft.PeftModel.from_pretrained` loads."""
    out = Path(output)
    check_output(out, overwrite)
    name = name or adapted._single_name()
    meta, tensors = to_peft(adapted, name)
    check_round_trip(adapted, name, meta, tensors)
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_files(out, {CONFIG_FILE: text}, {WEIGHTS_FILE: tensors}, record=True)
    return out
