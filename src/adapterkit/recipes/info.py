"""`adapterkit info`: a model's family and sizes as the architecture table reads them."""

from __future__ import annotations

from dataclasses import dataclass

from ..architectures import linear_module_names
from ..core import AdaptedModel
from ..models import DEFAULT_MODEL, load_model
from ..settings import check_fields, option
from .train import method_config


@dataclass
class InfoSettings:
    model: str = option(DEFAULT_MODEL, "the model to describe", positional=True)
    method: str | None = option(None, "also attach this method (default options) and report trainable parameters")

    def __post_init__(self) -> None:
        check_fields(self)


def info(settings: InfoSettings) -> list[str]:
    """The lines `adapterkit info` prints."""
    model, _ = load_model(settings.model)
    adapted = AdaptedModel(model)
    s, arch = adapted.layout.shape, adapted.layout.arch
    names = sorted({n.rpartition(".")[2] for n in linear_module_names(model)})
    lines = [f"model: {settings.model}", f"family: {model.config.model_type} ({type(model).__name__})",
             f"layers: {s.layers}  hidden: {s.hidden}  heads: {s.heads}  kv heads: {s.kv_heads}  "
             f"head dim: {s.head_dim}",
             f"attention: {arch.layers}.N.{arch.attention}  embeddings: {arch.embeddings}",
             f"linear modules: {', '.join(names)}",
             f"parameters: {sum(p.numel() for p in model.parameters()):,}"]
    if settings.method:
        adapted.add_adapter(method_config(settings.method, {}))
        lines.append(f"{settings.method}: {adapted.report()}")
    return lines
