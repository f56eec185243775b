"""Gateway overhead: the same image request sent straight to an upstream and through imagegate.

A fake OpenAI upstream answering a precomputed 1024x1024 PNG (about 1.6 MB of base64) and
`imagegate serve` each run in their own process on 127.0.0.1. One load generator drives both
paths in the same run, at concurrency 1 and 32: `wrk` (C, one thread; Debian's package, installed
here when missing) with a Lua script for the POST, or, with `--load httpx` or where wrk cannot be
had, httpx.AsyncClient in one or two client processes. Then the gateway's memory: 64 requests in
flight with n=1 and 16 with n=4, each on a gateway started for that cell, its peak RSS above its
idle RSS per in-flight image.

Printed: requests/s, p50/p99 latency, CPU ms per request of the upstream and the gateway, peak
RSS; then the issue's targets on this machine: gateway >= 0.35x direct at c=32, <= 3 ms added p50
at c=1, <= 3 ms gateway CPU per image, peak RSS <= 3x the base64 size per in-flight image.
Three gateways of this build run side by side: `gateway` as configured by default (every b64_json
answer also kept as an artifact), `nokeep` (`artifacts.keep_b64_answers: false`) and `workers`
(the default with `serve --workers auto`: CPU and RSS summed over its processes; no memory cells,
which are per process). `--before
EXE` adds a third, another build's `imagegate` executable, on the same upstream and load.
The c=1 and c=32 cells are side by side: `--blocks` rounds (5 by default), each running every path
in turn for its share of the timed seconds, so that a slow minute of this shared machine falls on
all of them alike; a cell's p50 is its blocks' median.
`--b64 2000` answers a black PNG of a few kilobytes instead: what is left is what a request costs
whatever its image (routing, the pipeline, the HTTP layers on both sides).
`--floor` adds `floor` (bench/floor_proxy.py): the least a proxy on imagegate's stack (uvicorn,
uvloop, Starlette, httpx over aiohttp) does, forwarding the body and answering the upstream's bytes
with no check at all; what it costs, no gateway on that stack can undercut.
`--profile gateway|nokeep|before` samples that one with py-spy during its first c=32 block and prints
where its time went.

Run from the repository root (Linux, about four minutes):  .venv/bin/python bench/gateway_overhead.py
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
import uvicorn
import yaml
from PIL import Image

from bench import profile
from bench.floor_proxy import floor_main
from bench.load_httpx import Job, run_httpx
from bench.load_wrk import ensure_wrk, run_wrk
from bench.procs import HOST, child_setup, cpu_seconds, family, free_port, reset_peak_rss, status_mb

KEY, MODEL, SIDE = "sk-bench-upstream-key", "bench", 1024
TARGET_B64 = 1_600_000  # "a 1024x1024 PNG, 1.6 MB of base64"
TARGETS = {"ratio": 0.35, "added_p50_ms": 3.0, "cpu_ms": 3.0, "rss_x": 3.0}
MEMORY_CELLS = [(64, 1), (16, 4)]  # (requests in flight, images per request)


def body(n: int = 1) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "bench", "size": f"{SIDE}x{SIDE}", "n": n}


def bench_png(side: int = SIDE, target_b64: int = TARGET_B64) -> bytes:
    """Random pixels in the top rows, black below: a PNG whose base64 is about `target_b64` bytes."""
    rows = min(side, round(target_b64 * 3 / 4 / (side * 3)))
    raw = random.Random(0).randbytes(side * rows * 3) + bytes(side * (side - rows) * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), raw).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def b64_size(png: bytes) -> int:
    return math.ceil(len(png) / 3) * 4


class PrecomputedUpstream:
    """OpenAI's POST /v1/images/generations (bearer key, ImagesResponse with b64_json), each answer
    built once per `n` up front, so the direct path costs what serving bytes costs."""

    def __init__(self, png: bytes) -> None:
        import base64

        b64 = base64.b64encode(png).decode()
        self.answers = {n: orjson.dumps({"created": 1_700_000_000, "data": [{"b64_json": b64}] * n,
                                         "output_format": "png", "size": f"{SIDE}x{SIDE}"}) for n in range(1, 5)}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        if (b"authorization", f"Bearer {KEY}".encode()) not in scope["headers"]:
            status, answer = 401, b'{"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}'
        else:
            status, answer = 200, self.answers[int(orjson.loads(b"".join(chunks)).get("n", 1))]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})


def upstream_main(port: int, png: bytes) -> None:
    child_setup()
    uvicorn.run(PrecomputedUpstream(png), host=HOST, port=port, log_level="warning", access_log=False,
                lifespan="off")


@dataclass(frozen=True)
class Build:
    """A gateway to run: its label, the `imagegate` command, its `artifacts:` options, serve flags."""

    label: str
    exe: list[str]
    artifacts: dict[str, Any]
    flags: tuple[str, ...] = ()


@dataclass
class Server:
    label: str  # direct | gateway | nokeep | workers | before | floor
    url: str  # where POST /v1/images/generations goes
    pid: int
    idle_rss_mb: float = math.nan


def wait_healthy(url: str, proc: subprocess.Popen[bytes] | BaseProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (proc.poll() if isinstance(proc, subprocess.Popen) else proc.exitcode) is not None:
            raise RuntimeError(f"{url} exited before it answered")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def start_gateway(tmp: Path, build: Build, upstream_url: str) -> tuple[subprocess.Popen[bytes], Server]:
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix=build.label + "-", dir=tmp))
    cfg = {"server": {"host": HOST}, "artifacts": {"dir": str(home / "artifacts"), **build.artifacts},
           "state": {"url": f"sqlite:///{home / 'state.db'}"},
           "providers": {"up": {"type": "openai", "base_url": upstream_url, "api_key": KEY}},
           "models": {MODEL: {"routes": [{"provider": "up", "model": "upstream-model"}]}}, "default_model": MODEL}
    (home / "bench.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [*build.exe, "serve", "--config", str(home / "bench.yaml"), "--port", str(port), "--log-level", "warning",
           *build.flags]
    proc = subprocess.Popen(cmd, cwd=home, preexec_fn=child_setup)
    url = f"http://{HOST}:{port}"
    wait_healthy(f"{url}/healthz", proc)
    if "--workers" in build.flags:  # the first worker answers while the others still start
        wait_workers(proc, len(os.sched_getaffinity(0)), home / "state.db")
    return proc, Server(build.label, f"{url}/v1/images/generations", proc.pid, status_mb(proc.pid, "VmRSS"))


def wait_workers(proc: subprocess.Popen[bytes], workers: int, state: Path, timeout: float = 60.0) -> None:
    """Until `workers` processes below the master have started their app: each has the state
    database open then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited while its workers started")
        if sum(_has_open(pid, state) for pid in family(proc.pid)[1:]) >= workers:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{workers} workers did not start")


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # the process or one of its descriptors went away meanwhile
        return False


