"""`adapterkit check DIR --target T`: can a serving stack carry this adapter as it is?

One line per finding with its fix; no finding means the target serves the adapter as it is. It reads
the adapter folder (adapterkit's or PEFT's) and the base model's config, never the base weights:
`adapterkit verify` runs the checks that need the model. Targets: vllm, llama.cpp (spelt llamacpp;
dots and dashes in --target are ignored), ollama, peft, tgi. `export --format gguf|ollama|peft` runs
the same rules first and refuses what its target cannot carry.

Every rule is one row of RULES, with the source of the behaviour it encodes in a comment.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from ..architectures import ARCHITECTURES, Architecture
from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..io import gguf as gguf_io
from ..io.native import config_from_json, read_adapter, recorded_base
from ..io.ollama import template_for
from ..io.peft import PEFT_TYPES, from_peft, is_peft_folder, read_peft
from ..methods import get_method
from ..methods.lora import LoraConfig
from ..methods.prompt import PrefixTuningConfig
from ..models import DEFAULT_MODEL, default_model_folder
from ..settings import check_fields, option

TARGETS = ("vllm", "llamacpp", "ollama", "peft", "tgi")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_DEFAULT_RANK = 16  # vllm/config/lora.py LoRAConfig.max_lora_rank


@dataclass
class CheckSettings:
    adapter: str = option(None, "adapter folder to check (adapterkit's or PEFT's)", required=True, positional=True)
    target: str = option(None, "where it is to be served: vllm, llamacpp, ollama, peft or tgi (dots and dashes "
                         "ignored)", choices=TARGETS, required=True)
    merged: bool = option(False, "llamacpp/ollama: check the merged model (export --merged) instead of a LoRA GGUF")
    model: str | None = option(None, "the base model (default: the one recorded in the adapter)")

    def __post_init__(self) -> None:
        if isinstance(self.target, str):
            self.target = re.sub(r"[.\-_]", "", self.target.lower())
        check_fields(self)


@dataclass(frozen=True)
class Facts:
    """What the rules look at, read from the adapter folder and the base model's config."""

    directory: str
    config: AdapterConfig
    modules: tuple[str, ...]
    ranks: dict
    alphas: dict
    model_type: str | None
    layers: int | None
    generation: dict
    merged: bool = False

    @property
    def method(self):
        return get_method(self.config.method)

    @property
    def lora(self) -> bool:
        return isinstance(self.config, LoraConfig)

    @property
    def arch(self) -> Architecture | None:
        return ARCHITECTURES.get(self.model_type)

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


# ----- findings: each returns what is wrong, or None ------------------------------------------------
def _no_peft_type(f: Facts):
    if f.config.method not in PEFT_TYPES:
        return f"PEFT has no {f.config.method} ({f.method.family} method)"


def _experts(f: Facts):
    if f.lora and f.config.target_parameters:
        return "LoRA on fused expert weights (target_parameters) is not written in PEFT's format yet"


def _bias_or_copies(f: Facts):
    if f.lora and (f.config.bias != "none" or f.config.modules_to_save):
        return f"LoRA with bias={f.config.bias!r} or modules_to_save={f.config.modules_to_save} (trained base weights)"


def _prefix_layers(f: Facts):
    if isinstance(f.config, PrefixTuningConfig) and f.config.layers is not None:
        return f"prefixes in layers {f.config.layers} only; PEFT's prefix tuning puts them in every layer"


def _not_lora(f: Facts):
    if not f.lora:
        return f"{f.config.method} is a {f.method.family} method; this target serves LoRA adapters only"


def _dora(f: Facts):
    if f.lora and f.config.use_dora:
        return "DoRA (a trained magnitude per output feature) is not supported"


def _dora_dropped(f: Facts):
    if f.lora and f.config.use_dora:
        return ("DoRA: its LoraConfig keeps r, lora_alpha, target_modules, fan_in_fan_out and use_rslora, so the "
                "magnitudes would be dropped without a word")


def _vllm_rank(f: Facts):
    if f.lora and f.max_rank > VLLM_DEFAULT_RANK:
        return f"rank {f.max_rank} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_RANK}"


def _vllm_rank_fix(f: Facts) -> str:
    fits = [r for r in VLLM_RANKS if r >= f.max_rank]
    if fits:
        return f"serve it with --max-lora-rank {fits[0]}"
    return f"lower the rank to at most {VLLM_RANKS[-1]} (retrain), or {_merge_fix(f)}"


def _patterns(f: Facts):
    if not f.lora:
        return None
    scale = f.config.scaling_for(f.config.r, f.config.alpha)
    odd = sorted(p for p in f.ranks if not math.isclose(f.config.scaling_for(f.ranks[p], f.alphas[p]), scale))
    if odd:
        return (f"{len(odd)} module(s) have their own rank or alpha (rank_pattern/alpha_pattern, e.g. {odd[0]}), "
                "but every module is scaled by lora_alpha/r")


