"""Training a per-token module (a dense MLP) a tile of positions at a time, to bound its inner tensors."""

from __future__ import annotations

import torch

from .errors import AdapterkitError


class TiledModule(torch.autograd.Function):
    """Forward and backward of a per-token module a tile of positions at a time (Arctic's and Unsloth's
    tiled MLP): the forward runs without a graph and keeps only the inputs; the backward recomputes each
    tile with its graph and takes that tile's gradients. A checkpointed layer's MLP inner tensors (four
    times the MLP width a token) then exist for one tile at a time, for one more forward of the MLP."""

    @staticmethod
    def forward(ctx, run, tile: int, extra: int, x: torch.Tensor, *rest):
        args, params = rest[:extra], rest[extra:]
        ctx.run, ctx.tile, ctx.extra, ctx.params = run, tile, extra, params
        ctx.save_for_backward(x, *args)
        # the backward's recomputation runs as this forward did: the same dropout masks, the same autocast
        device = x.device.type
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.autocast = device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
        with torch.no_grad():
            tiles = [run(*(a[:, start:start + tile].contiguous() for a in (x, *args)))
                     for start in range(0, x.shape[1], tile)]
        if not all(isinstance(t, torch.Tensor) for t in tiles):
            raise AdapterkitError("a module tiled over positions must return one tensor")
        return torch.cat(tiles, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *args = ctx.saved_tensors
        inputs = [x, *args]
        grads_in = [torch.zeros_like(a) if needed else None for a, needed in
                    zip(inputs, ctx.needs_input_grad[3:3 + len(inputs)], strict=True)]
        grads_params = [torch.zeros_like(p) for p in ctx.params]
        device, dtype, autocast = ctx.autocast
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.set_rng_state(ctx.rng[0])
            if x.is_cuda:
                torch.cuda.set_rng_state(ctx.rng[1], x.device)
            for start in range(0, x.shape[1], ctx.tile):
                _tile_backward(ctx, inputs, grad, grads_in, grads_params, start, device, dtype, autocast)
        return (None, None, None, *grads_in, *grads_params)


def _tile_backward(ctx, inputs, grad, grads_in, grads_params, start, device, dtype, autocast) -> None:
    """One tile of TiledModule's backward: recompute it with its graph, add its gradients in."""
    parts = [a[:, start:start + ctx.tile].contiguous().detach().requires_grad_(whole is not None)
             for a, whole in zip(inputs, grads_in, strict=True)]
    with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
        out = ctx.run(*parts)
    wanted = [p for p in parts if p.requires_grad] + list(ctx.params)
    found = iter(torch.autograd.grad(out, wanted, grad[:, start:start + ctx.tile], allow_unused=True))
    for whole, part in zip(grads_in, parts, strict=True):
        if part.requires_grad and (g := next(found)) is not None:
            whole[:, start:start + ctx.tile] = g
    for total, g in zip(grads_params, found, strict=True):
        if g is not None:
            total += g
