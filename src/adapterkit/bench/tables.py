"""Markdown tables of benchmarks/train_speed.py results."""

from __future__ import annotations


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head, rows) -> str:
    return "\n".join([_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]) + "\n"


def tables(results: list[dict]) -> str:
    out = []
    train = [r for r in results if r["spec"]["section"] == "train"]
    if train:
        peft = {(r["method"], r["precision"]): r for r in train if r["library"] == "peft"}
        peft_name = {"lora": "lora", "prompt-tuning": "prompt", "p-tuning": "ptuning", "prefix-tuning": "prefix"}
        rows = []
        for r in train:
            label = f"{r['library']} {r['method']} ({r['precision']})"
            ref = peft.get((peft_name.get(r["method"], r["method"]), "fp32")) if r["library"] == "adapterkit" else None
            ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
            mem = f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if ref else "-"
            rows.append([label, f"{r['trainable']:,}", f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:.0f}",
                         f"{r['peak_rss_gb']:.2f}", f"{r['final_loss']:.3f}", ratio, mem])
        out.append("### Training, batch 8 x 256 tokens\n\nRatios are against PEFT's fp32 run of the same method "
                   "(tokens/s: higher is better; memory: lower is better). adapterkit's bf16 keeps the frozen base "
                   "in bf16 under autocast and the adapter and optimizer in fp32, computes logits only at labelled "
                   "positions and their loss in fp32 blocks, and draws dropout masks from 16 random bits an element; "
                   "its fp32 path is exact (torch's dropout: PEFT's masks for a seed). The loss column is the "
                   "loss of the last step's batch (the same batches for every run).\n\n" + _table(
                       ["configuration", "trainable", "s/step", "tokens/s", "peak RSS GB",
                        f"loss at step {len(train[0]['losses'])}", "tokens/s vs PEFT fp32", "memory vs PEFT fp32"],
                       rows))
        lora = {(r["library"], r["precision"]): r for r in train if r["method"] == "lora"}
        if ("adapterkit", "bf16") in lora:
            ours = lora[("adapterkit", "bf16")]["tokens_per_s"]
            lines = [f"- adapterkit LoRA bf16 vs PEFT LoRA {p}: {ours / lora[('peft', p)]['tokens_per_s']:.2f}x"
                     for p in ("fp32", "autocast", "peft-bf16-base") if ("peft", p) in lora]
            same_size = next((r for r in train if r["method"] == "adapter-p (LoRA's size)"), None)
            if same_size:
                lines.append(f"- adapter-p with LoRA's parameter count vs LoRA, both bf16: "
                             f"{same_size['tokens_per_s'] / ours:.2f}x")
            out.append("LoRA (r 8 on q, v, dropout 0.05):\n\n" + "\n".join(lines) + "\n")
    loss = [r for r in results if r["spec"]["section"] == "loss"]
    if loss:
        ref = next((r for r in loss if r["library"] == "peft"), None)
        rows = [[f"{r['library']} lora ({r['precision']})", len(r["losses"]), f"{r['final_loss']:.4f}",
                 f"{100 * (r['final_loss'] / ref['final_loss'] - 1):+.2f}%" if ref else "-",
                 f"{r['seconds_per_step']:.2f}"] for r in loss]
        out.append("### Loss after N steps (LoRA r 8, lr 3e-4, same batches and seed)\n\n" + _table(
            ["configuration", "steps", "loss at the last step", "vs PEFT fp32", "median s/step"], rows))
    gen = [row for r in results if r["spec"]["section"] == "generate" for row in r["rows"]]
    if gen:
        rounds = next(r["spec"]["repeats"] for r in results if r["spec"]["section"] == "generate")
        rows = [[r["method"], r["batch"], f"{r['tokens_per_s']:.1f}", f"{r['vs_base']:.2f}x",
                 f"{r['vs_base_range'][0]:.2f}-{r['vs_base_range'][1]:.2f}x"] for r in gen]
        out.append(f"### Generation, 64 new tokens, fp32, KV cache\n\nAll models in one process, timed in {rounds} "
                   "interleaved rounds; 'vs base model' is the median of the per-round ratios.\n\n" + _table(
                       ["model", "batch", "tokens/s (median)", "vs base model", "range over rounds"], rows))
    scaling = [r for r in results if r["spec"]["section"] == "scaling"]
    if scaling:
        rows = [[r.get("length", 256), r.get("rank") or 8, f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:.0f}",
                 f"{r['peak_rss_gb']:.2f}"] for r in scaling]
        out.append("### LoRA (bf16) step time by sequence length and rank, batch 8\n\n" + _table(
            ["sequence length", "rank", "s/step", "tokens/s", "peak RSS GB"], rows))
    return "\n".join(out)


def figure(results: list[dict], path) -> None:
    """One PNG: training tokens/s per configuration, generation speed against the base model, and
    LoRA step time by sequence length and rank (the panels whose sections were run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in results if r["spec"]["section"] == "train"]
    gen = [row for r in results if r["spec"]["section"] == "generate" for row in r["rows"]]
    scaling = [r for r in results if r["spec"]["section"] == "scaling"]
    panels = [p for p, rows in (("train", train), ("generate", gen), ("scaling", scaling)) if rows]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "train":
            labels = [f"{r['library']} {r['method']} ({r['precision']})" for r in train]
            colors = ["tab:gray" if r["library"] == "peft" else "tab:blue" for r in train]
            ax.barh(labels[::-1], [r["tokens_per_s"] for r in train][::-1], color=colors[::-1])
            ax.set_xlabel("training tokens/s (grey: PEFT, blue: adapterkit)")
        elif panel == "generate":
            for offset, batch in ((-0.2, 1), (0.2, 8)):
                rows = [r for r in gen if r["batch"] == batch]
                ax.barh([i + offset for i in range(len(rows))], [r["vs_base"] for r in rows], height=0.4,
                        label=f"batch {batch}")
            names = [r["method"] for r in gen if r["batch"] == 1]
            ax.set_yticks(range(len(names)), names)
            ax.invert_yaxis()
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xlim(0.8, 1.1)
            ax.set_xlabel("generation tokens/s vs the base model")
            ax.legend()
        else:
            by_length = [(r.get("length", 256) / 256, r["seconds_per_step"]) for r in scaling if "rank" not in r]
            by_rank = [(r["rank"] / 8, r["seconds_per_step"]) for r in scaling if "rank" in r]
            for points, label, marker in ((by_length, "sequence length 256, 512, 1024 (rank 8)", "o-"),
                                          (by_rank, "rank 8, 16, 32, 64 (length 256)", "s-")):
                ax.plot([x for x, _ in points], [t / points[0][1] for _, t in points], marker, label=label)
            ax.plot([1, 8], [1, 8], ":", color="gray", label="proportional")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("size relative to the smallest")
            ax.set_ylabel("LoRA bf16 step time relative to the smallest")
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