def _partial_layers(f: Facts):
    if not f.lora or not f.layers:
        return None
    kinds: dict[str, set[str]] = {}
    for path in f.modules:
        match = re.match(r"^(.*?)\.(\d+)\.(.+)$", path)
        if match:
            kinds.setdefault(f"{match[1]}.*.{match[3]}", set()).add(match[2])
    partial = sorted(k.rpartition(".")[2] for k, seen in kinds.items() if len(seen) < f.layers)
    if partial:
        return (f"{', '.join(partial)} adapted in only some of the {f.layers} layers; a module type is applied only "
                "when every layer has it, else dropped without a word")


def _no_llama_arch(f: Facts):
    if f.model_type is None:
        return "the base model's family is unknown (pass --model)"
    if f.arch is None or f.arch.gguf is None:
        return f"GGUF (gguf.MODEL_ARCH_NAMES) has no architecture for {f.model_type}"


def _unconverted(f: Facts):
    if f.arch is not None and f.arch.gguf is not None and f.arch.gguf_tensors is None:
        return (f"{f.model_type}'s GGUF conversion reshapes, transposes or splits tensors, which adapterkit's GGUF "
                "writer does not do")


def _gguf_lora_parts(f: Facts):
    if f.lora and (f.config.use_dora or f.config.bias != "none" or f.config.modules_to_save
                   or f.config.target_parameters):
        return ("the GGUF LoRA layout holds lora_a/lora_b pairs only: no DoRA magnitude, trained bias, full copy "
                "(modules_to_save) or expert weights")


def _unmapped(f: Facts):
    if not f.lora or f.arch is None or f.arch.gguf_tensors is None or not f.layers:
        return None
    names = gguf_io.name_map(f.arch, f.model_type, f.layers)
    missing = [m for m in f.modules if gguf_io.gguf_name(names, f"{m}.weight") is None]
    if missing:
        return f"modules the GGUF layout cannot carry: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"


def _not_mergeable(f: Facts):
    if not f.method.mergeable:
        return f"{f.config.method} cannot be merged into the base weights, so the merged GGUF cannot hold it"


def _template(f: Facts):
    try:
        template_for(f.generation)
    except AdapterkitError as exc:
        return str(exc).rsplit("; ", 1)[0]


# ----- fixes ----------------------------------------------------------------------------------------
def _merge_fix(f: Facts) -> str:
    if not f.method.mergeable:
        return f"keep adapterkit's own format (--adapter {f.directory}); {f.config.method} cannot be merged (non-linear)"
    return f"merge it first (adapterkit merge --adapter {f.directory} --output OUT) and serve OUT as the model"


def _gguf_merged_fix(f: Facts) -> str:
    if not f.method.mergeable:
        return f"keep adapterkit's own format; {f.config.method} cannot be merged (non-linear), so it has no GGUF form"
    return f"export the merged model instead: adapterkit export --adapter {f.directory} --format gguf --merged"


@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]
    finding: Callable[[Facts], str | None]
    fix: str | Callable[[Facts], str]
    merged: bool | None = None  # GGUF targets: only for a LoRA GGUF (False), only for --merged (True), both


