"""The AUTOMATIC1111 surface's cost: `/sdapi/v1/txt2img` against `/v1/images/generations`, same model.

One `imagegate serve` process on 127.0.0.1 with the `demo` model; one httpx client in this process
sends the same request (prompt, seed, size, n=1, PNG) through each surface, in alternating blocks
of requests at a fixed concurrency, so both surfaces see the same machine state. Printed per
surface and size: requests/s, p50 latency, and the gateway process's CPU ms per request (utime +
stime from /proc), medians over the blocks; then txt2img / generations CPU (target: under 1.10).

Run from the repository root (Linux, about a minute):  .venv/bin/python bench/a1111_surface.py
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_overhead import HOST, child_setup, cpu_seconds, free_port, wait_healthy

# label → (path, body for a side). "option": no checkpoint in the request, so the caller's stored
# sd_model_checkpoint is read (Open WebUI's way), one more store round trip.
SURFACES: dict[str, tuple[str, Callable[[int], dict[str, object]]]] = {
    "generations": ("/v1/images/generations",
                    lambda side: {"model": "demo", "prompt": "bench", "size": f"{side}x{side}", "seed": 1}),
    "txt2img": ("/sdapi/v1/txt2img", lambda side: {"prompt": "bench", "width": side, "height": side, "seed": 1,
                                                   "override_settings": {"sd_model_checkpoint": "demo"}}),
    "txt2img, option": ("/sdapi/v1/txt2img", lambda side: {"prompt": "bench", "width": side, "height": side,
                                                           "seed": 1}),
}


async def block(client: httpx.AsyncClient, path: str, body: dict[str, object], count: int,
                concurrency: int) -> list[float]:
    """`count` requests, `concurrency` at a time; their latencies in seconds."""
    latencies: list[float] = []
    queue = iter(range(count))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            answer = await client.post(path, json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:200]}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


Row = tuple[float, float, float]  # req/s, p50 ms, gateway CPU ms/request


async def measure(url: str, pid: int, side: int, args: argparse.Namespace) -> dict[str, list[Row]]:
    """Per surface, one row per block."""
    out: dict[str, list[Row]] = {label: [] for label in SURFACES}
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        for path, body in SURFACES.values():  # warm-up
            await block(c, path, body(side), args.warmup, args.concurrency)
        for _ in range(args.rounds):
            for label, (path, body) in SURFACES.items():
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                latencies = await block(c, path, body(side), args.requests, args.concurrency)
                wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
                out[label].append((args.requests / wall, statistics.median(latencies) * 1000,
                                  cpu / args.requests * 1000))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per block (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per surface, alternating (default 5)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sizes", default="64,512", help="image sides to run (default 64,512)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-a1111-bench-"))
    port = free_port()
    cfg = {"server": {"host": HOST}, "artifacts": {"dir": str(tmp / "artifacts")},
           "state": {"url": f"sqlite:///{tmp / 'state.db'}"},
           "providers": {"demo": {"type": "demo"}},
           "models": {"demo": {"limits": {"max_side": 1024}, "routes": [{"provider": "demo", "model": "demo"}]}},
           "default_model": "demo"}
    (tmp / "bench.yaml").write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent / "imagegate"
    gateway = subprocess.Popen([str(exe), "serve", "--config", str(tmp / "bench.yaml"), "--port", str(port),
                                "--log-level", "warning"], cwd=tmp, preexec_fn=child_setup)
    url = f"http://{HOST}:{port}"
    try:
        wait_healthy(url, gateway)
        print(f"machine: {platform.machine()}, Python {platform.python_version()}; gateway pid {gateway.pid}")
        print(f"per block: {args.requests} requests at concurrency {args.concurrency}; {args.rounds} blocks per "
              f"surface, alternating, after {args.warmup} warm-up requests each; figures are medians over blocks\n")
        print(f"{'surface':26} {'size':>7} {'req/s':>8} {'p50 ms':>8} {'gateway CPU ms/req':>19}")
        for side in (int(s) for s in args.sizes.split(",")):
            results = asyncio.run(measure(url, gateway.pid, side, args))
            medians = {label: [statistics.median(col) for col in zip(*rows, strict=True)]
                       for label, rows in results.items()}
            for label, (rps, p50, cpu) in medians.items():
                print(f"{label:26} {side:>4}^2 {rps:>8.1f} {p50:>8.2f} {cpu:>19.2f}")
            for label in ("txt2img", "txt2img, option"):
                ratio = medians[label][2] / medians["generations"][2]
                verdict = "met" if ratio < 1.10 else "MISSED"
                print(f"{'':26} {side:>4}^2  {label} / generations gateway CPU: {ratio:.3f} "
                      f"(target < 1.10: {verdict})")
            print()
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)


if __name__ == "__main__":
    main()
