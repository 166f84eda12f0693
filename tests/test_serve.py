"""`adapterkit serve` on the tiny LLaMA: a real uvicorn server on 127.0.0.1 with LoRA, AdapterH, prompt
tuning and a chat-templated LoRA loaded at start (prefix tuning, Parallel and a PEFT folder loaded while
it runs). Greedy answers must equal the library's own generation (recipes.generate.generate, what
`adapterkit generate` prints), under concurrent load too; every mistake is a 4xx JSON error naming it."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny, tiny_tokenizer

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.recipes.common import generation_info, load_for_inference
from adapterkit.recipes.generate import generate
from adapterkit.recipes.serve import ServeSettings, build
from adapterkit.serving.decoding import TextProgress

KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["Add 1 and 2.", "hello there", "What is the capital of France?", "x", "Name three colours.",
           "Write a poem about the sea", "2 + 2 =", "Translate 'cat' to French.", "Why?", "List: a, b"]
AT_START = ("lora", "bottleneck", "prompt", "chat")
CONFIGS = {
    "lora": lambda: ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "bottleneck": lambda: ak.AdapterHConfig(bottleneck_size=8),
    "prompt": lambda: ak.PromptTuningConfig(num_virtual_tokens=4),
    "chat": lambda: ak.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "prefix": lambda: ak.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "parallel": lambda: ak.ParallelConfig(bottleneck_size=8),
    "peft-lora": lambda: ak.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
}


# ----- the model, the adapters, the library's answers -------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("serve-llama"))
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(model_dir, tmp_path_factory):
    """Each adapter with random non-zero weights, saved (the PEFT one exported as a PEFT folder)."""
    root = tmp_path_factory.mktemp("serve-adapters")
    out = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model, tokenizer = ak.load_model(str(model_dir))
        adapted = ak.adapt(model, config(), tokenizer=tokenizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        if name == "chat":
            adapted.generation_info = generation_info(tokenizer, "chat")
        out[name] = root / name
        ak.save(adapted, out[name], format="peft" if name == "peft-lora" else "native")
    tampered = root / "tampered"
    shutil.copytree(out["lora"], tampered)
    weights = load_file(tampered / "adapter_model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, tampered / "adapter_model.safetensors")
    out["tampered"] = tampered
    return out


class Library:
    """Greedy answers from the library itself, cached per (model, prompt, tokens, template)."""

    def __init__(self, model_dir, folders):
        self.model_dir, self.folders, self.models, self.answers = model_dir, folders, {}, {}
        self.lock = threading.Lock()

    def __call__(self, name: str | None, prompt: str, max_tokens: int, template: str | None = None) -> str:
        template = template or ("chat" if name == "chat" else "alpaca")
        key = (name, prompt, max_tokens, template)
        with self.lock:
            if key not in self.answers:
                if name not in self.models:
                    self.models[name] = (ak.load_model(str(self.model_dir)) if name is None else
                                         load_for_inference(str(self.model_dir), str(self.folders[name])))
                model, tokenizer = self.models[name]
                self.answers[key] = generate(model, tokenizer, [prompt], template, max_tokens)[0]
            return self.answers[key]


@pytest.fixture(scope="module")
def library(model_dir, folders):
    return Library(model_dir, folders)


# ----- a small HTTP client -----------------------------------------------------------------------------
class Reply:
    def __init__(self, status: int, headers, text: str):
        self.status, self.headers, self.text = status, {k.lower(): v for k, v in headers.items()}, text

    @property
    def json(self):
        return json.loads(self.text)

    @property
    def error(self) -> str:
        return self.json["error"]["message"]


class Client:
    def __init__(self, url: str, key: str | None = KEY):
        self.url, self.key = url, key

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, key: str | None = "default",
             timeout: float = 120) -> Reply:
        key = self.key if key == "default" else key
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return Reply(response.status, response.headers, response.read().decode())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, exc.headers, exc.read().decode())

    def stream(self, path: str, body: dict) -> tuple[Reply, list[dict]]:
        """POST with stream=true; the events up to [DONE] (which must come)."""
        request = urllib.request.Request(self.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Authorization": f"Bearer {self.key}"})
        events = []
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response:
                line = line.decode().strip()
                if not line:
                    continue
                assert line.startswith("data: "), line
                if line == "data: [DONE]":
                    return Reply(response.status, response.headers, ""), events
                events.append(json.loads(line[6:]))
        raise AssertionError("the stream ended without data: [DONE]")


def completion_text(events: list[dict]) -> str:
    return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for e in events for c in e["choices"])


@pytest.fixture(scope="module")
def server(model_dir, folders):
    settings = ServeSettings(model=str(model_dir), adapter=[f"{n}={folders[n]}" for n in AT_START], port=0,
                             api_key=KEY, max_batch_size=8, max_queue=128)
    serving = build(settings, report=lambda line: None)
    url = serving.start()
    yield Client(url), serving
    serving.stop()


@pytest.fixture
def client(server):
    return server[0]


def saved_hash(folder: Path) -> str:
    """The fingerprint hash as the README defines it: sha256 of the saved fingerprint (sorted JSON), 16 hex."""
    fingerprint = json.loads((folder / "adapter_config.json").read_text())["fingerprint"]
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def assert_names(reply: Reply, body: dict, adapter: str | None, fingerprint: str) -> None:
    assert reply.headers["x-adapterkit-adapter"] == (adapter or "none")
    assert reply.headers["x-adapterkit-fingerprint"] == fingerprint
    assert body["adapter"] == adapter and body["fingerprint"] == fingerprint == body["system_fingerprint"]


def hashes(client: Client) -> dict[str, str]:
    listing = client.call("GET", "/v1/adapters").json
    return {listing["base"]["name"]: listing["base"]["fingerprint"], **{a["name"]: a["fingerprint"] for a in listing["data"]}}


# ----- what a client sees ---------------------------------------------------------------------------------
def test_models_and_adapters_are_listed_with_method_size_and_hash(client, folders, model_dir):
    models = client.call("GET", "/v1/models")
    assert models.status == 200 and models.json["object"] == "list"
    assert [m["id"] for m in models.json["data"]] == [model_dir.name, *AT_START]
    listing = client.call("GET", "/v1/adapters").json
    assert listing["base"]["identity"]["model_type"] == "llama" and listing["base"]["source"] == str(model_dir)
    rows = {a["name"]: a for a in listing["data"]}
    assert {n: rows[n]["method"] for n in AT_START} == {"lora": "lora", "bottleneck": "adapter-h",
                                                         "prompt": "prompt-tuning", "chat": "lora"}
    assert rows["prompt"]["parameters"] == 4 * 32 and rows["prompt"]["batching"] == "own prefill, mixed decoding"
    assert rows["lora"]["batching"] == "mixed batch" and rows["lora"]["bytes"] > 0
    for name in AT_START:
        assert rows[name]["fingerprint"] == saved_hash(folders[name])
        assert rows[name]["trained_on"]["config_sha256"] == listing["base"]["identity"]["config_sha256"]
        assert any(line.startswith("ok    fingerprint") for line in rows[name]["checks"])


@pytest.mark.parametrize("name", [None, *AT_START])
def test_greedy_completion_equals_the_library(client, library, model_dir, name):
    model = name or model_dir.name
    fingerprint = hashes(client)[model]
    for prompt, tokens in (("Add 1 and 2.", 12), ("What is the capital of France?", 20)):
        reply = client.call("POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": tokens,
                                                        "temperature": 0})
        assert reply.status == 200, reply.text
        body = reply.json
        assert body["object"] == "text_completion" and body["model"] == model
        assert_names(reply, body, name, fingerprint)
        assert body["choices"][0]["text"].strip() == library(name, prompt, tokens)
        assert body["usage"]["completion_tokens"] <= tokens and body["usage"]["prompt_tokens"] > 0


def test_answer_equals_adapterkit_generate(client, model_dir, folders, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(folders["bottleneck"]), "--prompt",
                 "Name three colours.", "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out.strip()
    reply = client.call("POST", "/v1/completions", {"model": "bottleneck", "prompt": "Name three colours.",
                                                    "max_tokens": 24, "temperature": 0})
    assert printed and reply.json["choices"][0]["text"].strip() == printed


@pytest.mark.parametrize("name", [None, "lora", "prompt"])
def test_streaming_sends_the_same_text_piece_by_piece(client, model_dir, library, name):
    model = name or model_dir.name
    reply, events = client.stream("/v1/completions", {"model": model, "prompt": "hello there", "max_tokens": 30,
                                                      "temperature": 0, "stream_options": {"include_usage": True}})
    assert reply.headers["x-adapterkit-adapter"] == (name or "none")
    assert all(e["fingerprint"] == reply.headers["x-adapterkit-fingerprint"] for e in events)
    assert len(events) > 3 and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] <= 30
    assert completion_text(events).strip() == library(name, "hello there", 30)


def test_chat_uses_the_adapters_saved_chat_template(client, library):
    messages = [{"role": "user", "content": "Add 1 and 2."}]
    reply = client.call("POST", "/v1/chat/completions", {"model": "chat", "messages": messages, "max_tokens": 16,
                                                         "temperature": 0})
    assert reply.status == 200, reply.text
    body = reply.json
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"].strip() == library("chat", "Add 1 and 2.", 16, "chat")
    assert_names(reply, body, "chat", hashes(client)["chat"])
    # the completions route prompts it with its saved template (chat) too, as `adapterkit generate` does
    plain = client.call("POST", "/v1/completions", {"model": "chat", "prompt": "Add 1 and 2.", "max_tokens": 16,
                                                    "temperature": 0}).json
    assert plain["choices"][0]["text"] == body["choices"][0]["message"]["content"]
    _, events = client.stream("/v1/chat/completions", {"model": "lora", "messages": messages, "max_tokens": 16,
                                                       "temperature": 0})
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert completion_text(events).strip() == library("lora", "Add 1 and 2.", 16, "chat")


def test_sampling_seed_top_p_and_stop(client):
    def ask(**fields):
        reply = client.call("POST", "/v1/completions", {"model": "lora", "prompt": "Why?", "max_tokens": 24, **fields})
        assert reply.status == 200, reply.text
        return reply.json["choices"][0]

    greedy = ask(temperature=0)["text"]
    assert len(greedy) > 6, greedy
    assert ask(temperature=1.5, seed=7)["text"] == ask(temperature=1.5, seed=7)["text"]
    assert len({ask(temperature=2.0, seed=s)["text"] for s in range(4)}) > 1
    assert ask(temperature=1.0, top_p=1e-6, seed=3)["text"] == greedy  # only the most likely token is left
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    cut = ask(temperature=0, stop=[stop, "\u2603"])
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[:greedy.find(stop)]
    _, events = client.stream("/v1/completions", {"model": "lora", "prompt": "Why?", "max_tokens": 24,
                                                  "temperature": 0, "stop": stop})
    assert completion_text(events) == cut["text"] and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_progress_holds_back_a_partial_stop_string():
    progress = TextProgress(("STOP",))
    assert progress.update("abc S", final=False) == ("abc ", False)
    assert progress.update("abc ST", final=False) == ("", False)
    assert progress.update("abc SX", final=False) == ("SX", False)
    assert progress.update("abc SX STOP and more", final=False) == (" ", True)
    assert progress.text == "abc SX "
    assert TextProgress().update("caf\ufffd", final=False) == ("caf", False)


# ----- many at once, adapters coming and going --------------------------------------------------------------
def test_fifty_concurrent_requests_over_the_adapters_are_all_right(client, library, model_dir):
    names = [None, *AT_START]
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)], 8 + (i * 7) % 33, i % 3 == 0) for i in range(50)]
    for name, prompt, tokens, _ in jobs:  # the expected answers first, so the server's run is timed alone
        library(name, prompt, tokens)
    before = client.call("GET", "/health").json

    def run(job):
        name, prompt, tokens, streamed = job
        body = {"model": name or model_dir.name, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
        if streamed:
            reply, events = client.stream("/v1/completions", body)
            return reply.headers["x-adapterkit-adapter"], completion_text(events)
        reply = client.call("POST", "/v1/completions", body)
        assert reply.status == 200, reply.text
        return reply.headers["x-adapterkit-adapter"], reply.json["choices"][0]["text"]

    started = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(run, jobs))
    elapsed = time.monotonic() - started
    assert elapsed < 120, f"50 requests took {elapsed:.0f} s"
    wrong = [(job, text) for job, (adapter, text) in zip(jobs, answers, strict=True)
             if text.strip() != library(job[0], job[1], job[2]) or adapter != (job[0] or "none")]
    assert not wrong, wrong[:3]
    after = client.call("GET", "/health").json
    assert after["completed"] - before["completed"] == 50 and after["running"] == 0 and after["waiting"] == 0
    assert after["joined"] > before["joined"]  # requests joined batches already decoding


def test_loading_and_unloading_while_requests_are_in_flight(client, library, folders):
    long = [("lora", PROMPTS[1]), ("lora", PROMPTS[5]), ("bottleneck", PROMPTS[1]), ("prompt", PROMPTS[6])]
    tokens = 600
    for name, prompt in long:
        library(name, prompt, tokens)
    started, results = threading.Barrier(len(long) + 1), {}

    def run(item):
        name, prompt = item
        request = urllib.request.Request(client.url + "/v1/completions", method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}, data=json.dumps(
            {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}).encode())
        pieces, first = [], True
        with urllib.request.urlopen(request, timeout=120) as response:
            for line in response:
                line = line.decode().strip()
                if line.startswith("data: {"):
                    pieces.append(completion_text([json.loads(line[6:])]))
                    if first:
                        first = False
                        started.wait()
        results[item] = "".join(pieces)

    threads = [threading.Thread(target=run, args=(item,)) for item in long]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    added = client.call("POST", "/v1/adapters", {"name": "parallel", "path": str(folders["parallel"])})
    assert added.status == 201, added.text
    assert added.json["method"] == "parallel" and added.headers["x-adapterkit-fingerprint"] == saved_hash(folders["parallel"])
    gone = client.call("DELETE", "/v1/adapters/lora")
    assert gone.status == 200 and gone.json["state"] == "unloading" and gone.json["in_flight"] >= 1, gone.text
    refused = client.call("POST", "/v1/completions", {"model": "lora", "prompt": "hi"})
    assert refused.status == 404 and "'lora' is being unloaded" in refused.error
    mid = client.call("POST", "/v1/completions", {"model": "parallel", "prompt": "hi", "max_tokens": 10, "temperature": 0})
    assert mid.json["choices"][0]["text"].strip() == library("parallel", "hi", 10)
    for t in threads:
        t.join(timeout=120)
    assert {item: text.strip() for item, text in results.items()} == {
        item: library(item[0], item[1], tokens) for item in long}
    deadline = time.monotonic() + 10
    while "lora" in hashes(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "lora" not in hashes(client)
    again = client.call("POST", "/v1/adapters", {"name": "lora", "path": str(folders["lora"])})
    assert again.status == 201, again.text
    taken = client.call("POST", "/v1/adapters", {"name": "lora", "path": str(folders["lora"])})
    assert taken.status == 409 and "taken" in taken.error


@pytest.mark.parametrize("name", ["prefix", "peft-lora"])
def test_adapters_loaded_at_run_time_serve_right_answers(client, library, folders, name):
    added = client.call("POST", "/v1/adapters", {"name": name, "path": str(folders[name])})
    assert added.status == 201, added.text
    assert added.json["format"] == ("peft" if name == "peft-lora" else "native")
    reply = client.call("POST", "/v1/completions", {"model": name, "prompt": "2 + 2 =", "max_tokens": 15,
                                                    "temperature": 0})
    assert reply.json["choices"][0]["text"].strip() == library(name, "2 + 2 =", 15)
    assert reply.headers["x-adapterkit-fingerprint"] == added.json["fingerprint"]
    assert client.call("DELETE", f"/v1/adapters/{name}").json["state"] == "unloaded"
    assert client.call("POST", "/v1/completions", {"model": name, "prompt": "hi"}).status == 404


# ----- mistakes -------------------------------------------------------------------------------------------------
GOOD = {"model": "lora", "prompt": "hi", "max_tokens": 4}
BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "lora", "prompt": ', 400, "not valid JSON", None),
    ("not an object", "/v1/completions", b'["hi"]', 400, "must be a JSON object", None),
    ("empty body", "/v1/completions", b"", 400, "body is empty", None),
    ("unknown adapter", "/v1/completions", {**GOOD, "model": "nope"}, 404, "'nope' is not served", "model"),
    ("model missing", "/v1/completions", {"prompt": "hi"}, 400, "model must name", "model"),
    ("max_tokens text", "/v1/completions", {**GOOD, "max_tokens": "5"}, 400, "max_tokens must be an integer", "max_tokens"),
    ("max_tokens float", "/v1/completions", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens must be an integer", "max_tokens"),
    ("temperature text", "/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature must be a number",
     "temperature"),
    ("temperature high", "/v1/completions", {**GOOD, "temperature": 3}, 400, "temperature must be from 0", "temperature"),
    ("top_p zero", "/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p must be above 0", "top_p"),
    ("prompt number", "/v1/completions", {**GOOD, "prompt": 5}, 400, "prompt must be a string", "prompt"),
    ("stream text", "/v1/completions", {**GOOD, "stream": "yes"}, 400, "stream must be true or false", "stream"),
    ("stop number", "/v1/completions", {**GOOD, "stop": 3}, 400, "stop must be a string", "stop"),
    ("seed text", "/v1/completions", {**GOOD, "seed": "x"}, 400, "seed must be an integer", "seed"),
    ("max_tokens zero", "/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens must be at least 1", "max_tokens"),
    ("max_tokens negative", "/v1/completions", {**GOOD, "max_tokens": -3}, 400, "at least 1", "max_tokens"),
    ("beyond the context", "/v1/completions", {**GOOD, "max_tokens": 5000}, 400, "beyond the context", "max_tokens"),
    ("empty prompt", "/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt is empty", "prompt"),
    ("blank prompt", "/v1/completions", {**GOOD, "prompt": "  \n"}, 400, "prompt is empty", "prompt"),
    ("unknown field", "/v1/completions", {**GOOD, "temprature": 0}, 400, "unrecognized request field 'temprature'",
     "temprature"),
    ("n of 2", "/v1/completions", {**GOOD, "n": 2}, 400, "n=2 is not supported", "n"),
    ("bad template", "/v1/completions", {**GOOD, "template": "fancy"}, 400, "template must be one of", "template"),
    ("messages text", "/v1/chat/completions", {"model": "lora", "messages": "hi"}, 400, "messages must be a non-empty",
     "messages"),
    ("no messages", "/v1/chat/completions", {"model": "lora", "messages": []}, 400, "messages must be a non-empty",
     "messages"),
    ("bad role", "/v1/chat/completions", {"model": "lora", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages[0].role must be one of", "messages[0].role"),
    ("empty chat", "/v1/chat/completions", {"model": "lora", "messages": [{"role": "user", "content": ""}]}, 400,
     "every message is empty", "messages"),
    ("adapter name", "/v1/adapters", {"name": "a.b", "path": "/x"}, 400, "name must be a non-empty string", "name"),
    ("no such folder", "/v1/adapters", {"name": "ghost", "path": "/nonexistent/adapter"}, 400, "does not exist", "path"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_requests_get_a_json_error_naming_the_problem(client, case):
    _, path, body, status, words, param = case
    reply = client.call("POST", path, raw=body) if isinstance(body, bytes) else client.call("POST", path, body)
    assert reply.status == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert words in reply.error and reply.json["error"]["param"] == param
    assert client.call("POST", "/v1/completions", GOOD).status == 200  # and it keeps serving


def test_adapter_that_fails_verification_is_refused_and_unknown_routes_are_json(client, folders):
    reply = client.call("POST", "/v1/adapters", {"name": "tampered", "path": str(folders["tampered"])})
    assert reply.status == 400 and "failed verification" in reply.error and "fingerprint" in reply.error, reply.text
    assert "tampered" not in hashes(client)
    assert client.call("POST", "/v1/completions", {**GOOD, "model": "tampered"}).status == 404
    assert client.call("DELETE", "/v1/adapters/ghost").status == 404
    base = client.call("DELETE", f"/v1/adapters/{next(iter(hashes(client)))}")
    assert base.status == 400 and "base model cannot be unloaded" in base.error
    missing = client.call("GET", "/v1/nothing")
    assert missing.status == 404 and "/v1/nothing" in missing.error
    assert client.call("POST", "/v1/completions", GOOD).status == 200


def test_api_key_is_required(client):
    for key, words in ((None, "missing API key"), ("wrong", "wrong API key")):
        for method, path, body in (("POST", "/v1/completions", GOOD), ("GET", "/v1/models", None),
                                   ("GET", "/v1/adapters", None), ("DELETE", "/v1/adapters/lora", None)):
            reply = client.call(method, path, body, key=key)
            assert reply.status == 401 and words in reply.error, (method, path, reply.text)
    assert client.call("GET", "/", key=None).status == 200  # the page itself; it sends the key it is given
    assert client.call("POST", "/v1/completions", GOOD).status == 200


def test_full_queue_answers_429_and_the_server_goes_on(model_dir):
    serving = build(ServeSettings(model=str(model_dir), port=0, max_batch_size=1, max_queue=1), report=lambda _: None)
    client = Client(serving.start(), key=None)
    try:
        body = {"model": model_dir.name, "prompt": "hi", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: client.call("POST", "/v1/completions", body), range(6)))
        statuses = sorted(r.status for r in replies)
        assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}, statuses
        busy = next(r for r in replies if r.status == 429)
        assert "queue is full" in busy.error and busy.json["error"]["type"] == "rate_limit_error"
        assert all(r.json["usage"]["completion_tokens"] == 400 for r in replies if r.status == 200)
        assert client.call("POST", "/v1/completions", {**body, "max_tokens": 3}).status == 200
    finally:
        serving.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(client, model_dir, stream):
    before = client.call("GET", "/health").json
    host, port = client.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": model_dir.name, "prompt": "hi", "max_tokens": 1700, "ignore_eos": True, "stream": stream}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    else:
        time.sleep(0.3)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = client.call("GET", "/health").json
        if now["cancelled"] > before["cancelled"] and now["running"] == 0:
            break
        time.sleep(0.05)
    assert now["cancelled"] == before["cancelled"] + 1 and now["running"] == 0, (before, now)
    assert now["tokens"] - before["tokens"] < 1700  # it stopped before the end
    assert client.call("POST", "/v1/completions", GOOD).status == 200


# ----- the playground in a browser --------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1400,1000")


def test_playground_streams_two_adapters_side_by_side(client, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), \
        "the browser test needs Debian's chromium and chromium-driver: make setup (as root)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    prompt = "Write a poem about the sea"
    try:
        driver.get(client.url + "/")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "refresh").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "input.pick")) >= 3)
        table = driver.find_element(By.ID, "models").text
        for name in ("lora", "bottleneck"):
            driver.find_element(By.CSS_SELECTOR, f"input.pick[value='{name}']").click()
            assert hashes(client)[name] in table
        assert "adapter-h" in table and "lora" in table
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        tokens = driver.find_element(By.ID, "max-tokens")
        tokens.clear()
        tokens.send_keys("120")
        driver.find_element(By.ID, "send").click()
        panels = "div.answer[data-model='{}']"
        wait.until(lambda d: all(d.find_element(By.CSS_SELECTOR, panels.format(n)).get_attribute("data-state") == "done"
                                 for n in ("lora", "bottleneck")))
        driver.save_screenshot(str(tmp_path / "playground.png"))
        for name in ("lora", "bottleneck"):
            panel = driver.find_element(By.CSS_SELECTOR, panels.format(name))
            assert int(panel.get_attribute("data-chunks")) > 1  # it came in pieces
            assert panel.get_attribute("data-fingerprint") == hashes(client)[name]
            shown = driver.execute_script("return arguments[0].querySelector('.text').textContent", panel)
            api = client.call("POST", "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 120,
                                                          "temperature": 0}).json["choices"][0]["text"]
            assert shown == api and shown.strip()
            assert "finished" in panel.find_element(By.CSS_SELECTOR, ".status").text
    finally:
        driver.quit()
    assert (tmp_path / "playground.png").stat().st_size > 10_000


# ----- the command ---------------------------------------------------------------------------------------------
def test_the_serve_command_runs_a_server_until_interrupted(model_dir, folders, library):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "adapterkit", "serve", "--model", str(model_dir), "--adapter",
                                f"lora={folders['lora']},prompt={folders['prompt']}", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Client(f"http://127.0.0.1:{port}", key=None)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.call("GET", "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        reply = client.call("POST", "/v1/completions", {"model": "prompt", "prompt": "Why?", "max_tokens": 10,
                                                        "temperature": 0})
        assert reply.json["choices"][0]["text"].strip() == library("prompt", "Why?", 10)
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert "adapter lora: lora" in out and "verified" in out and f"serving on http://127.0.0.1:{port}/v1" in out


def test_serve_mistakes_are_one_line(model_dir, capsys, monkeypatch):
    assert main(["serve", "--model", str(model_dir), "--adapter", "nodir"]) == 2
    assert "--adapter 'nodir': give NAME=DIR" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--adapter", "a=/x,a=/y"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--port", "70000"]) == 2
    assert "--port must be at most 65535" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'adapterkit[serve]'" in err