_PEFT_READERS = ("peft", "vllm", "tgi")  # vLLM and TGI read PEFT folders: every PEFT rule applies to them
_GGUF = ("llamacpp", "ollama")  # Ollama runs GGUF files with llama.cpp: its rules apply to Ollama
RULES: tuple[Rule, ...] = (
    # PEFT's adapter types (peft.PeftType) and what adapterkit's PEFT writer holds (io/peft.py refuse_unexportable)
    Rule(_PEFT_READERS, _no_peft_type, _merge_fix),
    Rule(_PEFT_READERS, _experts, _merge_fix),
    Rule(_PEFT_READERS, _bias_or_copies, _merge_fix),
    Rule(_PEFT_READERS, _prefix_layers, "retrain with prefixes in every layer, or keep adapterkit's own format"),
    # vLLM docs, features/lora: LoRA adapters only; prompt adapters were removed with the V0 engine (v0.10)
    Rule(("vllm",), _not_lora, _merge_fix),
    # vllm/lora/peft_helper.py _validate_features: "vLLM does not yet support DoRA."
    Rule(("vllm",), _dora, _merge_fix),
    # vllm/config/lora.py: max_lora_rank defaults to 16, one of MaxLoRARanks; models.py refuses a larger rank
    Rule(("vllm",), _vllm_rank, _vllm_rank_fix),
    # vllm/lora/peft_helper.py: one vllm_lora_scaling_factor = lora_alpha / r (or / sqrt(r)) for all modules
    Rule(("vllm",), _patterns, lambda f: f"retrain with one rank and alpha, or {_merge_fix(f)}"),
    # text-generation-inference server/text_generation_server/adapters/lora.py: LoraConfig.load reads a PEFT LoRA
    # config; get_scaling_factor(lora_alpha, r) for every layer; prepare_weights returns None for a layer type
    # that some layer lacks ("There is no LoRA weight for this layer type in the adapter")
    Rule(("tgi",), _not_lora, _merge_fix),
    Rule(("tgi",), _dora_dropped, _merge_fix),
    Rule(("tgi",), _patterns, lambda f: f"retrain with one rank and alpha, or {_merge_fix(f)}"),
    Rule(("tgi",), _partial_layers, lambda f: f"target every layer, or {_merge_fix(f)}"),
    # llama.cpp: the architectures it knows (gguf.MODEL_ARCH_NAMES) and the conversions adapterkit writes
    Rule(_GGUF, _no_llama_arch, "serve it where the family runs (vllm, tgi, or adapterkit itself)"),
    Rule(_GGUF, _unconverted, lambda f: "export --format peft and convert that folder with convert_lora_to_gguf.py "
         "(ggml-org's converter), or merge first and use convert_hf_to_gguf.py"),
    # llama.cpp convert_lora_to_gguf.py: adapters of LoRA A/B only (any other tensor: "Unexpected name");
    # llama-adapter.cpp applies them as alpha / r * B A
    Rule(_GGUF, _not_lora, _gguf_merged_fix, merged=False),
    Rule(_GGUF, _gguf_lora_parts, _gguf_merged_fix, merged=False),
    Rule(_GGUF, _unmapped, _gguf_merged_fix, merged=False),
    # a merged GGUF is the base with the update folded in: only methods that merge (adapterkit methods)
    Rule(_GGUF, _not_mergeable, "keep adapterkit's own format, or retrain with a mergeable method (lora)",
         merged=True),
    # ollama docs/modelfile.md: TEMPLATE in Go template syntax; io/ollama.py translates the templates it names
    Rule(("ollama",), _template, "write the Modelfile's TEMPLATE yourself after export"),
)


def findings(facts: Facts, target: str) -> list[str]:
    """One line per rule of `target` that the adapter breaks, each with its fix."""
    lines = []
    for rule in RULES:
        if target not in rule.targets or (rule.merged is not None and rule.merged != facts.merged):
            continue
        what = rule.finding(facts)
        if what:
            fix = rule.fix(facts) if callable(rule.fix) else rule.fix
            lines.append(f"{target}: {what}; fix: {fix}")
    return lines


# ----- reading the facts ----------------------------------------------------------------------------
def _base_config(name: str | None) -> dict:
    """config.json of a local base model folder (the default model's converted folder), else {}."""
    if not name:
        return {}
    folder = default_model_folder() if name == DEFAULT_MODEL else Path(name).expanduser()
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def read_facts(directory: str, model: str | None = None, merged: bool = False) -> Facts:
    """The facts of an adapter folder, adapterkit's or PEFT's; a folder that cannot be read is an error."""
    if is_peft_folder(directory):
        meta, tensors = read_peft(directory)
        shape = SimpleNamespace(layers=meta.get("num_layers"), kv_heads=meta.get("num_attention_heads"),
                                head_dim=(meta.get("token_dim") or 0) // max(meta.get("num_attention_heads") or 1, 1))
        config, weights = from_peft(meta, tensors, shape)
        modules = sorted({k.rpartition(".")[0] for k in weights})
        base = _base_config(model or meta.get("base_model_name_or_path"))
        model_type, layers, generation = base.get("model_type"), base.get("num_hidden_layers"), {}
    else:
        meta, _ = read_adapter(directory)
        config = config_from_json(meta)
        modules = list(meta.get("modules", []))
        identity = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
        base = _base_config(model) if model else {}
        model_type = base.get("model_type") or identity.get("model_type")
        layers = base.get("num_hidden_layers") or identity.get("num_layers")
        generation = dict(meta.get("generation") or {})
        if not model_type and recorded_base(meta):
            model_type = _base_config(recorded_base(meta)).get("model_type")
    ranks, alphas = {}, {}
    if isinstance(config, LoraConfig):
        for path in modules:
            ranks[path], alphas[path] = config.rank_and_alpha(path)
    return Facts(str(directory), config, tuple(modules), ranks, alphas, model_type, layers, generation, merged)


def check(settings: CheckSettings) -> list[str]:
    """The findings for the settings' adapter and target (empty: it can be served as it is)."""
    return findings(read_facts(settings.adapter, settings.model, settings.merged), settings.target)
