"""httpx as the load generator of bench/gateway_overhead.py, for machines without wrk: one
httpx.AsyncClient per client process, the processes starting the timed phase together."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from typing import Any

import httpx

from bench.procs import child_setup, cpu_seconds

ClientResult = tuple[list[float], int, float, float, float]  # latencies, errors, start, end, CPU s


@dataclass
class HttpxCell:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms: dict[str, float]  # CPU ms per request of each watched process, and the client's


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


@dataclass(frozen=True)
class Job:
    url: str
    body: dict[str, Any]
    key: str
    min_bytes: int  # a shorter answer counts as an error


async def load(client: httpx.AsyncClient, job: Job, concurrency: int, total: int) -> tuple[list[float], int]:
    """`total` requests over `concurrency` connections; a latency runs from sending to the last body byte."""
    latencies: list[float] = []
    errors, left = 0, total
    headers = {"authorization": f"Bearer {job.key}"}

    async def worker() -> None:
        nonlocal errors, left
        while left > 0:
            left -= 1
            start = time.perf_counter()
            resp = await client.post(job.url, json=job.body, headers=headers)
            latencies.append(time.perf_counter() - start)
            errors += resp.status_code != 200 or len(resp.content) < job.min_bytes

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def client_run(job: Job, concurrency: int, total: int, warmup: int, barrier: Barrier) -> ClientResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await load(client, job, concurrency, warmup)
        barrier.wait(120)  # all client processes start the timed phase together
        cpu0, start = time.process_time(), time.perf_counter()
        latencies, errors = await load(client, job, concurrency, total)
        return latencies, errors, start, time.perf_counter(), time.process_time() - cpu0


def client_main(conn: Connection, job: Job, concurrency: int, total: int, warmup: int, barrier: Barrier) -> None:
    child_setup()
    conn.send(asyncio.run(client_run(job, concurrency, total, warmup, barrier)))


def run_httpx(job: Job, cell: tuple[int, int, int, int], pids: dict[str, int]) -> HttpxCell:
    """(concurrency, timed requests, warm-up requests, client processes): the processes share the
    cell's connections and requests. CPU is counted for each of `pids` and for the clients."""
    concurrency, total, warmup, procs = cell
    ctx = mp.get_context("fork")
    barrier, pipes, workers = ctx.Barrier(procs + 1), [], []
    try:
        for i in range(procs):
            ours, theirs = ctx.Pipe()
            share = [n // procs + (i < n % procs) for n in (concurrency, total, warmup)]
            workers.append(ctx.Process(target=client_main, args=(theirs, job, *share, barrier), daemon=True))
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
    return HttpxCell(total, sum(r[1] for r in results), total / elapsed, percentile(latencies, 0.50) * 1000,
                     percentile(latencies, 0.99) * 1000, cpu)
