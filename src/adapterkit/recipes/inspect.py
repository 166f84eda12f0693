"""`adapterkit inspect`: what the architecture table sees in a model, every candidate target grouped
by role with shapes and counts, what each target group resolves to, and a method's trainable count."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..architectures import TARGET_GROUPS, ModelLayout, architecture_of, is_linear, linear_shape
from ..core import AdaptedModel
from ..models import DEFAULT_MODEL, load_model
from ..settings import check_fields, option
from ..sites import logical_modules
from ..targets import match_modules
from .train import method_config

ROLES = ("q", "k", "v", "qkv", "attn_out", "mlp_in", "mlp_out", "experts", "router", "embeddings", "head")


@dataclass
class InspectSettings:
    model: str = option(DEFAULT_MODEL, "the model to inspect", positional=True)
    method: str | None = option(None, "also attach this method and report trainable parameters")
    options: dict = option({}, "that method's options, e.g. target_modules=attn or JSON")
    json: bool = option(False, "print JSON instead of text")

    def __post_init__(self) -> None:
        check_fields(self)


def _role_paths(layout: ModelLayout, role: str) -> list[str]:
    arch, model = layout.arch, layout.model
    if role == "embeddings":
        return [arch.embeddings]
    if role == "head":
        head = model.get_output_embeddings()
        return [p for p, m in logical_modules(model) if m is head]
    relative = arch.mlp_in if role == "mlp_in" else (getattr(arch, role),)
    return [f"{layout.layer_path(i)}.{r}" for i in range(layout.shape.layers) for r in relative if r]


def _shape(module) -> list[int] | dict:
    if is_linear(module):
        return list(linear_shape(module)[:2][::-1])  # [out, in]
    weights = {n: list(p.shape) for n, p in module.named_parameters(recurse=False)}
    return weights or {"parameters": sum(p.numel() for p in module.parameters())}


def inspect(settings: InspectSettings) -> dict:
    model, _ = load_model(settings.model)
    arch = architecture_of(model)
    layout = ModelLayout(model, arch)
    roles = {}
    for role in ROLES:
        paths = _role_paths(layout, role)
        if paths:
            module = model.get_submodule(paths[0])
            roles[role] = {"count": len(paths), "example": paths[0], "type": type(module).__name__,
                           "shape": _shape(module)}
    head = tuple(_role_paths(layout, "head"))
    groups = {"all-linear": len(match_modules(model, "all-linear", exclude=head))}
    for group in TARGET_GROUPS:
        groups[group] = sum(len(layout.group_sites(i, group)) for i in range(layout.shape.layers))
    groups["experts (target_parameters)"] = (
        sum(p.dim() == 3 for path in _role_paths(layout, "experts")
            for p in model.get_submodule(path).parameters(recurse=False)) if arch.experts else 0)
    report = {
        "model": settings.model, "model_type": model.config.model_type, "class": type(model).__name__,
        "row": {k: v for k, v in dataclasses.asdict(arch).items() if not callable(v)},
        "shape": dataclasses.asdict(layout.shape), "roles": roles, "groups": groups,
        "tied_embeddings": model.get_input_embeddings().weight is getattr(model.get_output_embeddings(), "weight", None),
        "all_linear_reaches_experts": False if arch.experts else None,
    }
    if settings.method:
        adapted = AdaptedModel(model)
        adapted.add_adapter(method_config(settings.method, settings.options))
        trainable, total, percent = adapted.trainable_parameters()
        report["method"] = {"name": settings.method, "options": settings.options, "trainable": trainable,
                            "total": total, "percent": percent, "modules": len(adapted.records["default"].parts)}
    return report


def render(report: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(report, indent=2, default=str)
    lines = [f"model: {report['model']}  family row: {report['model_type']} ({report['class']})",
             "shape: " + "  ".join(f"{k} {v}" for k, v in report["shape"].items()),
             f"tied input/output embeddings: {report['tied_embeddings']}", "targets by role:"]
    lines += [f"  {role:<11} {r['count']:>4} x {r['type']} {r['shape']}  e.g. {r['example']}"
              for role, r in report["roles"].items()]
    lines.append("target groups: " + ", ".join(f"{k} = {v}" for k, v in report["groups"].items()))
    if report["all_linear_reaches_experts"] is False:
        lines.append("all-linear does not reach the fused experts: use target_parameters=['experts']")
    if "method" in report:
        m = report["method"]
        lines.append(f"{m['name']} {m['options'] or ''}: {m['trainable']:,} trainable of {m['total']:,} "
                     f"({m['percent']:.4f}%) on {m['modules']} modules")
    return "\n".join(lines)
