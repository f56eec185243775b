"""Gateway overhead: the same image request sent straight to an upstream and through imagegate.

A fake OpenAI upstream (tests.fakes FakeOpenAI answering a 1024x1024 PNG of about 1.5 MB of
base64) and `imagegate serve` each run in their own process on 127.0.0.1. The same load
generator (httpx.AsyncClient in one or more client processes) drives both paths, at
concurrency 1 and 32, a fixed number of requests per cell after a warm-up. Printed: requests/s,
p50/p99 latency and CPU ms per request of each process; gateway/direct throughput at c=32
(target >= 0.70); p50 latency the gateway adds at c=1 (target < 5 ms); gateway peak RSS (VmHWM).

Run from the repository root (Linux, about a minute):  .venv/bin/python bench/gateway_overhead.py
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import yaml
from PIL import Image

from tests.fakes.openai_upstream import FakeOpenAI

HOST, KEY, MODEL, SIZE = "127.0.0.1", "sk-bench-upstream-key", "bench", 1024
TARGET_B64 = 1_500_000  # the issue: "a 1024x1024 PNG (about 1.5 MB of base64)"
BODY = {"model": MODEL, "prompt": "bench", "size": f"{SIZE}x{SIZE}", "n": 1}
# (concurrency, timed requests, warm-up requests, client processes). At c=32 one httpx client
# process would take a whole core and be the bottleneck of the direct path, so two share it.
CELLS = [(1, 1000, 50, 1), (32, 3000, 200, 2)]
ClientResult = tuple[list[float], int, float, float, float]  # latencies, errors, start, end, CPU s


def bench_png(side: int = SIZE, target_b64: int = TARGET_B64) -> bytes:
    """Random pixels in the top rows, black below: a PNG whose base64 is about `target_b64` bytes."""
    rows = min(side, round(target_b64 * 3 / 4 / (side * 3)))
    raw = random.Random(0).randbytes(side * rows * 3) + bytes(side * (side - rows) * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), raw).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class BenchUpstream(FakeOpenAI):
    """FakeOpenAI (noise=True) answering `png`: noise_png(1024, 1024) would be 4.2 MB of base64."""

    def __init__(self, png: bytes) -> None:
        super().__init__(KEY, noise=True)
        self.record, self.png = False, png

    def _image(self, width: int, height: int, seed: int, fmt: str) -> bytes:
        return self.png


def child_setup() -> None:
    """In every child: default SIGTERM, and SIGTERM when the bench dies, even by SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def upstream_main(conn: Connection, png: bytes) -> None:
    child_setup()
    conn.send(BenchUpstream(png).start().base_url)
    signal.pause()  # uvicorn serves in FakeOpenAI's thread until we are terminated


