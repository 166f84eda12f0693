"""Adapter files: adapter_config.json + adapter_model.safetensors, written atomically, read safely.

Never pickle. The JSON records the method config (with a format version), the modules the
adapter attached to, its parameter count, and the identity of the base model it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._version import __version__
from ..config import AdapterConfig
from ..errors import AdapterkitError, warn
from ..methods import get_method
from ..sites import BASE_CHANGE, EXPORTED, INPUTS, InputHook
from ..token_rows import extend_vocabulary
from . import fingerprint
from .files import write_files

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
# The base identity entries that must agree for an adapter to belong to a base model.
IDENTITY_KEYS = ("model_type", "architecture", "hidden_size", "num_layers", "vocab_size", "config_sha256",
                 "vocab_sha256")
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache",
                         "architectures", "_commit_hash", "quantization_config", "output_attentions",
                         "output_hidden_states", "return_dict", "tie_word_embeddings"}


def config_to_json(config: AdapterConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "method": config.method, "config": config.to_dict()}


def config_from_json(data: dict[str, Any]) -> AdapterConfig:
    if not isinstance(data, dict) or "method" not in data or "config" not in data:
        raise AdapterkitError("adapter_config.json lacks 'method' or 'config'; it was not written by adapterkit")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise AdapterkitError(f"adapter_config.json: format_version must be an integer from 1 to {FORMAT_VERSION}, "
                              f"got {version!r}; the adapter folder is corrupt")
    if version > FORMAT_VERSION:
        raise AdapterkitError(
            f"adapter format version {version!r} is newer than this adapterkit reads ({FORMAT_VERSION}); "
            "upgrade adapterkit")
    if not isinstance(data["method"], str):
        raise AdapterkitError(f"adapter_config.json: 'method' must be a method name, got {data['method']!r}")
    return get_method(data["method"]).config_class.from_dict(data["config"])


def base_identity(adapted) -> dict[str, Any]:
    """What identifies a base model: family, sizes, and hashes of its config (and vocabulary)."""
    model, tokenizer = adapted.causal_lm, adapted.tokenizer
    config = model.config
    stable = {k: v for k, v in sorted(config.to_dict().items()) if k not in _VOLATILE_CONFIG_KEYS}
    identity = {
        **adapted.layout.identity(),
        "architecture": type(model).__name__,
        "vocab_size": getattr(config, "vocab_size", None),
        "config_sha256": _sha(json.dumps(stable, sort_keys=True, default=str)),
        "name_or_path": getattr(model, "adapterkit_source", None) or getattr(config, "_name_or_path", None),
        "quantize": getattr(model, "adapterkit_quantize", "none"),
    }
    if tokenizer is not None:
        identity["vocab_sha256"] = _sha(json.dumps(sorted(tokenizer.get_vocab().items())))
    return identity


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_adapter(adapted, directory: Path, name: str) -> Path:
    meta, tensors, parameters = adapter_payload(adapted, name)
    return write_adapter(directory, meta, tensors, set(adapted.adapter_state_dict(name)), parameters)


def adapter_payload(adapted, name: str, weights: dict[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """(config json, tensors, parameter count) of adapter `name`, checked, fingerprint included; nothing
    written. `weights`: its full tensors when they were gathered from shards (a sharded run)."""
    record = adapted.records[name]
    if record.merged:
        raise AdapterkitError(f"adapter {name!r} is merged into the base weights: unmerge() it before saving")
    if "forward" in vars(adapted):
        warn("the model's forward is wrapped (a mixed-precision wrapper left by training, e.g. HF Trainer with "
             "bf16=True); the fingerprint is taken on the unwrapped model in its loaded dtype")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (weights or adapted.adapter_state_dict(name)).items()}
    check_tensors(tensors)
    parameters = sum(t.numel() for t in tensors.values())
    tensors.update(exported_tensors(record))
    tensors.update(base_change_tensors(record))
    meta = config_to_json(record.config)
    meta.update({
        "adapterkit_version": __version__,
        "modules": sorted(record.parts),
        "parameters": parameters,
        "trained_steps": record.trained_steps,
        "base_model": base_identity(adapted),
        "generation": adapted.generation_info,
        "fingerprint": fingerprint.compute(adapted, name),
    })
    if record.trained_steps > 0 and meta["fingerprint"]["max_change"] == 0.0:
        dtype = next(adapted.causal_lm.parameters()).dtype
        hint = (f" (in {str(dtype).removeprefix('torch.')} an update below its resolution vanishes: train longer "
                "or with a larger learning rate)" if dtype in (torch.bfloat16, torch.float16) else "")
        raise AdapterkitError(f"adapter {name!r} was trained for {record.trained_steps} steps but gives exactly the "
                              f"base model's logits{hint}; refusing to save an adapter that changes nothing")
    return meta, tensors, parameters


def write_adapter(directory: Path, meta: dict, tensors: dict[str, torch.Tensor], keys: set[str],
                  parameters: int) -> Path:
    write_files(directory, {CONFIG_FILE: json.dumps(meta, indent=2) + "\n"}, {WEIGHTS_FILE: tensors})
    check_saved_weights(directory, keys, parameters)
    return directory


def check_saved_weights(directory: Path, keys: set[str], parameters: int) -> None:
    """Read the file back: it must hold exactly the adapter's trainable weights."""
    on_disk = load_file(str(directory / WEIGHTS_FILE))
    weights = {k: v for k, v in on_disk.items() if k in keys}
    if set(weights) != keys or sum(t.numel() for t in weights.values()) != parameters:
        raise AdapterkitError(f"{directory / WEIGHTS_FILE} does not hold the {parameters} trainable parameters "
                              "that were saved; the disk or the folder is faulty")