@dataclass
class Cell:
    path: str
    concurrency: int
    n: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: dict[str, float]  # CPU ms per request: upstream, this path's gateway
    peak_rss_mb: float
    idle_rss_mb: float = math.nan  # of the gateway started for this cell alone (memory cells)


def measure(load: str, server: Server, pids: dict[str, int], concurrency: int, n: int, args: argparse.Namespace,
            min_bytes: int, reset_peak: bool = True, block: int | None = None) -> Cell:
    """One cell, or (wrk) block `block` of `args.blocks` of it: a warm-up (the first block's only),
    then the timed load, with CPU and peak RSS over the timed part."""
    watched = {"upstream": pids["direct"], **({server.label: server.pid} if server.label != "direct" else {})}
    if load == "httpx":
        many = concurrency > 1
        cell = (concurrency, args.httpx_requests * (3 if many else 1), 50, 2 if many else 1)
        if reset_peak:
            reset_peak_rss(server.pid)
        got = run_httpx(Job(server.url, body(n), KEY, min_bytes), cell, watched)
        return Cell(server.label, concurrency, n, got.requests, got.errors, got.rps, got.p50_ms, got.p99_ms,
                    got.cpu_ms, status_mb(server.pid, "VmHWM"))
    text, seconds = orjson.dumps(body(n)).decode(), args.duration / (1 if block is None else args.blocks)
    if not block:  # None or 0
        run_wrk(args.wrk, server.url, text, KEY, connections=concurrency, seconds=args.warmup)
    if reset_peak:
        reset_peak_rss(server.pid)
    spy = None
    if args.profile and (server.label, concurrency, n) == (args.profile, 32, 1) and not block:
        spy = profile.record(server.pid, seconds, args.tmp / "profile.txt")
    cpu0 = {name: cpu_seconds(pid) for name, pid in watched.items()}
    got = run_wrk(args.wrk, server.url, text, KEY, connections=concurrency, seconds=seconds)
    if spy is not None:
        spy.wait()
        args.profiles.append(args.tmp / "profile.txt")
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) * 1000 / max(1, got.requests) for name, pid in watched.items()}
    short = got.requests and got.bytes / got.requests < min_bytes
    return Cell(server.label, concurrency, n, got.requests, got.errors + got.non2xx + (got.requests if short else 0),
                got.rps, got.p50_ms, got.p99_ms, cpu, status_mb(server.pid, "VmHWM"))


