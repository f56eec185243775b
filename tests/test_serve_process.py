"""`imagegate serve` as a real process: SIGTERM drains gracefully; several workers share metrics.

The gateway runs as a child process (`python -m imagegate serve`) on a free 127.0.0.1 port, in front
of a fake OpenAI upstream served from this test process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from imagegate.router import supervisor
from tests.conftest import UPSTREAM_KEY, free_port, wait_until_healthy
from tests.fakes.openai_upstream import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
# uvicorn re-raises the signal after its graceful shutdown, so the exit status says "SIGTERM".
EXITED_ON_SIGTERM = (0, -signal.SIGTERM)


class ServeProcess:
    def __init__(self, tmp_path: Path, upstream: FakeOpenAI, *, workers: int | str = 1, grace_s: float = 10) -> None:
        cfg: dict[str, Any] = {
            "server": {"shutdown_grace_s": grace_s, "request_timeout_s": 30},
            "artifacts": {"dir": str(tmp_path / "artifacts")},
            "providers": {"up": {"type": "openai", "base_url": upstream.base_url, "api_key": UPSTREAM_KEY}},
            "models": {"remote": {"routes": [{"provider": "up", "model": "m"}]}},
        }
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        if workers != 1:  # where the workers' metric files go (the CLI makes a temporary one if unset)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
            (tmp_path / "metrics").mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--port", str(self.port),
             "--workers", str(workers), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until_healthy(self.proc, self.url, lambda: self.proc.stdout.read().decode() if self.proc.stdout else "")

    def generate(self, timeout: float = 30) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/images/generations", timeout=timeout,
                          json={"model": "remote", "prompt": "p", "size": "64x64"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        # The whole process group: worker processes must not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI(UPSTREAM_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def serve(tmp_path: Path, upstream: FakeOpenAI) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(**kwargs: Any) -> ServeProcess:
        started.append(ServeProcess(tmp_path, upstream, **kwargs))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def wait_until(check: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def refuses_connections(url: str) -> bool:
    """Whether a new connection goes unanswered: refused, or (accepted by the kernel while the
    listener was closing) dropped before any response, which httpx reports as a protocol or read
    error rather than a connect error."""
    try:
        httpx.get(f"{url}/healthz", timeout=2)
    except httpx.TransportError:
        return True
    return False


def test_sigterm_lets_in_flight_requests_finish_then_exits(serve: Any, upstream: FakeOpenAI) -> None:
    gw = serve(grace_s=10)
    upstream.behave(delay_s=3)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        pending = pool.submit(gw.generate)
        wait_until(lambda: upstream.requests, "the request to reach the upstream")
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(gw.url), "the gateway to stop accepting", timeout=10)
        assert not pending.done()  # no longer accepting, while the in-flight request goes on
        response = pending.result(timeout=20)
    assert response.status_code == 200 and response.json()["data"][0]["b64_json"]
    assert gw.proc.wait(timeout=10) in EXITED_ON_SIGTERM


def test_work_past_the_grace_period_fails_cleanly_and_the_process_exits(serve: Any, upstream: FakeOpenAI) -> None:
    gw = serve(grace_s=1.5)
    upstream.behave(delay_s=20)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        pending = pool.submit(gw.generate)
        wait_until(lambda: upstream.requests, "the request to reach the upstream")
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        response = pending.result(timeout=20)
    assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    assert response.headers["x-should-retry"] == "false"  # the upstream was mid-call
    assert gw.proc.wait(timeout=10) in EXITED_ON_SIGTERM
    assert time.monotonic() - started < 6


def test_metrics_add_up_across_worker_processes(serve: Any, upstream: FakeOpenAI, tmp_path: Path) -> None:
    gw = serve(workers=2)
    upstream.behave(delay_s=0.3)
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        # Concurrent, so that both workers take some (each request opens its own connection).
        assert [r.status_code for r in pool.map(lambda _: gw.generate(), range(24))] == [200] * 24
    served_by = {p.name.split("_")[-1] for p in (tmp_path / "metrics").glob("counter_*.db")}
    assert len(served_by) == 2, served_by
    for _ in range(6):  # several scrapes, answered by either worker: each sees the sum
        lines = httpx.get(f"{gw.url}/metrics", timeout=5).text.splitlines()
        requests = next(line for line in lines if line.startswith("imagegate_requests_total{")
                        and 'model="remote"' in line and 'status="200"' in line)
        assert float(requests.rsplit(" ", 1)[1]) == 24
        ok = next(line for line in lines if re.match(r'imagegate_upstream_attempts_total\{.*outcome="ok"', line))
        assert float(ok.rsplit(" ", 1)[1]) == 24


def test_workers_auto_runs_one_process_per_usable_core(serve: Any, tmp_path: Path) -> None:
    gw = serve(workers="auto")
    cores = len(os.sched_getaffinity(0))
    # uvicorn's supervisor and its workers: every worker serving is one more child process.
    wait_until(lambda: len(psutil.Process(gw.proc.pid).children(recursive=True)) >= cores, f"{cores} workers")
    assert gw.generate().status_code == 200


def test_workers_with_a_local_gpu_backend_are_refused(tmp_path: Path) -> None:
    cfg = {"providers": {"gpu": {"type": "diffusers", "models": {"m": {"family": "sd15", "path": str(tmp_path)}}}},
           "models": {"m": {"price_per_mp": 0, "routes": [{"provider": "gpu", "model": "m"}]}}}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--workers", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and "once per process" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "imagegate", "serve", "--workers", "many"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "auto" in bad.stderr


def _listening_workers(gw: ServeProcess) -> list[psutil.Process]:
    """The worker processes that listen on the gateway's port (each on its own socket)."""
    found = []
    for child in psutil.Process(gw.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == gw.port for c in child.net_connections("tcp")):
                found.append(child)
    return found


