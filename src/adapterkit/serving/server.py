"""Running the app under uvicorn: in the foreground (the CLI) or on a background thread (tests, the
benchmark), with the scheduler started before the first request and stopped after the last."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn

from ..errors import AdapterkitError
from .app import create_app
from .registry import Registry
from .scheduler import Scheduler


class Server(uvicorn.Server):
    """uvicorn's server that tells `on_start(url)` once it listens (port 0: a free port)."""

    def __init__(self, config: uvicorn.Config, on_start: Callable[[str], None] | None = None):
        super().__init__(config)
        self.on_start, self.url = on_start, None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{host}:{port}"
            if self.on_start:
                self.on_start(self.url)


class Serving:
    """The whole server: registry, scheduler, app and uvicorn, for one base model."""

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_batch: int = 16, max_queue: int = 64, default_max_tokens: int | None = None):
        self.registry = registry
        self.scheduler = Scheduler(registry, max_batch=max_batch, max_queue=max_queue)
        self.app = create_app(registry, self.scheduler, api_key=api_key, default_max_tokens=default_max_tokens)
        self.config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", access_log=False,
                                     timeout_graceful_shutdown=5)
        self.server: Server | None = None
        self.thread: threading.Thread | None = None

    def run(self, on_start: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until interrupted (Ctrl-C, SIGTERM)."""
        self.scheduler.start()
        self.server = Server(self.config, on_start)
        try:
            self.server.run()
        except SystemExit as exc:  # uvicorn exits when it cannot listen (it logged the reason)
            raise AdapterkitError(f"cannot listen on {self.config.host}:{self.config.port} (in use, or not an "
                                  "address of this machine); pick another --port or --host") from exc
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
            pass
        finally:
            self.scheduler.stop()

    def start(self, timeout: float = 60.0) -> str:
        """Serve on a background thread; returns the URL once it listens."""
        self.scheduler.start()
        self.server = Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="adapterkit-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.server.url is None:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.scheduler.stop()
