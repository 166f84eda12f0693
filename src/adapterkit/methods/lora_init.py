"""LoRA starting values that rewrite the base weight, as PEFT's init_lora_weights = "pissa", "pissa_niter_N",
"olora" and "loftq" (PEFT 0.21.2's pissa_init, olora_init, loftq_init), computed in fp32 on W as [out, in]:

- pissa: W = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, base W - s B A (Meng et al. 2024).
  pissa_niter_N: the same from torch.svd_lowrank with N subspace iterations (seeded with 0, so a run, a
  resumed run and a test draw the same projections).
- olora: W = Q R; B = Q[:, :r], A = R[:r], base W - s B A (Buyukakyuz 2024).
  For these two the model's output is unchanged at step 0.
- loftq: alternate T = loftq_iter times: Q = NF4(W - B A) (bitsandbytes' NF4, blocksize 64, no double
  quantization, as PEFT's), B A = the rank-r SVD of W - Q; the base becomes the dequantized Q (kept in the
  base's float dtype), so base + B A approximates W (Li et al. 2023). As PEFT's, B A is not divided by
  s = alpha / r: the step-0 model is Q + s (W - Q), W's approximation only with alpha = r (warned).

The adapter is only valid on that changed base, so saving keeps what rebuilds it from the original weight
(`base_change` tensors): B0 and A0 for pissa/olora (base = W - s B0 A0, the same fp32 arithmetic, so the
same bits); for loftq with T > 1 the factors subtracted before the last quantization (T = 1 needs none:
base = NF4(W)). Loading onto the original base applies them again. The original weight is kept in host
memory while the adapter is attached, so deleting the adapter restores the base exactly.
"""

from __future__ import annotations

import importlib.util
import re

import torch
from torch import nn

from ..architectures import linear_shape
from ..errors import AdapterkitError, warn
from ..quantization import is_quantized
from .lora_effects import LoraEffect

BASIC_INITS = ("default", "gaussian")
BASE_INITS = ("pissa", "pissa_niter_N", "olora", "loftq")
NAMED_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
_NITER = re.compile(r"pissa_niter_(.*)")
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's LoftQ quantizes with


def check_init(init, loftq_iter) -> None:
    """One line for a bad init name, iteration count, or a LoftQ without bitsandbytes."""
    choices = ", ".join(BASIC_INITS + BASE_INITS)
    if not isinstance(init, str):
        raise AdapterkitError(f"lora init must be one of {choices}, got {init!r}")
    niter = _NITER.fullmatch(init)
    if niter is not None and not (niter[1].isdigit() and int(niter[1]) > 0):
        raise AdapterkitError(f"lora init {init!r}: N in pissa_niter_N must be a positive integer "
                              "(subspace iterations of the randomised SVD), e.g. pissa_niter_4")
    if niter is None and init not in NAMED_INITS:
        raise AdapterkitError(f"lora init must be one of {choices}, got {init!r}")
    if not isinstance(loftq_iter, int) or isinstance(loftq_iter, bool) or loftq_iter < 1:
        raise AdapterkitError(f"lora loftq_iter must be a positive integer, got {loftq_iter!r}")
    if init == "loftq" and importlib.util.find_spec("bitsandbytes") is None:
        raise AdapterkitError("lora init loftq quantizes the base with bitsandbytes' NF4, which is not installed: "
                              "pip install 'adapterkit[quant]', or pick another --lora-init")


def changes_base(init: str) -> bool:
    return init not in BASIC_INITS


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """The weight quantized to NF4 (bitsandbytes, blocks of 64, fp32 absmax) and dequantized, in fp32."""
    try:
        import bitsandbytes.functional as bnb
    except ImportError as exc:
        raise AdapterkitError("lora init loftq needs bitsandbytes: pip install 'adapterkit[quant]'") from exc
    packed, state = bnb.quantize_4bit(weight.float().contiguous(), blocksize=NF4_BLOCKSIZE,
                                      compress_statistics=False, quant_type="nf4")
    return bnb.dequantize_4bit(packed, state).float()