def test_connections_opened_at_once_are_spread_over_the_workers(serve: Any) -> None:
    # A shared listening socket let the first worker to wake take a whole burst of keep-alive
    # connections (router/supervisor.py). With a socket per worker the kernel spreads them by
    # address: 32 connections all on one of two workers has a chance of 2**-31.
    gw = serve(workers=2)
    wait_until(lambda: len(_listening_workers(gw)) == 2, "both workers to listen")
    connections = [http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10) for _ in range(32)]
    try:
        for conn in connections:
            conn.connect()
        for conn in connections:  # each answered, and kept open (HTTP/1.1 keep-alive)
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() and conn.sock is not None
        ours = {conn.sock.getsockname()[1] for conn in connections if conn.sock is not None}
        held = [{c.raddr.port for c in worker.net_connections("tcp") if c.raddr and c.raddr.port in ours}
                for worker in _listening_workers(gw)]
    finally:
        for conn in connections:
            conn.close()
    assert all(held) and set().union(*held) == ours, [len(each) for each in held]


def _loaded(pid: int) -> set[str]:
    """The extension modules a process has mapped, by package: what it really runs on."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {part for line in maps for part in ("uvloop", "httptools") if f"/{part}/" in line}


def test_the_gateway_and_its_workers_serve_on_uvloop_and_httptools(serve: Any) -> None:
    single = serve()
    assert single.generate().status_code == 200
    assert _loaded(single.proc.pid) == {"uvloop", "httptools"}
    workers = serve(workers=2)
    wait_until(lambda: len(_listening_workers(workers)) == 2, "both workers to listen")
    assert [_loaded(worker.pid) for worker in _listening_workers(workers)] == [{"uvloop", "httptools"}] * 2


def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(serve: Any) -> None:
    gw = serve(workers=2)
    wait_until(lambda: len(_listening_workers(gw)) == 2, "both workers to listen")
    victim = _listening_workers(gw)[0]
    victim.kill()
    wait_until(lambda: len(_listening_workers(gw)) == 2 and victim.pid not in {p.pid for p in _listening_workers(gw)},
               "a new worker in its place")
    assert gw.generate().status_code == 200
    children = psutil.Process(gw.proc.pid).children(recursive=True)
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=20) in EXITED_ON_SIGTERM
    # Workers are joined before the supervisor exits; multiprocessing's resource tracker follows it
    # once the supervisor's end of its pipe closes.
    wait_until(lambda: not [child for child in children if _alive(child)], "every child process to exit")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_on_a_port_in_use_fail_at_once(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    models = {"demo": {"price_per_mp": 0, "routes": [{"provider": "demo", "model": "demo"}]}}
    path.write_text(yaml.safe_dump({"artifacts": {"dir": str(tmp_path / "artifacts")},
                                    "providers": {"demo": {"type": "demo"}}, "models": models}))
    scratch = tmp_path / "tmp"  # where the CLI makes the workers' metrics directory, and removes it
    scratch.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}, "TMPDIR": str(scratch)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = subprocess.run([sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--port",
                              str(taken.getsockname()[1]), "--workers", "2"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0 and "cannot listen" in run.stderr and "Traceback" not in run.stderr
    assert not list(scratch.iterdir())


def test_a_workers_socket_gives_connections_tcp_nodelay() -> None:
    # Each worker's own listening socket (router/supervisor.py): its connections must get
    # TCP_NODELAY from asyncio as uvicorn's do, or a small answer waits for a delayed ACK.
    async def main() -> int:
        accepted: asyncio.Queue[int] = asyncio.Queue()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.put_nowait(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = supervisor._reuse_port_socket("127.0.0.1", 0)
        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
            nodelay = await asyncio.wait_for(accepted.get(), 10)
            writer.close()
        return nodelay

    assert asyncio.run(main()) == 1