def side_by_side(load: str, servers: list[Server], pids: dict[str, int], concurrency: int, args: argparse.Namespace,
                 min_bytes: int) -> list[Cell]:
    """The n=1 cells of one concurrency, side by side: `args.blocks` rounds, each running every
    path in turn for its share of the timed seconds, so that a slow minute of this shared machine
    falls on all of them alike."""
    blocks: dict[str, list[Cell]] = {server.label: [] for server in servers}
    for block in range(args.blocks if load == "wrk" else 1):
        for server in servers:
            blocks[server.label].append(measure(load, server, pids, concurrency, 1, args, min_bytes, block=block))
    return [merged(parts) for parts in blocks.values()]


def merged(parts: list[Cell]) -> Cell:
    """One cell from its blocks: requests, errors and CPU summed; the blocks' median p50, their
    worst p99 and highest peak RSS."""
    first, total = parts[0], sum(part.requests for part in parts)
    cpu = {name: sum(part.cpu_ms[name] * part.requests for part in parts) / max(1, total) for name in first.cpu_ms}
    return Cell(first.path, first.concurrency, first.n, total, sum(part.errors for part in parts),
                statistics.mean(part.rps for part in parts), statistics.median(part.p50_ms for part in parts),
                max(part.p99_ms for part in parts), cpu, max(part.peak_rss_mb for part in parts))


def report(cells: list[Cell], png: bytes, servers: list[Server], load: str, args: argparse.Namespace) -> None:
    print(f"\nmachine: {os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}; "
          f"Python {platform.python_version()}; load generator: {load}")
    print(f"payload: {SIDE}x{SIDE} PNG, {len(png):,} bytes = {b64_size(png):,} bytes of base64 per image")
    print(f"per cell: {args.warmup:g} s warm-up, then {args.duration:g} s timed; at n=1 in {args.blocks} blocks "
          "that alternate between the paths (p50: the blocks' median; p99: their worst)" if load == "wrk" else
          f"per cell: {args.httpx_requests} requests at c=1, {3 * args.httpx_requests} at c>1, after 50 warm-up")
    idle = [f"{s.label} idle RSS {s.idle_rss_mb:.1f} MB" for s in servers if s.label != "direct"]
    print("gateways: " + "; ".join(idle))
    print(f"\n{'path':<8} {'conc':>4} {'n':>2} {'reqs':>6} {'err':>3} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}   "
          f"{'CPU ms/req: upstream':>20} {'gateway':>8}   {'peak RSS MB':>11}")
    for c in cells:
        gw = f"{c.cpu_ms[c.path]:8.2f}" if c.path in c.cpu_ms and c.path != "upstream" else f"{'-':>8}"
        rss = f"{c.peak_rss_mb:11.1f}" if c.path != "direct" else f"{'-':>11}"
        print(f"{c.path:<8} {c.concurrency:>4} {c.n:>2} {c.requests:>6} {c.errors:>3} {c.rps:>7.1f} {c.p50_ms:>8.2f} "
              f"{c.p99_ms:>8.2f}   {c.cpu_ms['upstream']:20.2f} {gw}   {rss}")
    for server in servers[1:]:
        targets(cells, server, b64_size(png))


def targets(cells: list[Cell], server: Server, b64: int) -> None:
    by = {(c.path, c.concurrency, c.n): c for c in cells}
    label, direct = server.label, {c: by["direct", c, 1] for c in (1, 32)}
    ratio = by[label, 32, 1].rps / direct[32].rps
    added = by[label, 1, 1].p50_ms - direct[1].p50_ms
    cpu = max(by[label, c, 1].cpu_ms[label] for c in (1, 32))

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"\n{label}: throughput at c=32 {ratio:.2f}x direct (target >= {TARGETS['ratio']}: "
          f"{verdict(ratio >= TARGETS['ratio'])}); added p50 at c=1 {added:.2f} ms (target <= "
          f"{TARGETS['added_p50_ms']:g}: {verdict(added <= TARGETS['added_p50_ms'])}); CPU per image "
          f"{cpu:.2f} ms, the worse of c=1 and c=32 (target <= {TARGETS['cpu_ms']:g}: "
          f"{verdict(cpu <= TARGETS['cpu_ms'])})")
    for flight, n in MEMORY_CELLS:
        cell = by.get((label, flight, n))
        if cell is not None:
            per = (cell.peak_rss_mb - cell.idle_rss_mb) * 2**20 / (flight * n) / b64
            print(f"{label}: {flight} in flight with n={n}: peak {cell.peak_rss_mb:.1f} MB, "
                  f"{cell.peak_rss_mb - cell.idle_rss_mb:.1f} MB above idle = {per:.2f}x the base64 size per "
                  f"in-flight image (target <= {TARGETS['rss_x']:g}: {verdict(per <= TARGETS['rss_x'])})")


