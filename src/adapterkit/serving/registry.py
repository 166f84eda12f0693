"""What the server serves: the base model and named adapters on one AdaptedModel, each with what a
response carries (method, size, fingerprint hash) and how it is prompted (template, end tokens).

Loading is three steps so that only the attach touches the shared model (on the scheduler's thread):
`begin_load` reserves the name, `check` runs `adapterkit verify`'s checks on a copy of the base of its own
(any thread), `attach` loads the adapter with `adapterkit.io.load`, which checks the fingerprint again.
Unloading marks the adapter; it leaves the model once no request holds it (`collect`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import AdaptedModel
from ..data import Template
from ..errors import AdapterkitError
from ..io import fingerprint, load
from ..io.native import CONFIG_FILE, base_identity
from ..io.peft import is_peft_folder
from ..models import DEFAULT_MODEL, load_model
from ..recipes.verify import VerifySettings, verify
from ..sites import InputHook
from .protocol import GenerationRequest, ServeError, bad


def digest(value) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(eq=False)
class Served:
    """One model a request can name: the base (adapter None) or an adapter."""

    name: str
    adapter: str | None
    method: str | None = None
    fingerprint: str = ""
    template: str = "alpaca"
    chat_template: str | None = None
    eos_ids: frozenset = frozenset()
    solo: bool = False          # changes the inputs (prompt methods) or routes tokens: batched with its own rows only
    shared_decoding: bool = False  # a prompt method: after its own prefill, its rows decode in the mixed batch
    virtual_tokens: int = 0     # positions it adds before the prompt
    parameters: int = 0
    bytes: int = 0
    path: str | None = None
    format: str = "base"
    trained_on: dict | None = None
    checks: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    state: str = "ready"        # loading, ready, unloading
    users: int = 0              # requests holding it (waiting or decoding)

    @property
    def group(self) -> str | None:
        """Which batch its rows join: None, the shared mixed batch, or its own (by adapter name)."""
        return self.adapter if self.solo else None

    def headers(self) -> dict[str, str]:
        return {"x-adapterkit-adapter": self.adapter or "none", "x-adapterkit-fingerprint": self.fingerprint}

    def describe(self) -> dict:
        return {"name": self.name, "adapter": self.adapter, "method": self.method, "format": self.format,
                "parameters": self.parameters, "bytes": self.bytes, "fingerprint": self.fingerprint,
                "template": self.template, "batching": "own prefill, mixed decoding" if self.shared_decoding
                else "own batch" if self.solo else "mixed batch",
                "path": self.path, "state": self.state, "in_flight": self.users, "trained_on": self.trained_on,
                "checks": self.checks, "created": self.created}


def default_base_name(source: str) -> str:
    return source if source == DEFAULT_MODEL else (Path(source).name or source)


class Registry:
    def __init__(self, adapted: AdaptedModel, tokenizer, source: str, base_name: str | None = None):
        self.adapted, self.tokenizer, self.source = adapted, tokenizer, source
        self.lock = threading.Lock()       # the table and the users counts
        self.text_lock = threading.Lock()  # the tokenizer: fast tokenizers refuse concurrent use
        # The context: the table's hard limit (learned positions), else the length the config says it was
        # trained for (rotary models run past it, but not well).
        self.max_positions = adapted.layout.shape.max_positions or getattr(adapted.config, "max_position_embeddings", None)
        self.identity = base_identity(adapted)
        self.eos_ids = frozenset({tokenizer.eos_token_id} - {None})
        self.base = Served(base_name or default_base_name(source), None, fingerprint=digest(self.identity),
                           eos_ids=self.eos_ids, chat_template=None)
        self.models: dict[str, Served] = {self.base.name: self.base}

    @classmethod
    def open(cls, source: str, base_name: str | None = None, dtype: str = "fp32", device: str = "cpu") -> Registry:
        model, tokenizer = load_model(source, dtype)
        model.to(device)
        adapted = AdaptedModel(model)
        adapted.tokenizer = tokenizer
        return cls(adapted, tokenizer, source, base_name)

    # ----- requests ---------------------------------------------------------------------------
    def reserve(self, name: str) -> Served:
        """The model a request names, held until `release` (so it cannot leave while in use)."""
        with self.lock:
            entry = self.models.get(name)
            if entry is None:
                known = ", ".join(e.name for e in self.models.values() if e.state == "ready")
                raise ServeError(404, f"model {name!r} is not served here (models: {known})", "model", "model_not_found")
            if entry.state != "ready":
                raise ServeError(404, f"adapter {name!r} is {'being unloaded' if entry.state == 'unloading' else 'still loading'}",
                                 "model", "model_not_found")
            entry.users += 1
            return entry

    def release(self, entry: Served) -> None:
        with self.lock:
            entry.users -= 1

    def listing(self) -> list[dict]:
        with self.lock:
            return [e.describe() for e in self.models.values() if e.state != "loading"]

    def prompt_ids(self, entry: Served, request: GenerationRequest) -> list[int]:
        """The prompt's token ids: a chat rendered with the adapter's saved chat template (else the
        tokenizer's); a completion prompt in the model's template, as `adapterkit generate` does."""
        tokenizer = self.tokenizer
        with self.text_lock:
            if request.messages is not None:
                template = entry.chat_template or getattr(tokenizer, "chat_template", None)
                if template is None:
                    raise bad(f"model {entry.name!r} has no chat template (the tokenizer has none and the adapter saved "
                              "none); use /v1/completions", "messages")
                try:
                    text = tokenizer.apply_chat_template(request.messages, chat_template=template,
                                                         add_generation_prompt=True, tokenize=False)
                except Exception as exc:  # jinja raises its own types for a conversation the template refuses
                    raise bad(f"the chat template of {entry.name!r} refuses these messages ({exc})", "messages") from exc
                special = False
            else:
                name = request.template or entry.template
                if name == "raw":
                    text, special = request.prompt, True
                else:
                    try:
                        text = Template(name).prompt({"instruction": request.prompt}, tokenizer)
                    except AdapterkitError as exc:
                        raise bad(str(exc), "template") from exc
                    special = name != "chat"
            return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.text_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ----- loading and unloading -----------------------------------------------------------------
    def begin_load(self, name: str, path: str) -> None:
        with self.lock:
            if name in self.models:
                what = "the base model" if name == self.base.name else f"an adapter ({self.models[name].state})"
                raise ServeError(409, f"the name {name!r} is taken by {what}; DELETE /v1/adapters/{name} first or "
                                 "pick another name", "name", "name_taken")
            self.models[name] = Served(name, name, path=path, state="loading")

    def abort_load(self, name: str) -> None:
        with self.lock:
            if name in self.models and self.models[name].state == "loading":
                del self.models[name]

    def check(self, path: str) -> list[str]:
        """`adapterkit verify` on the folder against this base (its own copy); the lines it printed."""
        folder = Path(path)
        if not folder.is_dir():
            raise ServeError(400, f"adapter folder {path} does not exist on the server", "path", "verify_failed")
        if is_peft_folder(folder):
            return ["PEFT folder: it records no base identity or fingerprint to verify; the server takes a "
                    "fingerprint at load and refuses an adapter that changes nothing"]
        lines: list[str] = []
        try:
            ok = verify(VerifySettings(adapter=str(folder), model=self.source), report=lines.append)
        except AdapterkitError as exc:
            ok, lines = False, [*lines, f"FAIL  {exc}"]
        if not ok:
            failed = next((line for line in lines if line.startswith("FAIL")), "FAIL").removeprefix("FAIL").strip()
            raise ServeError(400, f"adapter folder {path} failed verification: {failed}", "path", "verify_failed")
        return lines

    def attach(self, name: str, path: str, checks: list[str]) -> Served:
        """Load the adapter onto the shared model (call it where the model is not running)."""
        adapted, folder = self.adapted, Path(path)
        try:
            load(adapted, folder, name=name)
        except AdapterkitError as exc:
            raise ServeError(400, f"adapter folder {path} cannot be loaded: {exc}", "path", "load_failed") from exc
        record = adapted.records[name]
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        peft = is_peft_folder(folder)
        saved = meta.get("fingerprint") if not peft else None
        if peft:
            saved = fingerprint.compute(adapted, name)
            if saved["max_change"] == 0.0:
                adapted.delete(name)
                raise ServeError(400, f"adapter folder {path} gives exactly the base model's logits: it changes "
                                 "nothing (a zero update)", "path", "verify_failed")
        generation = meta.get("generation") if isinstance(meta.get("generation"), dict) else {}
        eos = generation.get("eos_token_id")
        hooks = [p for p in record.parts.values() if isinstance(p, InputHook)]
        row_wise = all(getattr(p, "row_wise", True) for p in record.parts.values())
        entry = Served(
            name, name, method=record.config.method, fingerprint=digest(saved), path=str(folder),
            template=generation.get("template") or "alpaca", chat_template=generation.get("chat_template"),
            eos_ids=self.eos_ids | ({eos} if isinstance(eos, int) else set()),
            solo=bool(hooks) or not row_wise, shared_decoding=bool(hooks) and row_wise,
            virtual_tokens=int(getattr(record.config, "num_virtual_tokens", 0) or 0) if hooks else 0,
            parameters=sum(t.numel() for t in adapted.adapter_state_dict(name).values()),
            bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")), format="peft" if peft else "native",
            trained_on=meta.get("base_model") if not peft else {"name_or_path": meta.get("base_model_name_or_path")},
            checks=checks)
        with self.lock:
            self.models[name] = entry
        return entry

    def load(self, name: str, path: str) -> Served:
        """All three steps here and now (at start-up, before the scheduler runs)."""
        self.begin_load(name, path)
        try:
            return self.attach(name, path, self.check(path))
        except BaseException:
            self.abort_load(name)
            raise

    def begin_unload(self, name: str) -> Served:
        with self.lock:
            entry = self.models.get(name)
            if name == self.base.name:
                raise ServeError(400, "the base model cannot be unloaded; it serves every adapter", "name")
            if entry is None or entry.state == "unloading":
                raise ServeError(404, f"no adapter named {name!r} is loaded", "name", "model_not_found")
            if entry.state == "loading":
                raise ServeError(409, f"adapter {name!r} is still loading; try again when it is ready", "name")
            entry.state = "unloading"
            return entry

    def collect(self) -> list[str]:
        """Delete the adapters marked for unloading that no request holds; their names."""
        with self.lock:
            done = [e for e in self.models.values() if e.state == "unloading" and e.users == 0]
            for entry in done:
                del self.models[entry.name]
                self.adapted.delete(entry.adapter)
        return [e.name for e in done]
