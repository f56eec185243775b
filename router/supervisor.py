"""`imagegate serve --workers N`: N processes on one port, each listening on its own socket.

uvicorn's own supervisor hands every worker one shared listening socket. The worker that wakes
first accepts a whole burst of connections and keeps them for as long as they are kept alive: 32
keep-alive connections opened at once (a load generator, a load balancer's pool) all went to one
worker of two, and the second core stayed idle (README, Performance). Here each worker binds the
port itself with SO_REUSEPORT, and the kernel spreads new connections over the workers by address.
Where SO_REUSEPORT does not balance (not Linux), uvicorn's supervisor runs instead.

This process only starts the workers, replaces one that dies, and passes SIGTERM/SIGINT on; each
worker drains its own requests (app.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import threading
from functools import partial
from multiprocessing.process import BaseProcess
from typing import Any

import uvicorn

from .metrics import Metrics

log = logging.getLogger("imagegate")
STARTUP_FAILURE = 3  # uvicorn's exit status for a server that could not start


def balances_connections() -> bool:
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def run(app: str, workers: int, options: dict[str, Any]) -> None:
    """Serve the factory `app` ("module:function") from `workers` processes; returns when they
    have stopped. `options` are uvicorn.Config's."""
    if not balances_connections():
        uvicorn.run(app, factory=True, workers=workers, **options)
        return
    # Bound here first: a port in use fails once, now, and port 0 becomes one port for all. Never
    # listened on, this socket takes no connections; it keeps the port while workers come and go.
    held = _reuse_port_socket(options["host"], options["port"])
    options = {**options, "port": held.getsockname()[1]}
    context = multiprocessing.get_context("spawn")
    start = partial(_start, context, app, options)
    processes = [start() for _ in range(workers)]
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    failed = False
    while not stopping.wait(0.5):
        for index, process in enumerate(processes):
            if process.is_alive():
                continue
            if process.exitcode == STARTUP_FAILURE:
                failed = True
                stopping.set()
                break
            log.warning("worker process %s exited (status %s): starting another", process.pid, process.exitcode)
            Metrics.process_exit(process.pid)
            processes[index] = start()
    _stop(processes, float(options.get("timeout_graceful_shutdown") or 30) + 5)
    held.close()
    if failed:
        raise SystemExit(1)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on
    # sockets that say TCP. Without it every small answer waited 40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.error("cannot listen on %s:%s: %s", host, port, exc.strerror)
        raise SystemExit(STARTUP_FAILURE) from None
    return sock


def _start(context: Any, app: str, options: dict[str, Any]) -> BaseProcess:
    process: BaseProcess = context.Process(target=_worker, args=(app, options), daemon=False)
    process.start()
    return process


def _worker(app: str, options: dict[str, Any]) -> None:
    """One worker: its own socket in the port's group, then uvicorn until SIGTERM."""
    config = uvicorn.Config(app, factory=True, **options)
    server = uvicorn.Server(config)
    server.run(sockets=[_reuse_port_socket(config.host, config.port)])  # asyncio listens on it
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


def _stop(processes: list[BaseProcess], grace_s: float) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()  # SIGTERM: the worker drains (server.shutdown_grace_s) and exits
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()
