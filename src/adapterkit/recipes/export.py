"""`adapterkit export`: write an adapter in another library's format: peft (a Hugging Face PEFT folder),
gguf (a LoRA GGUF file for llama.cpp's --lora, or with --merged the whole merged model), ollama (a folder
with the GGUF file(s) and a Modelfile). `adapterkit check` runs first: what the target cannot carry is
refused before anything is loaded or written."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterkitError
from ..io import gguf as gguf_io
from ..io import save
from ..io.files import check_output, publish_folder, writing
from ..io.gguf_vocab import check_tokenizer
from ..io.native import config_from_json, read_adapter, recorded_base
from ..io.ollama import MODELFILE, modelfile, template_for
from ..io.peft import is_peft_folder, refuse_unexportable
from ..models import DEFAULT_MODEL, load_model
from ..settings import check_fields, option
from .check import findings, read_facts
from .common import load_for_inference, probe_inputs

FORMATS = ("peft", "gguf", "ollama")
OUTTYPES = gguf_io.OUTTYPES
_TARGET = {"gguf": "llamacpp", "ollama": "ollama", "peft": "peft"}
MERGE_TOLERANCE = 1e-3  # largest logit change merged vs unmerged, as `adapterkit merge` accepts by default


@dataclass
class ExportSettings:
    adapter: str = option(None, "adapter folder (adapterkit's format)", required=True)
    output: str = option(None, "folder to write (peft, ollama), or a FILE.gguf (gguf)", required=True)
    format: str = option("peft", "peft: a Hugging Face PEFT folder; gguf: a GGUF file; ollama: GGUF + Modelfile",
                         choices=FORMATS)
    merged: bool = option(False, "gguf/ollama: the whole merged model (with its tokenizer) instead of a LoRA adapter")
    outtype: str | None = option(None, "gguf/ollama tensor type: f32, f16, bf16 or q8_0 (default: f32 for a LoRA "
                                 "adapter, f16 for a model)", choices=OUTTYPES)
    model: str | None = option(None, "the base model (default: the one recorded in the adapter)")
    overwrite: bool = option(False, "replace the output (a GGUF file, or a folder holding only adapterkit's files)")
    force: bool = option(False, "load the adapter onto a base model other than its own")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.format == "peft" and (self.merged or self.outtype):
            raise AdapterkitError("--merged and --outtype apply to --format gguf and ollama; a PEFT folder holds the "
                                  "adapter as it is")


def _refuse(settings: ExportSettings, meta: dict) -> None:
    """`adapterkit check` for the format's target: the first finding as the error."""
    config = config_from_json(meta)
    if settings.format == "peft":
        refuse_unexportable(config)
    lines = findings(read_facts(settings.adapter, settings.model, settings.merged), _TARGET[settings.format])
    if lines:
        more = f" ({len(lines) - 1} more: adapterkit check {settings.adapter} --target {_TARGET[settings.format]})" \
            if len(lines) > 1 else ""
        raise AdapterkitError(lines[0] + more)


def export(settings: ExportSettings) -> Path:
    """Load the adapter onto its base model and write it in the chosen format; returns the file or folder."""
    if is_peft_folder(settings.adapter):
        raise AdapterkitError(f"{settings.adapter} is a PEFT adapter folder already; PEFT loads it as it is")
    meta, _ = read_adapter(settings.adapter)
    _refuse(settings, meta)  # before the slow part
    out = Path(settings.output)
    if settings.format == "gguf":
        gguf_io.check_output_file(out, settings.overwrite)
    else:
        check_output(out, settings.overwrite)
    base = settings.model or recorded_base(meta) or DEFAULT_MODEL
    adapted, tokenizer = load_for_inference(base, settings.adapter, force=settings.force)
    if settings.format == "peft":
        return save(adapted, settings.output, format="peft", overwrite=settings.overwrite)
    if settings.merged:
        check_tokenizer(tokenizer, int(adapted.causal_lm.config.vocab_size))
    generation = dict(adapted.generation_info)
    if settings.format == "gguf":
        return _write_gguf(adapted, tokenizer, out, settings, generation)
    return _write_ollama(adapted, tokenizer, out, settings, base, generation)


def _outtype(settings: ExportSettings, model: bool) -> str:
    return settings.outtype or ("f16" if model else "f32")


@torch.no_grad()
def merged_model(adapted, tokenizer):
    """The plain merged model; refuses one whose logits drift from the unmerged adapter's."""
    probe = probe_inputs(tokenizer)
    before = adapted(**probe).logits.float()
    plain = adapted.merge_and_unload()
    drift = (before - plain(**probe).logits.float()).abs().max().item()
    if not drift <= MERGE_TOLERANCE:
        raise AdapterkitError(f"merged logits differ from unmerged by {drift:.3g} (> {MERGE_TOLERANCE}); nothing written")
    return plain


def _chat_template(generation: dict, tokenizer) -> str | None:
    return generation.get("chat_template") or getattr(tokenizer, "chat_template", None)


def _write_gguf(adapted, tokenizer, out: Path, settings: ExportSettings, generation: dict) -> Path:
    if settings.merged:
        plain = merged_model(adapted, tokenizer)
        return gguf_io.write_model(plain, tokenizer, out, _outtype(settings, True), _chat_template(generation, tokenizer))
    return gguf_io.write_lora(adapted, adapted._single_name(), out, _outtype(settings, False))


def _write_ollama(adapted, tokenizer, out: Path, settings: ExportSettings, base: str, generation: dict) -> Path:
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token")}
    template, system, stops = template_for(generation, special)
    eos = tokenizer.convert_ids_to_tokens(generation.get("eos_token_id", tokenizer.eos_token_id))
    stops = [*stops, eos] if isinstance(eos, str) else stops
    if not settings.merged:
        check_tokenizer(tokenizer, int(adapted.causal_lm.config.vocab_size))  # the base GGUF carries it
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(out):
            tmp.mkdir(parents=True)
        chat_template = _chat_template(generation, tokenizer)
        if settings.merged:
            plain = merged_model(adapted, tokenizer)
            gguf_io.write_model(plain, tokenizer, tmp / "model.gguf", _outtype(settings, True), chat_template)
            names = ("model.gguf", None)
        else:
            gguf_io.write_lora(adapted, adapted._single_name(), tmp / "adapter.gguf", _outtype(settings, False))
            base_model, _ = load_model(base)  # the base without the adapter, for FROM
            gguf_io.write_model(base_model, tokenizer, tmp / "base.gguf", settings.outtype or "f16", chat_template)
            names = ("base.gguf", "adapter.gguf")
        with writing(out):
            (tmp / MODELFILE).write_text(modelfile(names[0], names[1], template, system, stops), encoding="utf-8")
        publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
