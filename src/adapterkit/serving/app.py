"""The HTTP API (FastAPI): OpenAI's completions, chat completions and models, adapterkit's adapter
routes, the playground page. Every error is OpenAI's JSON error object with a 4xx (5xx: a fault of ours).
Each generation response names the adapter that produced it and its fingerprint hash (headers
x-adapterkit-adapter / x-adapterkit-fingerprint, fields `adapter` / `fingerprint` / `system_fingerprint`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .page import PAGE
from .protocol import (
    GenerationRequest,
    ServeError,
    adapter_request,
    bad,
    chat_request,
    completion_request,
    parse_json,
)
from .registry import Registry, Served
from .scheduler import Job, Scheduler

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for completions


class JobStream(StreamingResponse):
    """A server-sent event stream whose generation stops when the stream ends for any reason
    (a client that disconnects included)."""

    def __init__(self, content, job: Job, **kwargs):
        super().__init__(content, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()  # nothing happens to a finished job


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(registry: Registry, scheduler: Scheduler, api_key: str | None = None,
               default_max_tokens: int | None = None) -> FastAPI:
    app = FastAPI(title="adapterkit serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeError)
    async def refused(request: Request, exc: ServeError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        error = ServeError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception):
        error = ServeError(500, f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise ServeError(401, "missing API key: send the header 'Authorization: Bearer KEY'", None, "missing_api_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ServeError(401, "wrong API key (send 'Authorization: Bearer KEY' with the server's --api-key)",
                             None, "invalid_api_key")

    def token_budget(entry: Served, prompt_length: int, request: GenerationRequest) -> int:
        limit, used = registry.max_positions, prompt_length + entry.virtual_tokens
        where = "messages" if request.messages is not None else "prompt"
        room = None if limit is None else limit - used
        if room is not None and room < 1:
            raise bad(f"the {where} takes {used} of the model's {limit} positions; nothing is left to generate", where)
        if request.max_tokens is None:
            default = default_max_tokens or (COMPLETION_DEFAULT_TOKENS if request.prompt is not None else room or 256)
            return default if room is None else min(default, room)
        if room is not None and request.max_tokens > room:
            raise bad(f"max_tokens {request.max_tokens} is beyond the context: the {where} takes {used} of the model's "
                      f"{limit} positions, so at most {room} tokens can follow", "max_tokens")
        return request.max_tokens

    async def generation(request: Request, chat: bool):
        authorize(request)
        body = parse_json(await request.body())
        wanted = chat_request(body) if chat else completion_request(body)
        entry = registry.reserve(wanted.model)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            ids = registry.prompt_ids(entry, wanted)
            job = Job(entry, ids, token_budget(entry, len(ids), wanted),
                      lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data)),
                      temperature=wanted.temperature, top_p=wanted.top_p, seed=wanted.seed, stop=wanted.stop,
                      ignore_eos=wanted.ignore_eos)
            scheduler.submit(job)
        except BaseException:
            registry.release(entry)
            raise
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": entry.name, "system_fingerprint": entry.fingerprint, "adapter": entry.adapter,
                "fingerprint": entry.fingerprint}
        if wanted.stream:
            return JobStream(_events(events, head, chat, wanted.include_usage), job, headers=entry.headers(),
                             media_type="text/event-stream")
        kind, data = await _until_done(events, request, job)
        if kind == "error":
            raise ServeError(500, data["message"])
        if kind == "gone":
            return Response(status_code=499)
        usage = {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                 "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
        choice = {"index": 0, "logprobs": None, "finish_reason": data["finish_reason"]}
        choice.update({"message": {"role": "assistant", "content": data["text"]}} if chat else {"text": data["text"]})
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                             "usage": usage}, headers=entry.headers())

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": registry.base.name, **scheduler.status()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [
            {"id": e["name"], "object": "model", "created": e["created"], "owned_by": "adapterkit",
             "adapter": e["adapter"], "method": e["method"], "fingerprint": e["fingerprint"]}
            for e in registry.listing() if e["state"] == "ready"]}

    @app.get("/v1/adapters")
    async def adapters(request: Request):
        authorize(request)
        base = registry.base
        return {"object": "list", "base": {"name": base.name, "source": registry.source, "fingerprint": base.fingerprint,
                                           "identity": registry.identity},
                "data": [e for e in registry.listing() if e["adapter"] is not None]}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        authorize(request)
        name, path = adapter_request(parse_json(await request.body()))
        registry.begin_load(name, path)
        try:
            checks = await asyncio.to_thread(registry.check, path)
            entry = await asyncio.wrap_future(scheduler.call(lambda: registry.attach(name, path, checks)))
        finally:
            registry.abort_load(name)  # only a name still loading (a failure) is dropped
        return JSONResponse(entry.describe(), status_code=201, headers=entry.headers())

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str, request: Request):
        authorize(request)
        entry = registry.begin_unload(name)
        await asyncio.wrap_future(scheduler.call(registry.collect))
        gone = registry.models.get(name) is not entry
        return {"name": name, "state": "unloaded" if gone else "unloading", "in_flight": 0 if gone else entry.users}

    return app


async def _until_done(events: asyncio.Queue, request: Request, job: Job) -> tuple[str, dict]:
    """The job's last event, or ("gone", {}) once the client disconnects (the job is then cancelled)."""
    listen = asyncio.ensure_future(_disconnected(request))
    try:
        while True:
            get = asyncio.ensure_future(events.get())
            await asyncio.wait({get, listen}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                job.cancel()
                return "gone", {}
            kind, data = get.result()
            if kind in ("done", "error"):
                return kind, data
    finally:
        listen.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(events: asyncio.Queue, head: dict, chat: bool, include_usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**head, "object": kind, "choices": [choice]}

    if chat:
        yield _sse(chunk("", role=True))
    while True:
        event, data = await events.get()
        if event == "delta":
            yield _sse(chunk(data["text"]))
        elif event == "done":
            yield _sse(chunk(None, data["finish_reason"]))
            if include_usage:
                usage = {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                         "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
                yield _sse({**head, "object": kind, "choices": [], "usage": usage})
            break
        else:
            yield _sse(ServeError(500, data["message"]).body())
            break
    yield _sse("[DONE]")
