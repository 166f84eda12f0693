"""`adapterkit merge`: fold an adapter into its base and write a plain Hugging Face checkpoint."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterkitError
from ..io.files import check_output, publish_folder, writing
from ..models import DEFAULT_MODEL
from ..quantization import QUANTIZE
from ..settings import check_fields, option
from .common import load_for_inference, probe_inputs


@dataclass
class MergeSettings:
    adapter: str = option(None, "adapter folder to merge", required=True)
    output: str = option(None, "folder for the merged checkpoint", required=True)
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    overwrite: bool = option(False, "replace a non-empty output folder")
    force: bool = option(False, "merge into a base model other than the adapter's")
    tolerance: float = option(1e-3, "largest logit change merged vs unmerged accepted", minimum=0)
    quantize: str = option("auto", "the base to merge into: auto (as the adapter was trained: a quantized base "
                           "is dequantized to fp32 first), none (the full-precision base), int8 or nf4",
                           choices=("auto", *QUANTIZE))

    def __post_init__(self) -> None:
        check_fields(self)


def trained_quantize(adapter: str) -> str:
    """How the adapter's base was stored when it trained, from its config (PEFT folders: "none")."""
    try:
        meta = json.loads((Path(adapter) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "none"  # loading the adapter then says what is wrong with it
    base = meta.get("base_model") if isinstance(meta, dict) else None
    return str(base.get("quantize", "none")) if isinstance(base, dict) else "none"


@torch.no_grad()
def merge(settings: MergeSettings) -> float:
    """Merge and write; refuses (writing nothing) an adapter whose merged logits drift. Returns the drift."""
    out = Path(settings.output)
    check_output(out, settings.overwrite)
    quantize = settings.quantize
    if quantize == "auto":
        quantize = trained_quantize(settings.adapter)
    if quantize != "none":
        print(f"merging into the {quantize} base dequantized to fp32 (the weights the adapter was trained with; "
              "--quantize none merges into the full-precision base)", flush=True)
    adapted, tokenizer = load_for_inference(settings.model, settings.adapter, force=settings.force,
                                            quantize=quantize, dequantize=True)
    probe = probe_inputs(tokenizer)
    adapted_info = dict(adapted.generation_info)
    before = adapted(**probe).logits.float()
    plain = adapted.merge_and_unload()
    after = plain(**probe).logits.float()
    drift = (before - after).abs().max().item()
    if not drift <= settings.tolerance:
        raise AdapterkitError(f"merged logits differ from unmerged by {drift:.3g} (> {settings.tolerance}); "
                              "nothing written")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    report = {"adapter": str(settings.adapter), "max_logit_change": drift, "tolerance": settings.tolerance,
              "base": "full precision" if quantize == "none" else f"{quantize}, dequantized to fp32",
              "generation": adapted_info}  # the template and end tokens travel with the merged model
    try:
        with writing(out):
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return drift
