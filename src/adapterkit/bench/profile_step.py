"""Where a bf16 LoRA training step's time goes, and how far it is from the matmul floor.

    python -m adapterkit.bench.profile_step        # writes its section of BENCHMARKS.md

The step of `adapterkit bench` (default model, LoRA r 8 on q, v, batch 8 x 256 tokens of the math
training file, bf16 base under autocast, fp32 adapter and AdamW) runs under torch.profiler; each
operator's own CPU time is put in one of a few kinds (matrix products, attention, element-wise, loss,
optimizer, memory and copies, other). The floor: a frozen-base step costs about 4 x (linear weights)
x (tokens) in matrix products (forward, and backward to the activations only), divided by the bf16
GEMM rate measured on this machine in the same run on the model's own shapes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from adapterkit.bench.train_speed import ROOT, build, machine, packed_batches, write_section

KINDS = [  # (kind, substrings of aten operator names), first match wins
    ("attention", ("scaled_dot_product", "_flash_attention", "attention", "aten::bmm", "aten::baddbmm",
                   "aten::_softmax")),  # adapterkit's CPU training attention is bmm, softmax, bmm
    ("matrix products", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "clip_grad", "_fused")),
    ("memory and copies", ("copy_", "empty", "zeros", "clone", "to_copy", "cat", "contiguous", "fill_",
                           "index", "gather", "scatter", "resize", "as_strided", "stack")),
    ("element-wise", ("add", "mul", "sub", "div", "silu", "sigmoid", "neg", "pow", "rsqrt", "mean", "sum", "exp",
                      "where", "masked", "dropout", "bernoulli", "randint", "ge", "lt", "cos", "sin", "tanh")),
]


def kind_of(name: str) -> str:
    for kind, parts in KINDS:
        if any(part in name for part in parts):
            return kind
    return "other"


def gemm_rate(shapes: list[tuple[int, int, int]], repeats: int = 10, passes: int = 3) -> float:
    """bf16 FLOP/s over the step's products as the model runs them: F.linear(x, W) forward and
    grad @ W for the activations' gradient, W stored [out, in]. The best of `passes` passes: the
    floor is what the hardware can do, not what a busy moment gave."""
    best = 0.0
    for _ in range(passes):
        flops, seconds = 0.0, 0.0
        for rows, inner, out in shapes:
            x, weight = torch.randn(rows, inner, dtype=torch.bfloat16), torch.randn(out, inner, dtype=torch.bfloat16)
            grad = torch.randn(rows, out, dtype=torch.bfloat16)
            for product, a, b in ((torch.nn.functional.linear, x, weight), (torch.matmul, grad, weight)):
                product(a, b)  # warm-up
                start = time.perf_counter()
                for _ in range(repeats):
                    product(a, b)
                seconds += time.perf_counter() - start
                flops += 2.0 * rows * inner * out * repeats
        best = max(best, flops / seconds)
    return best


def _timed(step, batch) -> float:
    start = time.perf_counter()
    step(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    model, tokenizer, step, length, _ = build({"library": "adapterkit", "method": "lora", "precision": "bf16"})
    batches = packed_batches(tokenizer, 2 + args.steps, length=length)
    for batch in batches[:2]:
        step(batch)
    plain = statistics.median(_timed(step, batch) for batch in batches[2:])
    times = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        for batch in batches[2:]:
            start = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - start)
    by_kind: dict[str, float] = {}
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            by_kind[kind_of(event.key)] = by_kind.get(kind_of(event.key), 0.0) + event.self_cpu_time_total / 1e6
    profiled = sum(by_kind.values())
    seconds = statistics.median(times)
    tokens = 8 * length
    head = model.causal_lm.get_output_embeddings()
    linears = [m for m in model.causal_lm.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    weights = sum(m.in_features * m.out_features for m in linears)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches[2:]) // args.steps
    shapes = sorted({(tokens, m.in_features, m.out_features) for m in linears})
    rate = gemm_rate(shapes + [(labelled, head.in_features, head.out_features)])
    flops = 4.0 * weights * tokens + 4.0 * head.in_features * head.out_features * labelled
    floor = flops / rate
    rows = "".join(f"| {kind} | {1000 * total / args.steps:.0f} | {100 * total / profiled:.0f}% |\n"
                   for kind, total in sorted(by_kind.items(), key=lambda item: -item[1]))
    report = ("## Where a bf16 LoRA step's time goes\n\n"
              f"Command: `python -m adapterkit.bench.profile_step --steps {args.steps}`  \n"
              f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}\n\n"
              f"The step of `adapterkit bench` (LoRA r 8 on q, v; 8 x {length} tokens; bf16 base under autocast), "
              "under torch.profiler: each operator's own CPU time by kind, per step (ms; the profiler adds its own "
              "overhead, so the shares matter more than the sum).\n\n| kind | ms per step | share |\n| --- | --- | --- |\n"
              + rows +
              f"\nStep time under the profiler: median {seconds:.2f} s over {args.steps} steps; the load average was "
              f"{os.getloadavg()[0]:.1f} as it ended (2.0: the cores to ourselves). "
              f"Matmul floor: 4 x {weights / 1e6:.0f}M linear weights x {tokens} tokens, plus 4 x the output "
              f"head's {head.in_features * head.out_features / 1e6:.0f}M weights x the {labelled} labelled positions "
              f"(the only ones whose logits are computed) = {flops / 1e12:.2f} TFLOP, at the bf16 GEMM rate measured "
              f"in the same run on those shapes, forward and backward ({rate / 1e9:.0f} GFLOP/s) = {floor:.2f} s; "
              f"the step is {seconds / floor:.2f}x the floor. Steps timed without the profiler: median "
              f"{plain:.2f} s, {plain / floor:.2f}x the floor. A stricter yardstick: the step's own linear-layer "
              f"products, as the profiler timed them ({by_kind.get('matrix products', 0.0) / args.steps:.2f} s a step, "
              "faster than the same shapes in isolation), against the profiled step: "
              f"{seconds / (by_kind.get('matrix products', 0.0) / args.steps):.2f}x.\n")
    print(report)
    if args.write:
        write_section(Path(args.write), report, "profile_step")


if __name__ == "__main__":
    main()
