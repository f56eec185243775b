"""Failover under steady load: a constant request rate while the first route fails and recovers.

`imagegate serve` runs as its own process in front of two fake OpenAI upstreams on 127.0.0.1
(tests.fakes FakeOpenAI, 256x256 PNGs after a 50 ms "generation"). Model `chain` routes to
`primary` first (retry attempts 2, circuit opens after 5 failures, 3 s cool-down), then `backup`.
An open-loop generator sends RATE requests/s (each on schedule, whether or not earlier ones have
answered) through three phases: primary healthy, primary answering 503, primary recovered.
Printed per phase: requests, success rate, p50/p99 latency, and from the gateway's /metrics the
fallbacks, retries and requests that skipped the open circuit.

Run from the repository root (about 40 s):  .venv/bin/python bench/failover_load.py [RATE] [PHASE_S]
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import yaml

from tests.fakes.openai_upstream import FakeOpenAI

KEY = "sk-bench-upstream-key"
BODY = {"model": "chain", "prompt": "bench", "size": "256x256"}
PHASES = [("healthy", None), ("primary 503", 503), ("recovered", None)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config(primary: FakeOpenAI, backup: FakeOpenAI, tmp: Path) -> dict:
    def provider(fake: FakeOpenAI) -> dict:
        return {"type": "openai", "base_url": fake.base_url, "api_key": KEY, "max_concurrency": 64,
                "max_queue": 256, "circuit": {"failures": 5, "cooldown_s": 3}}

    retry = {"attempts": 2, "backoff_s": 0.05, "max_backoff_s": 0.2}
    return {"server": {"request_timeout_s": 30}, "artifacts": {"dir": str(tmp / "artifacts")},
            "providers": {"primary": provider(primary), "backup": provider(backup)},
            "models": {"chain": {"routes": [{"provider": "primary", "model": "m", "retry": retry},
                                            {"provider": "backup", "model": "m"}]}}}


def start_gateway(cfg: dict, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "imagegate", "serve", "--config", str(path), "--port", str(port),
                             "--log-level", "error"], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not start")


def counters(url: str) -> dict[str, float]:
    """Sums of the routing counters in /metrics."""
    sums = {"fallbacks": 0.0, "retries": 0.0, "circuit_skips": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("imagegate_fallbacks_total{"):
            sums["fallbacks"] += float(value)
        elif line.startswith("imagegate_upstream_retries_total{"):
            sums["retries"] += float(value)
        elif line.startswith("imagegate_route_skips_total{") and 'reason="circuit_open"' in line:
            sums["circuit_skips"] += float(value)
    return sums


async def phase(client: httpx.AsyncClient, rate: float, seconds: float) -> list[tuple[int, float]]:
    """Fire `rate` requests a second for `seconds`, on schedule; (status, latency) of each."""
    results: list[tuple[int, float]] = []

    async def one() -> None:
        started = time.perf_counter()
        try:
            status = (await client.post("/v1/images/generations", json=BODY)).status_code
        except httpx.HTTPError:
            status = 0
        results.append((status, time.perf_counter() - started))

    tasks = []
    begin = time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def drive(url: str, primary: FakeOpenAI, rate: float, seconds: float) -> None:
    print(f"{'phase':<14}{'requests':>9}{'success':>9}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'fallbacks':>10}{'retries':>8}{'skipped':>8}")
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for name, failure in PHASES:
            primary.behave(fail_status=failure, delay_s=0.05)
            before = counters(url)
            results = await phase(client, rate, seconds)
            after = counters(url)
            ok = [lat for status, lat in results if status == 200]
            delta = {k: after[k] - before[k] for k in after}
            print(f"{name:<14}{len(results):>9}{len(ok) / len(results):>9.1%}{pct(ok, 0.5) * 1e3:>8.0f}"
                  f"{pct(ok, 0.99) * 1e3:>8.0f}{delta['fallbacks']:>10.0f}{delta['retries']:>8.0f}"
                  f"{delta['circuit_skips']:>8.0f}")


def main() -> None:
    rate = float(sys.argv[1]) if len(sys.argv) > 1 else 40.0
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    primary, backup = FakeOpenAI(KEY).start(), FakeOpenAI(KEY).start()
    primary.record = backup.record = False
    backup.behave(delay_s=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_gateway(config(primary, backup, Path(tmp)), Path(tmp))
        try:
            print(f"imagegate failover under load: {rate:g} requests/s, {seconds:g} s per phase, "
                  f"{os.cpu_count()} CPUs; upstreams answer 256x256 PNGs after 50 ms")
            asyncio.run(drive(url, primary, rate, seconds))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            primary.stop()
            backup.stop()


if __name__ == "__main__":
    main()
