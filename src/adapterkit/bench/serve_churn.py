"""Serving while adapters come and go: 200 requests over 4 adapters, one adapter loaded and another
unloaded mid-run, every answer checked against the same request served alone.

    python -m adapterkit.bench.serve_churn           # appends (or replaces) its table in BENCHMARKS.md

`adapterkit serve` on the default model (its own process) starts with four adapters: LoRA, AdapterH,
P-Tuning v2 (prompt family: prefilled on its own) and DoRA. 32 client threads send non-streaming
greedy completions. The first half of the requests go to those four in turn; once all of DoRA's have
reached the server, the benchmark unloads DoRA while DoRA's requests are still running, then loads a fifth adapter
(LoRA r16); the second half go to LoRA, AdapterH, P-Tuning v2 and the new adapter. Every answer must be
the library's own greedy answer for that adapter and prompt, generated alone (batch of one, no server),
and must name the adapter asked for with the fingerprint hash `GET /v1/adapters` lists for it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from adapterkit.bench.serve_load import TOPICS, health, save_adapters, served
from adapterkit.bench.train_speed import ROOT, machine, write_section

STAYING = ["lora-qv", "adapter-h", "p-tuning-v2"]
LEAVING, ARRIVING = "dora", "lora-r16"
MAX_TOKENS = 32


def prompts() -> list[str]:
    return [f"Name one fact about {topic}." for topic in TOPICS]


def plan(requests: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(the first half's (adapter, prompt) pairs, the second half's)."""
    texts, half = prompts(), requests // 2
    first = [([*STAYING, LEAVING][i % 4], texts[i % len(texts)]) for i in range(half)]
    second = [([*STAYING, ARRIVING][i % 4], texts[(i + 3) % len(texts)]) for i in range(requests - half)]
    return first, second


