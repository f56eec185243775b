"""Run an ASGI app with uvicorn on 127.0.0.1 in a background thread (a real server, a real port).

`FakeUpstream` is the base of the fake upstreams in this folder: each serves its own `app`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import uvicorn


class ServerThread:
    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any) -> None:
        options = {"log_level": "warning", "lifespan": "on", "access_log": False, **uvicorn_options}
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        self.server.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 15.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=1)
        if self.thread.is_alive():  # a handler a test left sleeping (a hung upstream): do not wait for it
            self.server.force_exit = True
            self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeUpstream:
    """What every fake upstream shares: its Starlette `app`, served on 127.0.0.1 between `start()` and `stop()`."""

    app: Any
    _server: ServerThread | None = None

    def start(self) -> Self:
        self._server = ServerThread(self.app).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the fake is not started"
        return self._server.port

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`, with no path."""
        assert self._server is not None, "the fake is not started"
        return self._server.url

    @property
    def base_url(self) -> str:
        """What a provider's `base_url` should be; a fake whose API lives under a path overrides it."""
        return self.url