def start_upstream(png: bytes) -> tuple[BaseProcess, str]:
    ours, theirs = mp.Pipe()
    proc = mp.get_context("fork").Process(target=upstream_main, args=(theirs, png), daemon=True)
    proc.start()
    if not ours.poll(20):
        raise RuntimeError("fake upstream did not start")
    return proc, ours.recv()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_gateway(tmp: Path, upstream_url: str, port: int) -> subprocess.Popen[bytes]:
    cfg = {"server": {"host": HOST}, "artifacts": {"dir": str(tmp / "artifacts")},
           "providers": {"up": {"type": "openai", "base_url": upstream_url, "api_key": KEY}},
           "models": {MODEL: {"routes": [{"provider": "up", "model": "upstream-model"}]}}, "default_model": MODEL}
    (tmp / "bench.yaml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent / "imagegate"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "imagegate"]
    cmd += ["serve", "--config", str(tmp / "bench.yaml"), "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=tmp, preexec_fn=child_setup)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("gateway did not become healthy")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def proc_status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


@dataclass
class Cell:
    path: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: dict[str, float]  # CPU ms per request: client, upstream, gateway


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


async def load(client: httpx.AsyncClient, url: str, concurrency: int, total: int) -> tuple[list[float], int]:
    """`total` requests over `concurrency` connections; a latency runs from sending to the last body byte."""
    latencies: list[float] = []
    errors, left = 0, total
    headers = {"authorization": f"Bearer {KEY}"}

    async def worker() -> None:
        nonlocal errors, left
        while left > 0:
            left -= 1
            start = time.perf_counter()
            resp = await client.post(url, json=BODY, headers=headers)
            latencies.append(time.perf_counter() - start)
            errors += resp.status_code != 200 or len(resp.content) < TARGET_B64 // 2

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def client_run(url: str, concurrency: int, total: int, warmup: int, barrier: Barrier) -> ClientResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await load(client, url, concurrency, warmup)
        barrier.wait(120)  # all client processes start the timed phase together
        cpu0, start = time.process_time(), time.perf_counter()
        latencies, errors = await load(client, url, concurrency, total)
        return latencies, errors, start, time.perf_counter(), time.process_time() - cpu0


def client_main(conn: Connection, url: str, concurrency: int, total: int, warmup: int, barrier: Barrier) -> None:
    child_setup()
    conn.send(asyncio.run(client_run(url, concurrency, total, warmup, barrier)))


def run_cell(path: str, url: str, cell: tuple[int, int, int, int], pids: dict[str, int]) -> Cell:
    """`procs` load-generator processes share the cell's connections and requests."""
    concurrency, total, warmup, procs = cell
    ctx = mp.get_context("fork")
    barrier, pipes, workers = ctx.Barrier(procs + 1), [], []
    try:
        for i in range(procs):
            ours, theirs = ctx.Pipe()
            share = [n // procs + (i < n % procs) for n in (concurrency, total, warmup)]
            workers.append(ctx.Process(target=client_main, args=(theirs, url, *share, barrier), daemon=True))
            workers[-1].start()
            theirs.close()  # recv() then fails instead of hanging if the client process dies
            pipes.append(ours)
        barrier.wait(300)
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        results: list[ClientResult] = [conn.recv() for conn in pipes]
        cpu = {name: (cpu_seconds(pid) - cpu0[name]) * 1000 / total for name, pid in pids.items()}
    finally:
        for worker in workers:
            worker.terminate()  # a no-op for those that finished
            worker.join(10)
    cpu["client"] = sum(r[4] for r in results) * 1000 / total
    latencies = [lat for r in results for lat in r[0]]
    elapsed = max(r[3] for r in results) - min(r[2] for r in results)
    return Cell(path, concurrency, total, sum(r[1] for r in results), total / elapsed,
                percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000, cpu)


def report(cells: list[Cell], png: bytes, pids: dict[str, int], idle_rss: float) -> None:
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}; "
          f"Python {platform.python_version()}")
    print(f"payload: {SIZE}x{SIZE} PNG, {len(png):,} bytes = {math.ceil(len(png) / 3) * 4:,} bytes of base64; "
          f"request {BODY}")
    print("per cell: " + "; ".join(f"c={c}: {n} requests timed after {w} warm-up, {p} client process(es)"
                                   for c, n, w, p in CELLS))
    print("processes: fake upstream, gateway, httpx load generator(s), all on 127.0.0.1; CPU = utime+stime\n")
    print(f"{'path':<8} {'conc':>4} {'reqs':>5} {'err':>3} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}   "
          "CPU ms/req: client upstream gateway")
    for c in cells:
        gw = f"{c.cpu_ms['gateway']:7.2f}" if c.path == "gateway" else f"{'-':>7}"
        print(f"{c.path:<8} {c.concurrency:>4} {c.requests:>5} {c.errors:>3} {c.rps:>7.1f} {c.p50_ms:>8.2f} "
              f"{c.p99_ms:>8.2f}   {'':>10} {c.cpu_ms['client']:6.2f} {c.cpu_ms['upstream']:8.2f} {gw}")
    by = {(c.path, c.concurrency): c for c in cells}
    ratio = by["gateway", 32].rps / by["direct", 32].rps
    added = by["gateway", 1].p50_ms - by["direct", 1].p50_ms
    print(f"\ngateway/direct throughput at c=32: {ratio:.2f}  (target >= 0.70: {'met' if ratio >= 0.7 else 'MISSED'})")
    print(f"added p50 latency at c=1: {added:.2f} ms  (target < 5 ms: {'met' if added < 5 else 'MISSED'})")
    print(f"gateway peak RSS (VmHWM): {proc_status_mb(pids['gateway'], 'VmHWM'):.1f} MB  (idle after start: "
          f"{idle_rss:.1f} MB, after the run: {proc_status_mb(pids['gateway'], 'VmRSS'):.1f} MB; "
          f"fake upstream peak: {proc_status_mb(pids['upstream'], 'VmHWM'):.1f} MB)")


def stop(upstream: BaseProcess | None, gateway: subprocess.Popen[bytes] | None) -> None:
    """Terminate both servers (no-ops for one already gone), and kill what does not exit."""
    if gateway is not None:
        gateway.terminate()
        try:
            gateway.wait(15)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
    if upstream is not None:
        upstream.terminate()
        upstream.join(10)
        upstream.kill()
        upstream.join()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` on SIGTERM too
    png = bench_png()
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    upstream: BaseProcess | None = None
    gateway: subprocess.Popen[bytes] | None = None
    try:
        upstream, upstream_url = start_upstream(png)
        port = free_port()
        gateway = start_gateway(tmp, upstream_url, port)
        gateway_url = f"http://{HOST}:{port}"
        wait_healthy(gateway_url, gateway)
        assert upstream.pid is not None
        pids = {"upstream": upstream.pid, "gateway": gateway.pid}
        idle_rss = proc_status_mb(gateway.pid, "VmRSS")
        cells = [run_cell(path, f"{base}/v1/images/generations", cell, pids) for cell in CELLS
                 for path, base in (("direct", upstream_url.removesuffix("/v1")), ("gateway", gateway_url))]
        report(cells, png, pids, idle_rss)
    finally:
        stop(upstream, gateway)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
