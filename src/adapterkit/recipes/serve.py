"""`adapterkit serve`: an OpenAI-compatible server for the base model and many adapters at once
(adapterkit.serving). This module holds its settings and start-up; FastAPI and uvicorn are imported
only when a server starts, so the other commands work without them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import AdapterkitError
from ..models import DEFAULT_MODEL
from ..settings import check_fields, option

MISSING = "adapterkit serve needs FastAPI and uvicorn, which are not installed: pip install 'adapterkit[serve]'"


@dataclass
class ServeSettings:
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    adapter: list[str] = option([], "adapters to serve as NAME=DIR (adapterkit's or PEFT's folder); several: repeat "
                                "the flag, or a=DIR1,b=DIR2 (more can be added later: POST /v1/adapters)")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on (0: any free port)", minimum=0, maximum=65535)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every /v1 route")
    base_name: str | None = option(None, "the name requests use for the base model (default: the --model name, "
                                   "a folder's last part)")
    max_batch_size: int = option(16, "most requests decoded together (rows of all batches)", minimum=1)
    max_queue: int = option(64, "most requests waiting for a row; more get a 429 error", minimum=1)
    default_max_tokens: int | None = option(None, "max_tokens of a request that gives none (default: 16 for "
                                            "completions, as OpenAI's; the rest of the context for chat)", minimum=1)
    dtype: str = option("fp32", "the base model's weights: fp32 or bf16", choices=("fp32", "bf16"))
    device: str = option("cpu", "where the model runs: cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        check_fields(self)
        adapter_folders(self)
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise AdapterkitError(f"--device {self.device}: this torch sees no CUDA device; use --device cpu")
        elif self.device != "cpu":
            raise AdapterkitError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")


def adapter_folders(settings: ServeSettings) -> list[tuple[str, str]]:
    """(name, folder) of each --adapter NAME=DIR, names checked."""
    pairs: list[tuple[str, str]] = []
    for item in settings.adapter:
        name, sep, folder = item.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise AdapterkitError(f"--adapter {item!r}: give NAME=DIR (several: a=DIR1,b=DIR2)")
        if "." in name or "/" in name:
            raise AdapterkitError(f"--adapter {item!r}: the name {name!r} must have no dots or slashes")
        if any(name == other for other, _ in pairs):
            raise AdapterkitError(f"--adapter: the name {name!r} is given twice")
        pairs.append((name, folder))
    return pairs


def require_serving() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise AdapterkitError(MISSING) from exc


def build(settings: ServeSettings, report: Callable[[str], None] = print):
    """The server (adapterkit.serving.server.Serving) with the base and every --adapter loaded and
    verified; not yet listening."""
    require_serving()
    from ..serving.protocol import ServeError
    from ..serving.registry import Registry
    from ..serving.server import Serving

    folders = adapter_folders(settings)
    registry = Registry.open(settings.model, settings.base_name, settings.dtype, settings.device)
    if any(name == registry.base.name for name, _ in folders):
        raise AdapterkitError(f"--adapter: {registry.base.name!r} is the base model's name; pick another "
                              "(or set --base-name)")
    for name, folder in folders:
        try:
            entry = registry.load(name, folder)
        except ServeError as exc:  # the same one line POST /v1/adapters would give
            raise AdapterkitError(f"--adapter {name}={folder}: {exc.message}") from exc
        report(f"adapter {name}: {entry.method}, {entry.parameters:,} parameters, fingerprint {entry.fingerprint} "
               f"({'verified' if entry.format == 'native' else 'PEFT folder, fingerprint taken at load'})")
    return Serving(registry, settings.host, settings.port, settings.api_key, settings.max_batch_size,
                   settings.max_queue, settings.default_max_tokens)


def serve(settings: ServeSettings, report: Callable[[str], None] = print) -> None:
    """Serve until interrupted."""
    server = build(settings, report)
    names = [n for n in server.registry.models if n != server.registry.base.name]
    report(f"base model {server.registry.base.name!r} and {len(names)} adapter(s): {', '.join(names) or 'none'}")
    server.run(lambda url: report(f"serving on {url}/v1 (OpenAI API), playground at {url}/"
                                  + (" (API key required)" if settings.api_key else "")))
