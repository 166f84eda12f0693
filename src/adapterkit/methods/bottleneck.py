"""Bottleneck adapters: h + s * up(act(down(x))), with down: d -> b and up: b -> d.

Three presets of one config (as AdapterHub's SeqBn / DoubleSeqBn / ParBn):
- adapter-h (Houlsby et al. 2019): series adapters on the attention output and on the MLP output
  of each layer, i.e. after each sub-layer's output projection, before its residual add;
- adapter-p (Pfeiffer et al. 2020): one series adapter on the MLP output;
- parallel (He et al. 2022): fed with the sub-layer's input (the normalised hidden state entering
  the MLP, or the attention), its scaled output added to the sub-layer's output.
These are the papers' placements. With `target_modules` (or preset "llm-adapters") the adapters sit
around named linear layers instead, as LLM-Adapters placed them: series = adapter on a linear
layer's output, parallel = adapter fed with a linear layer's input and added to its output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..architectures import is_linear, linear_shape
from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..settings import option
from ..sites import Dropout, Effect, base_module, cast_for_adapter
from ..targets import match_modules
from .gathered import Composition
from .registry import Method, register_method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
INITS = ("identity", "normal")
PRESETS = ("llm-adapters",)
SERIES_SITES = ("attn_out", "mlp_out")  # roles of the architecture table a series adapter can follow


@dataclass
class BottleneckConfig(AdapterConfig):
    """Options shared by the three bottleneck adapters."""

    method: ClassVar[str] = ""
    series: ClassVar[bool] = True
    bottleneck_size: int | None = option(None, "hidden size b of the adapter (default 64, or from reduction_factor)")
    reduction_factor: float | None = option(None, "b = hidden size / reduction_factor (instead of bottleneck_size)")
    non_linearity: str = option("relu", "relu, gelu, silu (swish) or tanh")
    dropout: float = option(0.0, "dropout inside the adapter, after the non-linearity", flag="--adapter-dropout")
    scaling: float | str = option(1.0, "output scale s: a number, or 'learned' for a trainable scalar")
    init: str = option("identity", "identity: up-projection zero, so training starts at the base model; "
                       "normal: N(0, 0.02) everywhere, as LLM-Adapters", flag="--adapter-init")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    target_modules: list[str] | None = option(
        None, "LLM-Adapters placement: around these named linear layers instead of the paper's sites")
    position: str = option("output", "with target_modules, a series adapter on the layer's output, or on its "
                           "input (LLM-Adapters' mh_adapter: linear(x + s * adapter(x)))")
    preset: str | None = option(None, "llm-adapters: its published placement, bottleneck 256 and settings")

    def __post_init__(self) -> None:
        if self.preset == "llm-adapters":
            self._apply_llm_adapters_preset()
        super().__post_init__()

    def _apply_llm_adapters_preset(self) -> None:
        if self.bottleneck_size is None and self.reduction_factor is None:
            self.bottleneck_size = 256
        if self.series and self.non_linearity == "relu":
            self.non_linearity = "tanh"

    def validate(self) -> None:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise AdapterkitError("give bottleneck_size or reduction_factor, not both")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0):
            raise AdapterkitError(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            raise AdapterkitError(f"reduction_factor must be positive, got {self.reduction_factor!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise AdapterkitError(f"non_linearity must be one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterkitError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.scaling != "learned" and (isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float))):
            raise AdapterkitError(f"scaling must be a number or 'learned', got {self.scaling!r}")
        if self.init not in INITS:
            raise AdapterkitError(f"init must be one of {INITS}, got {self.init!r}")
        if self.position not in ("output", "input"):
            raise AdapterkitError(f"position must be output or input, got {self.position!r}")
        if self.preset is not None and self.preset not in PRESETS:
            raise AdapterkitError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise AdapterkitError("target_modules is an empty list; name linear layers or leave it unset")

    def size(self, hidden: int) -> int:
        if self.reduction_factor is not None:
            return max(1, int(hidden // self.reduction_factor))
        return self.bottleneck_size or 64


@dataclass
class SeriesConfig(BottleneckConfig):
    """Series adapters on sub-layer outputs; the presets differ only in their field values."""

    # With preset llm-adapters on a gated MLP: "input" puts the adapters before the MLP's input
    # projections (LLM-Adapters' AdapterH runs), "output" after its output projection.
    llm_adapters_position: ClassVar[str] = "output"
    sites: list[str] = option(["mlp_out"], "series adapters after these sub-layer outputs: attn_out, mlp_out",
                              flag="--adapter-sites")

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.sites, list) or not self.sites or any(s not in SERIES_SITES for s in self.sites):
            raise AdapterkitError(f"sites must be a non-empty list of {', '.join(SERIES_SITES)}, got {self.sites!r}")


@dataclass
class AdapterHConfig(SeriesConfig):
    """Houlsby: series adapters after the attention output and after the MLP output."""

    method: ClassVar[str] = "adapter-h"
    llm_adapters_position: ClassVar[str] = "input"
    sites: list[str] = option(["attn_out", "mlp_out"], "series adapters after these sub-layer outputs: "
                              "attn_out, mlp_out", flag="--adapter-sites")


@dataclass
class AdapterPConfig(SeriesConfig):
    """Pfeiffer: one series adapter after the MLP output."""

    method: ClassVar[str] = "adapter-p"


@dataclass
class ParallelConfig(BottleneckConfig):
    """He et al.: an adapter beside the sub-layer, fed with its input."""

    method: ClassVar[str] = "parallel"
    series: ClassVar[bool] = False
    location: str = option("mlp", "beside the mlp, the attn, or both")

    def validate(self) -> None:
        super().validate()
        if self.location not in ("mlp", "attn", "both"):
            raise AdapterkitError(f"location must be mlp, attn or both, got {self.location!r}")


class Bottleneck(Effect):
    """s * up(dropout(act(down(x)))): the adapter itself; subclasses decide where x comes from."""

    def __init__(self, features: int, config: BottleneckConfig, hidden: int):
        super().__init__()
        size = config.size(hidden)
        self.adapter_down = nn.Linear(features, size)
        self.adapter_up = nn.Linear(size, features)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.drop = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.scaling == "learned":
            self.adapter_scale = nn.Parameter(torch.ones(()))
        else:
            self.register_buffer("adapter_scale", torch.tensor(float(config.scaling)), persistent=False)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)
        if config.init == "identity":
            nn.init.zeros_(self.adapter_up.weight)
        else:
            nn.init.normal_(self.adapter_up.weight, std=0.02)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        h = cast_for_adapter(x, self.adapter_down.weight)
        return self.adapter_up(self.drop(self.act(self.adapter_down(h)))) * self.adapter_scale

    # Mixed batches: adapters of one kind at one site, any bottleneck size, run as one gathered product
    # (methods/gathered.py: down = D, up = U, the scale folded into U and e).
    def gather_key(self) -> tuple | None:
        if not self.acts_on_output or getattr(self, "source", None) is not None:
            return None  # on the input, or fed by a captured sub-layer input: row by row
        return (type(self), self.adapter_down.in_features, self.adapter_up.out_features,
                self.adapter_down.weight.dtype, type(self.act), getattr(self.drop, "p", 0.0))

    def gather_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.adapter_down.weight, self.adapter_down.bias, self.adapter_up.weight * self.adapter_scale,
                self.adapter_up.bias * self.adapter_scale)

    def gather_rows(self, per_adapter, slots) -> Composition:
        return Composition(per_adapter, slots)

    def gathered_adapter(self, rows: Composition, x: torch.Tensor, y: torch.Tensor, fresh: bool) -> torch.Tensor:
        """y plus, per row, its own adapter on x (y written in place if fresh: see Composition.add_to)."""
        act = (lambda h: self.drop(self.act(h))) if self.training else self.act
        return rows.added(y, cast_for_adapter(rows.select(x), rows.parts[0][0]), act, fresh)


class SeriesAdapter(Bottleneck):
    """On a module's output: y + s * up(act(down(y)))."""

    acts_on_output = True

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.adapter(y).to(y.dtype)

    def on_output_gathered(self, rows, x, y, fresh=False):
        return self.gathered_adapter(rows, y, y, fresh)