def _rank_r_svd(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ's factors of the best rank-r approximation: L = U_r sqrt(S_r), R = sqrt(S_r) V_r^T."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root.unsqueeze(1) * vh[:r]


def starting_values(weight: torch.Tensor, init: str, r: int, scaling: float, loftq_iter: int
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(A, B, base_change) for an fp32 weight [out, in]; the new base is `changed_base(weight, ...)`."""
    if init == "loftq":
        previous: dict[str, torch.Tensor] = {}
        residual = weight
        for step in range(loftq_iter):
            lora_B, lora_A = _rank_r_svd(weight - nf4_round_trip(residual), r)
            if step + 1 < loftq_iter:
                previous = {"lora_A": lora_A, "lora_B": lora_B}
                residual = weight - lora_B @ lora_A
        return lora_A, lora_B, previous
    if init == "olora":
        q, rr = torch.linalg.qr(weight)
        lora_B, lora_A = q[:, :r].contiguous(), rr[:r].contiguous()
    else:
        niter = _NITER.fullmatch(init)
        if niter is None:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            devices = [weight.device] if weight.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(weight, q=r, niter=int(niter[1]))
            vh = v.T
        root = torch.diag(torch.sqrt(s / scaling))
        lora_A, lora_B = root @ vh, u @ root
    return lora_A, lora_B, {"lora_A": lora_A.clone(), "lora_B": lora_B.clone()}


def changed_base(weight: torch.Tensor, init: str, scaling: float, base_change: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """The new fp32 base weight [out, in] from the original one and the saved base_change tensors."""
    if init == "loftq":
        subtract = base_change["lora_B"] @ base_change["lora_A"] if base_change else None
        return nf4_round_trip(weight if subtract is None else weight - subtract)
    return weight - scaling * base_change["lora_B"] @ base_change["lora_A"]  # PEFT's order: (s B) A


class BaseChangingLoraEffect(LoraEffect):
    """LoRA whose start rewrites its base layer's weight (pissa, pissa_niter_N, olora, loftq)."""

    changes_base = True

    def __init__(self, base: nn.Module, config, train_bias: bool, r: int, alpha: float, path: str,
                 loading: bool = False):
        if is_quantized(base.weight):
            raise AdapterkitError(f"lora init {config.init} rewrites the base weight of {path} in full precision, "
                                  "and this base layer is stored quantized: load the base with --quantize none")
        in_features, out_features, _ = linear_shape(base)
        if r > min(out_features, in_features):
            raise AdapterkitError(f"lora init {config.init} takes r <= min(out, in) = {min(out_features, in_features)}"
                                  f" at {path} ({out_features} x {in_features}), got r={r}; lower --lora-r")
        super().__init__(base, config, train_bias, r, alpha)
        self._base, self.init, self.path, self.loftq_iter = [base], config.init, path, config.loftq_iter
        self._original: torch.Tensor | None = None  # the original weight while the base is changed
        self.base_change: dict[str, torch.Tensor] = {}
        if not loading:
            with torch.no_grad():
                lora_A, lora_B, base_change = starting_values(self._weight(), self.init, r, self.scaling,
                                                              self.loftq_iter)
                self.lora_A.copy_(lora_A)
                self.lora_B.copy_(lora_B)
            self.rebuild_base(base_change)

    def _weight(self) -> torch.Tensor:
        weight = self._base[0].weight.detach().float()
        return weight.T if self.transposed else weight

    def base_change_keys(self) -> tuple[str, ...]:
        """The names of the tensors saved to rebuild the changed base (none for a one-step LoftQ)."""
        return () if self.init == "loftq" and self.loftq_iter == 1 else ("lora_A", "lora_B")

    @torch.no_grad()
    def rebuild_base(self, base_change: dict[str, torch.Tensor]) -> None:
        """Change the (original) base weight as the saved base_change tensors say."""
        if self._original is not None:
            raise AdapterkitError(f"the base weight of {self.path} is already changed by this adapter")
        shapes = {"lora_A": tuple(self.lora_A.shape), "lora_B": tuple(self.lora_B.shape)}
        if set(base_change) != set(self.base_change_keys()):
            raise AdapterkitError(f"the adapter's base_change tensors of {self.path} are {sorted(base_change)}, "
                                  f"init {self.init} needs {list(self.base_change_keys())}; the adapter file is damaged")
        for key, t in base_change.items():
            if key not in shapes or tuple(t.shape) != shapes[key] or not torch.isfinite(t).all():
                raise AdapterkitError(f"the adapter's base_change tensor {self.path}.{key} does not fit "
                                      f"(needs shapes {shapes}, finite); the adapter file is damaged")
        device = self._base[0].weight.device
        self.base_change = {k: t.detach().float().to(device).clone() for k, t in base_change.items()}
        weight = self._base[0].weight
        new = changed_base(self._weight(), self.init, self.scaling, self.base_change)
        if not torch.isfinite(new).all():
            raise AdapterkitError(f"lora init {self.init} gives non-finite base weights at {self.path}")
        self._original = weight.data.to("cpu")  # no copy for a base on the CPU: the data is swapped, not written
        weight.data = (new.T if self.transposed else new).to(weight.dtype).contiguous()

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put the original base weight back (the adapter is deleted)."""
        if self._original is not None:
            weight = self._base[0].weight
            weight.data = self._original.to(weight.device)
            self._original = None


def init_warning(init: str, scaling: float) -> None:
    if init == "loftq" and scaling != 1.0:
        warn(f"lora init loftq (as PEFT's) fits B A to W - Q without the scaling alpha / r = {scaling:g}, so the "
             "starting model is Q + scaling x (W - Q); set alpha equal to r for LoftQ's approximation of W")
