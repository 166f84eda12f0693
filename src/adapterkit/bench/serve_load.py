"""Serving under load: 8 adapters on the default model, 32 concurrent streaming clients, 64 new tokens each.

    python -m adapterkit.bench.serve_load            # appends (or replaces) its table in BENCHMARKS.md

The server is `adapterkit serve` itself (uvicorn on 127.0.0.1, continuous batching) with 8 adapters of
6 methods (random non-zero weights, saved and verified as any adapter is), in its own process. Every client streams one
completion (greedy, 64 tokens: `ignore_eos`). Reported: aggregate tokens/s and time to first token,
against the base model alone batched (32 rows, no adapters, no server: a plain decoding loop and
transformers' `generate`), the same clients on the base model through the server, and the server taking
the requests one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch

from adapterkit.bench.train_speed import ROOT, machine, write_section

NEW_TOKENS = 64
TOPICS = ["the sea", "a cat", "trains", "bread", "the moon", "rain", "chess", "a library", "bees", "winter",
          "a bridge", "tea", "mountains", "a clock", "gardens", "the wind"]


def prompts(n: int) -> list[str]:
    return [f"Write {'two sentences' if i % 2 else 'a short note'} about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def adapter_configs() -> dict:
    import adapterkit as ak

    return {
        "lora-qv": ak.LoraConfig(r=8, alpha=16),
        "lora-all": ak.LoraConfig(r=8, alpha=16, target_modules="all-linear"),
        "lora-r16": ak.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "dora": ak.LoraConfig(r=8, alpha=16, use_dora=True),
        "adapter-h": ak.AdapterHConfig(bottleneck_size=64),
        "adapter-p": ak.AdapterPConfig(bottleneck_size=64),
        "prompt-tuning": ak.PromptTuningConfig(num_virtual_tokens=20),
        "p-tuning-v2": ak.PTuningV2Config(num_virtual_tokens=20),
    }


def save_adapters(folder: Path, names: list[str] | None = None) -> list[str]:
    """The adapters (all, or these of `adapter_configs`) saved in `folder`; their NAME=DIR specs."""
    import adapterkit as ak

    specs = []
    for seed, (name, config) in enumerate(adapter_configs().items()):
        if names is not None and name not in names:
            continue
        model, tokenizer = ak.load_model()
        adapted = ak.adapt(model, config, tokenizer=tokenizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            for key, p in adapted.adapter_state_dict(name="default").items():
                if key.endswith(("lora_B", "adapter_up.weight")):
                    p.normal_(0, 0.02)
        adapted.save(folder / name)
        specs.append(f"{name}={folder / name}")
    return specs


def stream(url: str, model: str, prompt: str) -> dict:
    """One streaming completion: seconds to the first text and to the end, tokens generated."""
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start, first, tokens = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("text") for c in event["choices"]):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": first, "seconds": time.perf_counter() - start, "tokens": tokens, "sent": start}


def concurrent(url: str, jobs: list[tuple[str, str]]) -> dict:
    load = os.getloadavg()[0]
    results: list[dict] = [{}] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = stream(url, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["sent"] + r["seconds"] for r in results) - min(r["sent"] for r in results)
    return summary(results, wall, load)


def one_at_a_time(url: str, jobs: list[tuple[str, str]]) -> dict:
    load, start = os.getloadavg()[0], time.perf_counter()
    results = [stream(url, *job) for job in jobs]
    return summary(results, time.perf_counter() - start, load)


def summary(results: list[dict], wall: float, load: float) -> dict:
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall, "load": load,
            "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def _batch(tokenizer, texts: list[str]) -> dict:
    from adapterkit.data import Template, collate

    encoded = [tokenizer(Template("alpaca").prompt({"instruction": t}, tokenizer))["input_ids"] for t in texts]
    return collate([{"input_ids": ids} for ids in encoded], tokenizer.pad_token_id, side="left")


def _timed(rows: int, run) -> dict:
    load, start = os.getloadavg()[0], time.perf_counter()
    run()
    wall = time.perf_counter() - start
    return {"requests": rows, "tokens": rows * NEW_TOKENS, "wall": wall, "tokens_per_s": rows * NEW_TOKENS / wall,
            "ttft_p50": None, "ttft_p95": None, "load": load}


def base_batch(texts: list[str]) -> tuple:
    """The base model alone, all rows in one batch, 64 tokens each, loaded once: (a plain decoding loop
    (forward + DynamicCache, as the server's), transformers' `generate` (what `adapterkit eval` calls)),
    each a function that runs and times itself."""
    import adapterkit as ak

    model, tokenizer = ak.load_model()
    batch = _batch(tokenizer, texts)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    model.generate(**{**kwargs, "max_new_tokens": 2})  # warm-up

    def loop() -> None:
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache, last, position = out.cache, out.logits[:, -1].argmax(-1), positions[:, -1] + 1
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, mask.new_ones(len(texts), 1)], dim=1)
            out = model(input_ids=last[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                        use_cache=True)
            cache, last, position = out.cache, out.logits[:, -1].argmax(-1), position + 1

    def generate() -> None:
        model.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    return (torch.no_grad()(lambda: _timed(len(texts), loop)), torch.no_grad()(lambda: _timed(len(texts), generate)))


def start_server(adapters: list[str], max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`adapterkit serve` in its own process (the clients here do not share its interpreter)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "adapterkit", "serve", "--port", str(port), "--max-batch-size", str(max_batch),
               "--max-queue", "256", "--adapter", ",".join(adapters)]
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the server
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 900
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log.seek(0)
                raise SystemExit(f"the server did not start:\n{log.read()}") from None
            time.sleep(0.5)


@contextmanager
def served(adapters: list[str], max_batch: int, threads: int):
    """A running server's URL; the server is interrupted (Ctrl-C, as a user stops it) on leaving."""
    process, url = start_server(adapters, max_batch, threads)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        return json.loads(response.read())


def measure_server(adapters: list[str], clients: int, sequential: int, max_batch: int, threads: int, rounds: int,
                   base_loop) -> dict:
    """The server's runs; the 8-adapter run `rounds` times, each between two runs of the plain base loop in
    this process (the server idles meanwhile), so each round has its own reference."""
    with served(adapters, max_batch, threads) as url:
        names = [a.split("=", 1)[0] for a in adapters]
        base = health(url)["base"]
        for name in [*names, base]:  # warm-up: one short request each
            stream(url, name, "Hello.")
        texts = prompts(clients)
        runs = {"loops": [base_loop()], "adapters": []}
        for _ in range(rounds):
            before = health(url)
            runs["adapters"].append(concurrent(url, [(names[i % len(names)], texts[i]) for i in range(clients)]))
            after = health(url)
            runs["adapters"][-1]["scheduler"] = {k: after[k] - before[k] for k in ("steps", "joined")}
            runs["loops"].append(base_loop())
        runs["base"] = concurrent(url, [(base, text) for text in texts])
        runs["alone"] = one_at_a_time(url, [(names[i % len(names)], texts[i]) for i in range(sequential)])
        return runs


def render(rows: list[tuple[str, dict, float]], args, stats: dict, ratios: list[float], engine: list[float]) -> str:
    def seconds(value):
        return "-" if value is None else f"{value:.2f}"

    lines = ["| run | requests | tokens | wall s | tokens/s | vs base batched loop | TTFT p50 s | TTFT p95 s "
             "| load average |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r, base in rows:
        lines.append(f"| {label} | {r['requests']} | {r['tokens']} | {r['wall']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {seconds(r['ttft_p50'])} | {seconds(r['ttft_p95'])} | "
                     f"{r['load']:.1f} |")
    return (f"## Serving: 8 adapters, {args.clients} concurrent streaming clients\n\n"
            f"Command: `python -m adapterkit.bench.serve_load --clients {args.clients} --sequential {args.sequential} "
            f"--threads {args.threads} --rounds {args.rounds}`  \n"
            f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}; the 2 cores were shared (the last "
            "column: the 1-minute load average as each run started; 2.0 would be the cores to ourselves)\n\n"
            f"`adapterkit serve` on the default model (fp32, CPU) with 8 adapters: LoRA (q/v r8, all-linear r8, "
            "attention r16, DoRA r8), AdapterH, AdapterP (bottleneck 64), prompt tuning and P-Tuning v2 (20 virtual "
            f"tokens). Each client streams one completion, greedy, {NEW_TOKENS} new tokens, over HTTP on 127.0.0.1; "
            f"clients take the adapters in turn. Batch limit {args.max_batch} rows; {args.threads} torch thread(s) in the "
            "server and in the base runs. The LoRA and bottleneck "
            "rows decode in one mixed batch, the LoRA-family adapters of any rank (and the bottleneck adapters) as one "
            "gathered product per site; each prompt method prefills its rows on their own, which then decode in the "
            "mixed batch (their virtual tokens are in the cache). "
            f"In the first 8-adapter round the scheduler ran {stats['steps']} decoding steps (one forward of one batch each) "
            f"and {stats['joined']} requests joined a batch already decoding. The server runs in its own process, the clients in another; TTFT is measured by "
            "the client (request sent to first text). The base model alone ran in the benchmark's process, all rows in one "
            "batch, as a plain decoding loop (prefill with logits at the last position only, then forward + DynamicCache "
            "per token, as the server's scheduler does) before and after each 8-adapter round (the server idle "
            "meanwhile), and once, at the end, through transformers' `generate` (what `adapterkit eval` calls; it computes "
            "the prefill's logits at every position). Each 8-adapter round's ratio is against the mean of the loop runs "
            "just before and after it; the other rows' against the mean of all loop runs. The base loop alone moves by "
            "about 10% from run to run on this machine, hence the rounds: **median of the rounds' ratios "
            f"{statistics.median(ratios):.2f}x** (each: {', '.join(f'{r:.2f}x' for r in ratios)}). Against the same "
            "clients all on the base model through the server (the same HTTP path and scheduler: the adapters' own "
            f"cost, less moved by other load on the cores): {', '.join(f'{r:.2f}x' for r in engine)}.\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=8, help="requests of the one-at-a-time run")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the base runs "
                        "(1: on shared cores, more threads than free cores slow everything down many times)")
    parser.add_argument("--rounds", type=int, default=3, help="8-adapter runs, each between two base loop runs")
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"), help="'' to print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("the base model batched, no server", flush=True)
    base_loop, base_generate = base_batch(prompts(args.clients))
    with tempfile.TemporaryDirectory() as tmp:
        print("saving 8 adapters; starting the server (it verifies each)", flush=True)
        runs = measure_server(save_adapters(Path(tmp)), args.clients, args.sequential, args.max_batch, args.threads,
                              args.rounds, base_loop)
    n, loops = args.clients, runs["loops"]
    speed = [loop["tokens_per_s"] for loop in loops]
    around = [(speed[i] + speed[i + 1]) / 2 for i in range(args.rounds)]
    reference = statistics.mean(speed)
    rows = [(f"server, 8 adapters, {n} concurrent clients, round {i + 1}", r, around[i])
            for i, r in enumerate(runs["adapters"])]
    rows += [(f"server, the same {n} clients all on the base model", runs["base"], reference),
             (f"server, 8 adapters, one request at a time ({args.sequential} requests)", runs["alone"], reference)]
    rows += [(f"base model, plain batched decoding loop ({n} rows, no server), run {i + 1}", loop, reference)
             for i, loop in enumerate(loops)]
    rows.append((f"base model, transformers `generate` ({n} rows, no server)", base_generate(), reference))
    ratios = [r["tokens_per_s"] / around[i] for i, r in enumerate(runs["adapters"])]
    engine = [r["tokens_per_s"] / runs["base"]["tokens_per_s"] for r in runs["adapters"]]
    table = render(rows, args, runs["adapters"][0]["scheduler"], ratios, engine)
    print(table)
    if args.write:
        write_section(Path(args.write), table, "serve_load")


if __name__ == "__main__":
    main()