def exported_tensors(record) -> dict[str, torch.Tensor]:
    """Tensors a part saves beside its weights (a prompt encoder's output), keyed by part path."""
    exported = {}
    for path, part in record.parts.items():
        if isinstance(part, InputHook):
            with torch.no_grad():
                for key, t in part.export_tensors().items():
                    exported[f"{path}.{key}"] = t.detach().float().cpu().clone().contiguous()  # not a view of a weight
    return exported


def base_change_tensors(record) -> dict[str, torch.Tensor]:
    """What rebuilds the base weights an adapter rewrote (LoRA's PiSSA/OLoRA/LoftQ starts) from the original
    ones, keyed PART_PATH.base_change.NAME: loading applies them to the original base again."""
    return {f"{path}.{BASE_CHANGE}.{key}": t.detach().float().cpu().clone().contiguous()
            for path, part in record.parts.items() if getattr(part, "changes_base", False)
            for key, t in part.base_change.items()}


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write empty or non-finite weights: such a save would look fine and be useless."""
    if not tensors:
        raise AdapterkitError("nothing to save: the adapter has no weights")
    for key, t in tensors.items():
        if t.numel() == 0:
            raise AdapterkitError(f"refusing to save: adapter weight {key} is empty")
        if not torch.isfinite(t).all():
            raise AdapterkitError(f"refusing to save: adapter weight {key} holds NaN or inf")


def saved_template(directory: str | Path | None) -> str | None:
    """The prompt template an adapter was trained with (None when unknown or no adapter)."""
    if directory is None:
        return None
    try:
        meta = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the full load reports what is wrong
    generation = meta.get("generation") if isinstance(meta, dict) else None
    template = generation.get("template") if isinstance(generation, dict) else None
    return template if isinstance(template, str) else None


def recorded_base(meta: dict) -> str | None:
    """The base model's name or path recorded in an adapter's config, if it records a usable one."""
    base = meta.get("base_model") if isinstance(meta, dict) else None
    name = base.get("name_or_path") if isinstance(base, dict) else None
    return name if isinstance(name, str) and name else None


def check_meta(meta: dict, config_path: Path) -> None:
    """The entries of adapter_config.json that load, verify and export read, each of the right type."""
    def corrupt(what: str, value) -> AdapterkitError:
        return AdapterkitError(f"{config_path}: {what}, got {value!r}; the adapter folder is corrupt")

    steps = meta.get("trained_steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise corrupt("trained_steps must be a whole number", steps)
    modules = meta.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise corrupt("'modules' must be a list of module names", modules)
    for key in ("generation",):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise corrupt(f"'{key}' must be an object", meta[key])


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config json, tensors) of an adapter folder, with one clear error for each way it can be wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterkitError(f"adapter folder {directory} does not exist")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        if (directory / "trainer_state.json").is_file() or (directory / "training_args.bin").is_file():
            raise AdapterkitError(f"{directory} is a Hugging Face Trainer output without {CONFIG_FILE}; save the "
                                  "adapter with adapted.save(DIR) (or adapterkit.save) after trainer.train(), and "
                                  "load that folder")
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = f" (found {pickled[0]}: pickle files are never loaded)" if pickled else ""
        raise AdapterkitError(f"{directory} has no {CONFIG_FILE}; not an adapter folder{hint}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterkitError(f"{config_path} is not valid JSON ({exc}); the adapter folder is corrupt") from exc
    if not isinstance(meta, dict):
        raise AdapterkitError(f"{config_path} holds a JSON {type(meta).__name__}, not an object; the adapter "
                              "folder is corrupt")
    check_meta(meta, config_path)
    if not weights_path.is_file():
        raise AdapterkitError(f"{directory} has no {WEIGHTS_FILE}; the adapter folder is incomplete")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterkitError(f"{weights_path} is not a readable safetensors file ({exc}); "
                              "the adapter folder is corrupt") from exc
    return meta, tensors


def load_weights(adapted, record, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Copy saved weights into adapter `name`; saved exports (a prompt's final embeddings) must follow
    from them."""
    tensors = dict(tensors)
    export_keys = list(exported_tensors(record))  # computed from the fresh adapter: its keys only
    exported = {k: tensors.pop(k) for k in export_keys if k in tensors}
    changes = {}
    for path, part in record.parts.items():
        if getattr(part, "changes_base", False):
            prefix = f"{path}.{BASE_CHANGE}."
            changes[path] = {k.removeprefix(prefix): tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
    adapted.load_adapter_state_dict(tensors, name)
    for path, change in changes.items():  # the original base becomes the one the adapter was made on
        record.parts[path].rebuild_base(change)
    for key, expected in exported_tensors(record).items():  # now from the loaded weights
        if key not in exported:
            raise AdapterkitError(f"the adapter file lacks {key}; it was not saved by this adapterkit")
        drift = (exported[key] - expected).abs().max().item()
        if drift > 1e-4:
            raise AdapterkitError(f"{key} recomputed from the saved weights differs from the saved one by "
                                  f"{drift:.3g}; the adapter file is inconsistent")


def trainable_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of a saved adapter file without the tensors saved beside them (exports, base changes)."""
    return {k: v for k, v in tensors.items() if not k.endswith("." + EXPORTED) and f".{BASE_CHANGE}." not in k}


def missing_modules(meta: dict, model) -> list[str]:
    """Modules the adapter was attached to that this model lacks (input hooks have no module)."""
    return [m for m in meta.get("modules", []) if m != INPUTS and not has_module(model, m)]


def check_loadable(meta: dict, tensors: dict[str, torch.Tensor], force: bool) -> None:
    """Weights must be finite; an adapter without its fingerprint or base identity cannot be verified,
    so it is refused unless `force` (then a warning)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterkitError(f"adapter weight {key} holds NaN or inf: the adapter file is damaged; use "
                                  "an earlier checkpoint or retrain")
    unverified = [k for k in ("fingerprint", "base_model") if not isinstance(meta.get(k), dict)]
    if unverified:
        message = (f"the adapter records no {' or '.join(unverified)}, so it cannot be verified against the "
                   "base model")
        if not force:
            raise AdapterkitError(message + "; re-save it with adapterkit, or pass --force to load it unverified")
        warn(message + "; loading it unverified because of --force")


def load_adapter(adapted, directory: str | Path, name: str = "default", trainable: bool = False,
                 force: bool = False):
    """Attach the adapter saved in `directory` to an AdaptedModel."""
    meta, tensors = read_adapter(directory)
    config = config_from_json(meta)
    check_loadable(meta, tensors, force)
    config = extend_vocabulary(adapted.causal_lm, adapted.tokenizer, config)  # its tokens: the base as trained on
    check_base(meta.get("base_model"), base_identity(adapted), force)
    missing = missing_modules(meta, adapted.causal_lm)
    if missing:
        raise AdapterkitError(f"the adapter was attached to {missing[0]}, which this model lacks "
                              f"({len(missing)} module(s) missing); it belongs to another base model")
    record = adapted.add_adapter(config, name, trainable=trainable, weights_follow=True)
    try:
        load_weights(adapted, record, tensors, name)
        record.trained_steps = int(meta.get("trained_steps", 0))
        saved_fingerprint = meta.get("fingerprint")
        saved_quantize = (meta.get("base_model") or {}).get("quantize", "none")
        if saved_quantize != getattr(adapted.causal_lm, "adapterkit_quantize", "none"):
            # another storage of the same base: its logits differ by the quantization error, so only the
            # identity hashes (checked above) and the no-op check apply
            warn(f"the adapter's fingerprint was taken on the base loaded with quantize={saved_quantize}; this one is "
                 f"loaded otherwise, so its probe logits are not compared (the base identity is)")
            saved_fingerprint = None
        _checked(lambda: fingerprint.check(adapted, name, saved_fingerprint, record.trained_steps), force)
    except AdapterkitError:
        adapted.delete(name)
        raise
    adapted.generation_info = adapted.generation_info or dict(meta.get("generation") or {})
    return adapted


def _checked(run, force: bool) -> None:
    """Run a check; with `force` its failure becomes a warning."""
    try:
        run()
    except AdapterkitError as exc:
        if not force:
            raise
        warn(f"{exc} (loading anyway because of --force)")


def has_module(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def check_base(saved: dict | None, current: dict, force: bool) -> None:
    """Refuse an adapter trained on another base model (`force` turns that into a warning)."""
    if not isinstance(saved, dict) or not saved:
        return  # nothing to compare (check_loadable refuses an adapter without it unless --force)
    differ = [k for k in IDENTITY_KEYS if k in saved and k in current and saved[k] != current[k]]
    if not differ:
        return
    what = ", ".join(f"{k} {saved[k]} vs {current[k]}" for k in differ)
    message = f"the adapter was trained on another base model ({what})"
    if not force:
        raise AdapterkitError(message + "; load the matching base model, or pass --force to load anyway")
    warn(message + "; loading anyway because of --force")