class InputAdapter(Bottleneck):
    """Before a module, on its input: module(x + s * up(act(down(x)))) (LLM-Adapters' mh_adapter)."""

    acts_on_input = True

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.adapter(x).to(x.dtype)


class ParallelAdapter(Bottleneck):
    """Beside a module: y + s * up(act(down(x))), x the module's input or a captured sub-layer input."""

    acts_on_output = True

    def __init__(self, features_in: int, features_out: int, config: BottleneckConfig, hidden: int):
        super().__init__(features_in, config, hidden)
        if features_out != features_in:
            self.adapter_up = nn.Linear(self.adapter_up.in_features, features_out)
            nn.init.zeros_(self.adapter_up.bias)
            (nn.init.zeros_ if config.init == "identity" else
             lambda w: nn.init.normal_(w, std=0.02))(self.adapter_up.weight)
        self.source: InputCapture | None = None

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        source = x if self.source is None else self.source.take()
        return y + self.adapter(source).to(y.dtype)

    def on_output_gathered(self, rows, x, y, fresh=False):
        return self.gathered_adapter(rows, x, y, fresh)


class InputCapture(Effect):
    """Remembers the input of a sub-layer's first module for the parallel adapter at its output.

    Within one adapter the same batch rows reach both sites, so the captured tensor lines up with
    the rows the parallel adapter sees, in mixed batches too.
    """

    acts_on_input = True

    def __init__(self):
        super().__init__()
        self._x: torch.Tensor | None = None

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        self._x = x
        return x

    def take(self) -> torch.Tensor:
        if self._x is None:
            raise RuntimeError("parallel adapter ran before its input was captured; the placement is wrong")
        x, self._x = self._x, None
        return x