def call(url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; an HTTP error is returned, not raised."""
    request = urllib.request.Request(url + path, method=method, headers={"Content-Type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def references(folders: dict[str, Path], pairs: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Each (adapter, prompt)'s greedy answer from the library, alone: a batch of one, no server."""
    from adapterkit.models import DEFAULT_MODEL
    from adapterkit.recipes.common import load_for_inference
    from adapterkit.recipes.generate import generate

    answers = {}
    for name in sorted({name for name, _ in pairs}):
        model, tokenizer = load_for_inference(DEFAULT_MODEL, str(folders[name]))
        with torch.no_grad():
            for adapter, prompt in sorted(pairs):
                if adapter == name:
                    answers[adapter, prompt] = generate(model, tokenizer, [prompt], "alpaca", MAX_TOKENS)[0]
        del model
    return answers


def run(url: str, folders: dict[str, Path], first: list[tuple[str, str]], second: list[tuple[str, str]],
        clients: int) -> dict:
    work: queue.Queue = queue.Queue()
    results: list[dict] = []
    lock, sent = threading.Lock(), [0]

    def client() -> None:
        while (item := work.get()) is not None:
            name, prompt = item
            with lock:
                sent[0] += 1
            start = time.perf_counter()
            status, body, headers = call(url, "POST", "/v1/completions", {
                "model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
            with lock:
                results.append({"adapter": name, "prompt": prompt, "status": status, "body": body,
                                "headers": {k.lower(): v for k, v in headers.items()},
                                "seconds": time.perf_counter() - start})

    hashes = {a["name"]: a["fingerprint"] for a in call(url, "GET", "/v1/adapters")[1]["data"]}
    for item in first:
        work.put(item)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    leaving = sum(name == LEAVING for name, _ in first)
    while True:  # every request for the leaving adapter taken in by the server (answered or in flight)
        answered = sum(r["adapter"] == LEAVING for r in results)
        listed = {a["name"]: a for a in call(url, "GET", "/v1/adapters")[1]["data"]}
        if answered + listed[LEAVING]["in_flight"] >= leaving:
            break
        time.sleep(0.01)
    unloaded = call(url, "DELETE", f"/v1/adapters/{LEAVING}")
    events = {"unloaded": {"status": unloaded[0], "in_flight": unloaded[1].get("in_flight"), "after": sent[0]}}
    loaded = call(url, "POST", "/v1/adapters", {"name": ARRIVING, "path": str(folders[ARRIVING])})
    events["loaded"] = {"status": loaded[0], "after": sent[0], "answered": len(results)}
    hashes[ARRIVING] = loaded[1].get("fingerprint")
    for item in second:
        work.put(item)
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"results": results, "events": events, "hashes": hashes, "wall": wall}


def judge(outcome: dict, answers: dict) -> dict:
    failed = [r for r in outcome["results"] if r["status"] != 200]
    wrong_text = [r for r in outcome["results"] if r["status"] == 200
                  and r["body"]["choices"][0]["text"].strip() != answers[r["adapter"], r["prompt"]]]
    wrong_adapter = [r for r in outcome["results"] if r["status"] == 200 and (
        r["body"].get("adapter") != r["adapter"] or r["body"].get("fingerprint") != outcome["hashes"][r["adapter"]]
        or r["headers"].get("x-adapterkit-fingerprint") != outcome["hashes"][r["adapter"]])]
    return {"failed": failed, "wrong_text": wrong_text, "wrong_adapter": wrong_adapter}


def render(outcome: dict, verdict: dict, args, stats: dict) -> str:
    results, events = outcome["results"], outcome["events"]
    by_adapter: dict[str, list[dict]] = {}
    for r in results:
        by_adapter.setdefault(r["adapter"], []).append(r)
    lines = [
        f"## Serving while adapters are loaded and unloaded: {args.requests} requests over 4 adapters",
        "",
        f"Command: `python -m adapterkit.bench.serve_churn --requests {args.requests} --clients {args.clients}`  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine()}; {args.threads} torch thread(s) in the server",
        "",
        __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
        f"In this run {LEAVING} was unloaded (HTTP {events['unloaded']['status']}) once its last request had reached "
        f"the server, {events['unloaded']['after']} requests sent, {events['unloaded']['in_flight']} of its own still "
        f"running; then {ARRIVING} was loaded (HTTP {events['loaded']['status']}, verified first) while "
        f"{len(results) - events['loaded']['answered']} requests were still to be answered. Server counters over the run: "
        f"{stats.get('completed', '?')} completed, {stats.get('failed', '?')} failed, {stats.get('joined', '?')} "
        f"requests joined a batch already decoding.",
        "",
        "| adapter | requests | answered (HTTP 200) | answer equal to the library's alone | right adapter and hash "
        "| seconds per request (median) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    wrong_text, wrong_adapter = map(lambda rs: {id(r) for r in rs}, (verdict["wrong_text"], verdict["wrong_adapter"]))
    for name, rs in by_adapter.items():
        ok = [r for r in rs if r["status"] == 200]
        seconds = sorted(r["seconds"] for r in rs)[len(rs) // 2]
        lines.append(f"| {name} | {len(rs)} | {len(ok)} | {sum(id(r) not in wrong_text for r in ok)} | "
                     f"{sum(id(r) not in wrong_adapter for r in ok)} | {seconds:.1f} |")
    total = len(results)
    lines.append(f"| **all** | {total} | {total - len(verdict['failed'])} | {total - len(verdict['failed']) - len(wrong_text)} "
                 f"| {total - len(verdict['failed']) - len(wrong_adapter)} | wall {outcome['wall']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the references")
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"), help="'' to print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        names = [*STAYING, LEAVING, ARRIVING]
        print("saving 5 adapters", flush=True)
        save_adapters(Path(tmp), names)
        folders = {name: Path(tmp) / name for name in names}
        first, second = plan(args.requests)
        print("the library's answers, one request at a time", flush=True)
        answers = references(folders, set(first) | set(second))
        with served([f"{n}={folders[n]}" for n in [*STAYING, LEAVING]], 32, args.threads) as url:
            before = health(url)
            print(f"{args.requests} requests, {args.clients} clients", flush=True)
            outcome = run(url, folders, first, second, args.clients)
            after = health(url)
    verdict = judge(outcome, answers)
    stats = {k: after[k] - before[k] for k in ("completed", "failed", "joined") if k in after and k in before}
    table = render(outcome, verdict, args, stats)
    print(table)
    for kind, rows in verdict.items():
        for r in rows[:5]:
            print(f"{kind}: {r['adapter']} {r['prompt']!r}: HTTP {r['status']} {json.dumps(r['body'])[:300]}")
    if args.write:
        write_section(Path(args.write), table, "serve_churn")
    if any(verdict.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
