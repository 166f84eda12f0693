"""The OpenAI request bodies the server reads, checked field by field: every mistake is one
`ServeError` naming the field, what it got and what it takes (the app turns it into a 4xx JSON error)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

TEMPLATE_CHOICES = ("alpaca", "bare", "chat", "raw")  # raw: the prompt as it is, no template
MAX_STOPS = 4
ROLES = ("system", "user", "assistant")


class ServeError(Exception):
    """A request the server refuses: HTTP status, one-line message, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, param, "invalid_value")


@dataclass
class GenerationRequest:
    """One completion or chat request, checked."""

    model: str
    prompt: str | None = None            # /v1/completions
    messages: list[dict] | None = None   # /v1/chat/completions
    template: str | None = None          # completions: alpaca, bare, chat or raw (default: the model's)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 saying why not."""
    if not raw.strip():
        raise bad("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


# Fields a generation request may carry: those read here, and OpenAI ones accepted at their neutral value.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "user",
           "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "ignore_eos"}
_NEUTRAL = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
            "logprobs": (False,), "echo": (False,), "best_of": (1,), "suffix": ("",), "top_logprobs": (0,),
            "parallel_tool_calls": (False,), "tools": ([],)}
_COMPLETION = _COMMON | {"prompt", "template", "echo", "best_of", "suffix"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "parallel_tool_calls"}


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{key} must be a number, got {value!r}", key)
    if value < low or value > high or (low_open and value == low):
        where = f"{'above' if low_open else 'from'} {low:g} {'up ' if low_open else ''}to {high:g}"
        raise bad(f"{key} must be {where}, got {value!r}", key)
    return float(value)


def _integer(body: dict, key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{key} must be an integer, got {value!r}", key)
    if minimum is not None and value < minimum:
        raise bad(f"{key} must be at least {minimum}, got {value!r}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false, got {value!r}", key)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad(f"stop must be a string or a list of strings, got {value!r}", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad("stop strings must not be empty", "stop")
    return tuple(stops)


def _common(body: dict, allowed: set[str]) -> dict:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"unrecognized request field {unknown[0]!r}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must name the base model or a loaded adapter (GET /v1/models lists them), got "
                  f"{model!r}", "model")
    for key, neutral in _NEUTRAL.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise bad(f"{key}={body[key]!r} is not supported by this server (only {neutral[0]!r})", key)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad(f"stream_options must be an object with include_usage, got {options!r}", "stream_options")
    stream = _flag(body, "stream")
    if options and not stream:
        raise bad("stream_options applies only with stream=true", "stream_options")
    return dict(model=model, max_tokens=_integer(body, "max_tokens", 1), stop=_stops(body),
                temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), seed=_integer(body, "seed"),
                stream=stream, include_usage=_flag(options or {}, "include_usage"),
                ignore_eos=_flag(body, "ignore_eos"))


def completion_request(body: dict) -> GenerationRequest:
    fields = _common(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise bad("prompt must be one string (send one request per prompt; token arrays are not read)", "prompt")
    if not isinstance(prompt, str):
        raise bad(f"prompt must be a string, got {prompt!r}", "prompt")
    if not prompt.strip():
        raise bad("prompt is empty; send the text to complete", "prompt")
    template = body.get("template")
    if template is not None and template not in TEMPLATE_CHOICES:
        raise bad(f"template must be one of {', '.join(TEMPLATE_CHOICES)}, got {template!r}", "template")
    return GenerationRequest(prompt=prompt, template=template, **fields)


def chat_request(body: dict) -> GenerationRequest:
    fields = _common(body, _CHAT)
    limit = _integer(body, "max_completion_tokens", 1)
    if limit is not None:
        if fields["max_tokens"] is not None and fields["max_tokens"] != limit:
            raise bad("max_tokens and max_completion_tokens differ; give one", "max_completion_tokens")
        fields["max_tokens"] = limit
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad(f"messages must be a non-empty list of {{role, content}} objects, got {messages!r}", "messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with role and content, got {message!r}", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content parts must be {{type: text, text: ...}}; only text is read",
                          f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string, got {content!r}", f"{where}.content")
        clean.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in clean):
        raise bad("every message is empty; send some text", "messages")
    return GenerationRequest(messages=clean, **fields)


def adapter_request(body: dict) -> tuple[str, str]:
    """(name, folder) of a POST /v1/adapters body."""
    unknown = sorted(set(body) - {"name", "path"})
    if unknown:
        raise bad(f"unrecognized field {unknown[0]!r}; send name and path", unknown[0])
    name, path = body.get("name"), body.get("path")
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise bad(f"name must be a non-empty string without dots or slashes, got {name!r}", "name")
    if not isinstance(path, str) or not path:
        raise bad(f"path must be the adapter folder on the server, got {path!r}", "path")
    return name, path