def features(module: nn.Module) -> tuple[int, int]:
    return linear_shape(module)[:2]


def llm_adapters_placement(arch, config: BottleneckConfig) -> tuple[list[str], str]:
    """Where LLM-Adapters' published runs put each adapter (its math_running_commands):
    LLaMA (a gated MLP): AdapterH = input adapters on the two MLP input projections, parallel on
    up_proj + down_proj; BLOOMZ and GPT-J (plain MLP): series = output adapter on the MLP output
    projection, parallel on both MLP projections; AdapterP = output adapter on the MLP output.
    Families it never ran follow the rule of their MLP shape."""
    if not arch.mlp_in:
        raise AdapterkitError("preset llm-adapters places adapters on the MLP's linear layers, and this model's MLP "
                              "is a mixture-of-experts block without them; drop the preset (the papers' placement "
                              "puts the adapter on the block's output)")
    if not config.series:
        return [arch.mlp_in[-1], arch.mlp_out], "output"
    if config.llm_adapters_position == "input" and len(arch.mlp_in) > 1:
        return list(arch.mlp_in), "input"
    return [arch.mlp_out], "output"


def attach_bottleneck(adapted, config: BottleneckConfig) -> dict[str, nn.Module]:
    layout = adapted.layout
    model = adapted.causal_lm
    hidden = layout.shape.hidden
    layers = layout.layer_indices(config.layers)
    targets, position = config.target_modules, config.position
    if config.preset == "llm-adapters" and targets is None:
        targets, position = llm_adapters_placement(layout.arch, config)
    parts: dict[str, nn.Module] = {}
    if targets is not None:  # LLM-Adapters: around named linear layers
        layer_paths = tuple(layout.layer_path(i) + "." for i in layers)
        for path in match_modules(model, targets, is_linear, "linear"):
            if not path.startswith(layer_paths):
                continue
            n_in, n_out = features(base_module(model, path))
            if not config.series:
                parts[path] = ParallelAdapter(n_in, n_out, config, hidden)
            else:
                parts[path] = SeriesAdapter(n_out, config, hidden) if position == "output" else \
                    InputAdapter(n_in, config, hidden)
        return parts
    if config.series:  # the papers' placements
        for i in layers:
            for role in config.sites:
                path = layout.site(i, role)
                parts[path] = SeriesAdapter(hidden, config, hidden)  # a sub-layer's output: hidden-sized
        return parts
    sublayers = {"mlp": [("mlp_in", "mlp_out")], "attn": [("attn_in", "attn_out")],
                 "both": [("attn_in", "attn_out"), ("mlp_in", "mlp_out")]}[config.location]
    for i in layers:
        for source_role, out_role in sublayers:
            source_path = layout.input_site(i, source_role)
            out_path = layout.site(i, out_role)
            adapter = ParallelAdapter(hidden, hidden, config, hidden)
            if source_path != out_path:  # else (a MoE block) the adapter reads its own site's input
                adapter.source = parts[source_path] = InputCapture()
            parts[out_path] = adapter
    return parts


class BottleneckMethod(Method):
    family = "adapter"

    def attach(self, adapted, config: BottleneckConfig) -> dict[str, nn.Module]:
        return attach_bottleneck(adapted, config)


for _config, _summary in (
        (AdapterHConfig, "Houlsby: series bottleneck after attention and after the MLP"),
        (AdapterPConfig, "Pfeiffer: one series bottleneck after the MLP"),
        (ParallelConfig, "He et al.: bottleneck beside the MLP (or attention), fed with its input")):
    register_method(BottleneckMethod(_config, _summary))