def options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", choices=["auto", "wrk", "httpx"], default="auto")
    ap.add_argument("--duration", type=float, default=10, help="timed seconds per wrk cell")
    ap.add_argument("--warmup", type=float, default=2, help="warm-up seconds per wrk cell")
    ap.add_argument("--blocks", type=int, default=5, help="alternating blocks per wrk cell at c=1 and c=32")
    ap.add_argument("--httpx-requests", type=int, default=1000, help="timed requests per httpx cell at c=1")
    ap.add_argument("--before", help="another build's imagegate executable, run beside this one")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory cells")
    ap.add_argument("--floor", action="store_true", help="add a minimal pass-through proxy on the same stack")
    ap.add_argument("--b64", type=int, default=TARGET_B64,
                    help="about this many bytes of base64 per image (default: 1.6 MB, the targets' size); "
                         "a small answer (--b64 2000) shows what a request costs whatever its image")
    ap.add_argument("--profile", choices=["gateway", "nokeep", "before"],
                    help="py-spy on that gateway during its c=32 cell (wrk only), summarised at the end")
    return ap.parse_args()


def start_floor(upstream_url: str, procs: list[subprocess.Popen[bytes] | BaseProcess]) -> Server:
    port = free_port()
    floor = mp.get_context("fork").Process(target=floor_main, args=(port, upstream_url, KEY), daemon=True)
    floor.start()
    procs.append(floor)
    wait_healthy(f"http://{HOST}:{port}/healthz", floor)
    assert floor.pid is not None
    return Server("floor", f"http://{HOST}:{port}/v1/images/generations", floor.pid, status_mb(floor.pid, "VmRSS"))


def memory_cell(tmp: Path, build: Build, port: int, pids: dict[str, int],
                cell: tuple[int, int], load: str, args: argparse.Namespace, png: bytes) -> Cell:
    """A memory cell on a gateway started for it: its peak RSS (warm-up included) above its idle
    RSS after start, with nothing kept from other cells' load."""
    proc, server = start_gateway(tmp, build, f"http://{HOST}:{port}/v1")
    try:
        flight, n = cell
        measured = measure(load, server, {**pids, build.label: server.pid}, flight, n, args, n * b64_size(png),
                           reset_peak=False)
        measured.idle_rss_mb = server.idle_rss_mb
        return measured
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> None:
    args = options()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` on SIGTERM too
    args.wrk = ensure_wrk() if args.load != "httpx" else None
    if args.load == "wrk" and args.wrk is None:
        raise SystemExit("wrk is not installed and could not be installed (apt-get install wrk)")
    load = "wrk" if args.wrk else "httpx"
    png, tmp = bench_png(target_b64=args.b64), Path(tempfile.mkdtemp(prefix="imagegate-bench-"))
    args.tmp, args.profiles = tmp, []
    exe = Path(sys.executable).parent / "imagegate"
    this = [str(exe)] if exe.exists() else [sys.executable, "-m", "imagegate"]
    # As configured by default (every answer kept as an artifact), with b64_json answers only passed
    # through, and as configured by default on every core.
    builds = [Build("gateway", this, {}), Build("nokeep", this, {"keep_b64_answers": False}),
              Build("workers", this, {}, ("--workers", "auto"))]
    if args.before:
        builds.append(Build("before", [args.before], {}))
    procs: list[subprocess.Popen[bytes] | BaseProcess] = []
    try:
        port = free_port()
        upstream = mp.get_context("fork").Process(target=upstream_main, args=(port, png), daemon=True)
        upstream.start()
        procs.append(upstream)
        wait_healthy(f"http://{HOST}:{port}/", upstream)
        assert upstream.pid is not None
        servers = [Server("direct", f"http://{HOST}:{port}/v1/images/generations", upstream.pid)]
        for build in builds:
            proc, server = start_gateway(tmp, build, f"http://{HOST}:{port}/v1")
            procs.append(proc)
            servers.append(server)
        if args.floor:
            servers.append(start_floor(f"http://{HOST}:{port}/v1", procs))
        pids = {s.label: s.pid for s in servers}
        cells = [cell for c in (1, 32) for cell in side_by_side(load, servers, pids, c, args, b64_size(png))]
        if not args.no_memory:
            # Per process: with workers each holds what its own requests hold.
            cells += [memory_cell(tmp, build, port, pids, cell, load, args, png) for cell in MEMORY_CELLS
                      for build in builds if not build.flags]
        report(cells, png, servers, load, args)
        for path in args.profiles:
            profile.summary(path)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(15) if isinstance(proc, subprocess.Popen) else proc.join(15)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
