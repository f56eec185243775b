"""Billing throughput: sustained requests/s through the credit path (hold → capture) per state store.

Every configuration starts fresh `imagegate serve` replicas (real subprocesses on 127.0.0.1) on
one state store, with auth on and one key holding 1,000,000 USD of credit (`imagegate keys
create`). Model `demo` (procedural images, no network) at 64x64, n=1, priced 1 USD/MP, so each
request holds and then captures 4096 micro-dollars and the gateway's store path dominates. One
httpx.AsyncClient in this process keeps CONCURRENCY requests in flight, spread round-robin over
the replicas, for DURATION seconds after a short warm-up. Configurations: SQLite with auth off
(unmetered baseline) and with an unlimited key (auth, no hold), then the credit key on SQLite
with 1 and 2 replicas (one file) and on PostgreSQL with 1 and 2 replicas (a fresh DATABASE on
postgresql://postgres@127.0.0.1:5432, created and dropped here; skipped when nothing answers
there). Printed per configuration: requests ok, errors by status, req/s, p50/p99 latency; a
ledger check (start credit − Σ x-imagegate-cost == balance from GET /v1/usage == Σ ledger in the
store, no hold left); then the ratios 2 vs 1 replicas, PG vs SQLite, credit vs unmetered.
A request counts (req/s, latency) when it completes inside the timed window; CPU ms/req is the
replicas' and this process's CPU over that window per request. The load generator shares the
machine with the replicas (on 2 cores it takes a good part of one): absolute figures are lower
bounds, the ratios are the point.

Run from the repository root (about 100 s):
    .venv/bin/python bench/billing_throughput.py [--concurrency 32] [--duration 10] [--warmup 1]
The side-by-side blocks alone, with an older build's credit replicas taking their turns as well
(its own venv's console script, e.g. from a `git worktree` of the old commit):
    .venv/bin/python bench/billing_throughput.py --only-side-by-side --before /tmp/old-venv/bin/imagegate
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy.ext.asyncio import create_async_engine  # noqa: E402

from imagegate.router.state import open_store, usd_to_micros  # noqa: E402
from imagegate.router.state.schema import ledger  # noqa: E402

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
CREDITS_USD = "1000000"
BODY = {"model": "demo", "prompt": "bench", "size": "64x64", "n": 1}
COST_MICROS = 64 * 64  # 0.004096 MP at 1 USD/MP


@dataclass
class Setup:
    label: str
    db: str  # "sqlite" | "postgresql"
    replicas: int
    billing: str  # "off": auth off | "unlimited": auth on, a key without balance | "credit": hold → capture


SETUPS = [Setup("SQLite, auth off", "sqlite", 1, "off"), Setup("SQLite, unlimited", "sqlite", 1, "unlimited"),
          Setup("SQLite", "sqlite", 1, "credit"), Setup("SQLite", "sqlite", 2, "credit"),
          Setup("PostgreSQL", "postgresql", 1, "credit"), Setup("PostgreSQL", "postgresql", 2, "credit")]


@dataclass
class Result:
    setup: Setup
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rps: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    check: str = "-"
    skipped: str = ""
    cpu_ms: tuple[float, float] = (math.nan, math.nan)  # CPU ms per ok request: replicas, load generator


@dataclass
class Tally:
    """What the load saw: timed latencies and statuses, plus every charge (warm-up included)."""
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    ok: int = 0
    charged_micros: int = 0
    cpu_s: tuple[float, float] = (0.0, 0.0)  # timed window: replicas' CPU, this process's CPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


async def pg_ddl(sql: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: AUTOCOMMIT.
    engine = create_async_engine(f"{PG_SERVER.replace('postgresql://', 'postgresql+asyncpg://')}/postgres",
                                 isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(sql))
    finally:
        await engine.dispose()


def write_config(tmp: Path, state_url: str, auth: bool) -> Path:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "request_timeout_s": 60},
        "state": {"url": state_url}, "artifacts": {"dir": str(tmp / "artifacts")},
        "auth": {"enabled": auth},
        "providers": {"demo": {"type": "demo"}},
        "models": {"demo": {"price_per_mp": 1, "routes": [{"provider": "demo", "model": "demo"}]}},
        "default_model": "demo",
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def imagegate(*args: str, exe: str | None = None) -> list[str]:
    """`exe` (another build's console script), else the venv's `imagegate` (as an operator runs it),
    else the module."""
    if exe is not None:
        return [exe, *args]
    script = Path(sys.executable).parent / "imagegate"
    return ([str(script)] if script.exists() else [sys.executable, "-m", "imagegate"]) + list(args)


def create_key(cfg_path: Path, credit: bool, exe: str | None = None) -> tuple[str, str]:
    """`imagegate keys create` against the store itself; returns (key id, secret)."""
    credits = ["--credits", CREDITS_USD] if credit else []  # none: an unlimited key, no balance kept
    out = subprocess.run(imagegate("keys", "create", "--name", "bench", *credits, "--config", str(cfg_path), exe=exe),
                         capture_output=True, text=True, check=True).stdout
    fields = {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in out.splitlines())}
    return fields["id"], fields["key"]


def start_replica(cfg_path: Path, log: Path, procs: list[subprocess.Popen[bytes]], exe: str | None = None) -> str:
    """Start one `imagegate serve`, added to `procs` at once (the caller's cleanup stops it even if
    we are interrupted while it starts), and wait until it is healthy; its URL."""
    port = free_port()
    with log.open("wb") as sink:  # the child keeps its own descriptor
        proc = subprocess.Popen(imagegate("serve", "--config", str(cfg_path), "--port", str(port),
                                          "--log-level", "warning", exe=exe),
                                cwd=cfg_path.parent, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return url
        time.sleep(0.1)
    raise RuntimeError(f"replica did not become healthy:\n{log.read_text()[-3000:]}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: nothing of it outlives the bench
        proc.wait(10)


def cpu_now(pids: list[int]) -> tuple[float, float]:
    return sum(cpu_seconds(pid) for pid in pids), time.process_time()


async def load(urls: list[str], pids: list[int], key: str | None, concurrency: int, warmup: float,
               duration: float) -> Tally:
    """Closed loop: `concurrency` workers, each sending its next request when the last one answered."""
    tally, targets = Tally(), itertools.cycle(f"{u}/v1/images/generations" for u in urls)
    headers = {"authorization": f"Bearer {key}"} if key else {}
    timed_from = time.perf_counter() + warmup
    until = timed_from + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        while (start := time.perf_counter()) < until:
            try:
                resp = await client.post(next(targets), json=BODY, headers=headers)
                status = str(resp.status_code)
                if resp.status_code == 200 and "x-imagegate-cost" in resp.headers:
                    tally.charged_micros += usd_to_micros(resp.headers["x-imagegate-cost"])
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            done = time.perf_counter()
            if timed_from <= done <= until:  # counted when it completes in the window: no warm-up, no tail
                tally.latencies.append(done - start)
                tally.ok += status == "200"
                tally.errors.update([] if status == "200" else [status])

    async def mark() -> None:  # CPU used over the timed window
        await asyncio.sleep(warmup)
        first = cpu_now(pids)
        await asyncio.sleep(until - time.perf_counter())
        last = cpu_now(pids)
        tally.cpu_s = (last[0] - first[0], last[1] - first[1])

    async with httpx.AsyncClient(limits=limits, timeout=60) as client:  # the tail still answers: charges
        await asyncio.gather(mark(), *(worker(client) for _ in range(concurrency)))
    return tally


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000 if ordered else math.nan  # nearest rank, ms


async def ledger_check(state_url: str, base_url: str, key_id: str, key: str, charged: int) -> str:
    """start − Σ charged == /v1/usage balance == Σ ledger, and no hold left (settles run before the
    response is sent, so once the load is over nothing should remain held)."""
    async with httpx.AsyncClient(timeout=30) as client:
        usage = (await client.get(f"{base_url}/v1/usage", headers={"authorization": f"Bearer {key}"})).json()
    store = await open_store(state_url)
    try:
        total = await store.runner.read(
            lambda conn: conn.execute(sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount_micros), 0))
                                      .where(ledger.c.key_id == key_id)).scalar())
        held = await store.held(key_id)
    finally:
        await store.close()
    expected = usd_to_micros(CREDITS_USD) - charged
    good = usage["balance_micros"] == expected == total and not held
    return (f"{'ok' if good else 'MISMATCH'}: start-charged={expected} usage={usage['balance_micros']} "
            f"ledger={total} holds={len(held)}")


def run_setup(setup: Setup, state_url: str, tmp: Path, args: argparse.Namespace) -> Result:
    cfg_path = write_config(tmp, state_url, setup.billing != "off")
    key_id, key = create_key(cfg_path, setup.billing == "credit") if setup.billing != "off" else ("", "")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # One after the other: no two replicas race to migrate the schema.
        urls = [start_replica(cfg_path, tmp / f"replica{i}.log", procs) for i in range(setup.replicas)]
        tally = asyncio.run(load(urls, [p.pid for p in procs], key or None, args.concurrency, args.warmup,
                                 args.duration))
        per_req = [1000 * cpu / max(1, tally.ok) for cpu in tally.cpu_s]
        result = Result(setup, tally.ok, tally.errors, tally.ok / args.duration, percentile(tally.latencies, 0.5),
                        percentile(tally.latencies, 0.99), cpu_ms=(per_req[0], per_req[1]))
        if setup.billing == "credit":
            result.check = asyncio.run(ledger_check(state_url, urls[0], key_id, key, tally.charged_micros))
        return result
    finally:
        stop(procs)


def run_pg(setup: Setup, tmp: Path, args: argparse.Namespace, index: int) -> Result:
    if not pg_reachable():
        return Result(setup, skipped="PostgreSQL not reachable on 127.0.0.1:5432")
    name = f"imagegate_bench_{os.getpid()}_{index}"
    asyncio.run(pg_ddl(f"CREATE DATABASE {name}"))
    try:
        return run_setup(setup, f"{PG_SERVER}/{name}", tmp, args)
    finally:
        asyncio.run(pg_ddl(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), {platform.system()} {platform.release()}; "
          f"Python {platform.python_version()}")
    print(f"load: {args.concurrency} concurrent requests from one httpx.AsyncClient, round-robin over the "
          f"replicas; {args.warmup:g} s warm-up + {args.duration:g} s timed per configuration")
    print(f"request: {BODY} at 1 USD/MP = {COST_MICROS} micro-USD each; key credit {CREDITS_USD} USD\n")
    print(f"{'configuration':<18} {'reps':>4} {'ok':>7} {'errors':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'CPU ms/req gw client':>20}  ledger")
    for r in results:
        if r.skipped:
            print(f"{r.setup.label:<18} {r.setup.replicas:>4}  skipped: {r.skipped}")
            continue
        errors = ",".join(f"{k}x{v}" for k, v in sorted(r.errors.items())) or "0"
        print(f"{r.setup.label:<18} {r.setup.replicas:>4} {r.ok:>7} {errors:<14} {r.rps:>8.1f} {r.p50_ms:>8.1f} "
              f"{r.p99_ms:>8.1f} {r.cpu_ms[0]:>13.1f} {r.cpu_ms[1]:>6.1f}  {r.check}")
    print()
    ratios(results)


def ratios(results: list[Result]) -> None:
    by = {(r.setup.label, r.setup.replicas): r for r in results if not r.skipped}

    def ratio(what: str, num: tuple[str, int], den: tuple[str, int]) -> None:
        if num in by and den in by:
            print(f"{what:<46} {by[num].rps / by[den].rps:5.2f}x req/s  (p50 {by[num].p50_ms:.1f} vs "
                  f"{by[den].p50_ms:.1f} ms)")
        else:
            print(f"{what:<46}   n/a (a configuration was skipped)")

    ratio("SQLite: 2 replicas vs 1", ("SQLite", 2), ("SQLite", 1))
    ratio("PostgreSQL: 2 replicas vs 1", ("PostgreSQL", 2), ("PostgreSQL", 1))
    ratio("PostgreSQL vs SQLite, 1 replica", ("PostgreSQL", 1), ("SQLite", 1))
    ratio("PostgreSQL vs SQLite, 2 replicas", ("PostgreSQL", 2), ("SQLite", 2))
    ratio("SQLite, 1 rep.: credit key vs auth off", ("SQLite", 1), ("SQLite, auth off", 1))
    ratio("SQLite, 1 rep.: unlimited key vs auth off", ("SQLite, unlimited", 1), ("SQLite, auth off", 1))
    ratio("SQLite, 1 rep.: credit key vs unlimited key", ("SQLite", 1), ("SQLite, unlimited", 1))


def credit_configs(args: argparse.Namespace) -> list[tuple[str, str, str, str | None]]:
    """(label, database, billing, the build's `imagegate` or None for this one) of each replica."""
    pg = not args.no_pg and pg_reachable()
    configs: list[tuple[str, str, str, str | None]] = [
        ("auth off", "sqlite", "off", None), ("SQLite, unlimited", "sqlite", "unlimited", None),
        ("SQLite, credit", "sqlite", "credit", None)]
    if pg:
        configs.append(("PostgreSQL, credit", "postgresql", "credit", None))
    if args.before:
        configs.append(("SQLite, credit, before", "sqlite", "credit", args.before))
        if pg:
            configs.append(("PostgreSQL, credit, before", "postgresql", "credit", args.before))
    return configs


def credit_cost(args: argparse.Namespace) -> None:
    """The credit path's CPU over an unmetered request, measured side by side: the replicas of each
    configuration run at once and take turns, `args.blocks` short blocks each, alternating; the
    median CPU ms a request per configuration (this machine's speed drifts between long rows).
    With `--before`, an older build's credit replicas take their turns too."""
    configs = credit_configs(args)
    procs: list[subprocess.Popen[bytes]] = []
    dirs: list[Path] = []
    live, pg_names = [], []
    try:
        for label, db, billing, exe in configs:
            dirs.append(Path(tempfile.mkdtemp(prefix="imagegate-credit-")))
            url = f"sqlite:///{dirs[-1] / 'state.db'}"
            if db == "postgresql":
                pg_names.append(f"imagegate_bench_{os.getpid()}_blocks{len(pg_names)}")
                asyncio.run(pg_ddl(f"CREATE DATABASE {pg_names[-1]}"))
                url = f"{PG_SERVER}/{pg_names[-1]}"
            cfg_path = write_config(dirs[-1], url, billing != "off")
            key = create_key(cfg_path, billing == "credit", exe)[1] if billing != "off" else None
            live.append((label, start_replica(cfg_path, dirs[-1] / "replica.log", procs, exe), procs[-1].pid, key))
        cpu: dict[str, list[float]] = {label: [] for label, *_ in configs}
        for _ in range(args.blocks):
            for label, url, pid, key in live:
                tally = asyncio.run(load([url], [pid], key, args.concurrency, 0.5, args.block_s))
                cpu[label].append(1000 * tally.cpu_s[0] / max(1, tally.ok))
    finally:
        stop(procs)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)
        for name in pg_names:
            asyncio.run(pg_ddl(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    print_credit_cost(cpu, args)


def print_credit_cost(cpu: dict[str, list[float]], args: argparse.Namespace) -> None:
    base = statistics.median(cpu["auth off"])
    print(f"\ncredit path, side by side: {args.blocks} alternating blocks of {args.block_s:g} s per configuration at "
          f"concurrency {args.concurrency}; median gateway CPU ms a request (blocks: min-max)")
    for label, values in cpu.items():
        median, extra = statistics.median(values), ""
        if label.endswith(", before"):
            now = statistics.median(cpu[label.removesuffix(", before")])
            extra = f"  this build {now:.2f}: {now - median:+.2f} ms, {now / median:.2f}x"
        elif label != "auth off":
            verdict = "met" if median - base <= 2 else "MISSED"
            target = f" (target <= 2: {verdict})" if "credit" in label else ""
            extra = f"  {median - base:+.2f} ms over auth off{target}"
        print(f"  {label:<26} {median:6.2f}  ({min(values):.2f}-{max(values):.2f}){extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--duration", type=float, default=10, help="timed seconds per configuration (default 10)")
    parser.add_argument("--warmup", type=float, default=1, help="untimed seconds first (default 1)")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL configurations")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per configuration (default 5)")
    parser.add_argument("--block-s", type=float, default=3, help="seconds per block (default 3)")
    parser.add_argument("--before", metavar="IMAGEGATE",
                        help="an older build's `imagegate` script: its credit replicas join the side-by-side blocks")
    parser.add_argument("--only-side-by-side", action="store_true", help="skip the long rows; run the blocks only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s on SIGTERM too
    if args.only_side_by_side:
        credit_cost(args)
        return
    results = []
    for index, setup in enumerate(SETUPS):
        tmp = Path(tempfile.mkdtemp(prefix="imagegate-billing-"))
        try:
            if setup.db == "sqlite":
                results.append(run_setup(setup, f"sqlite:///{tmp / 'state.db'}", tmp, args))
            elif args.no_pg:
                results.append(Result(setup, skipped="--no-pg"))
            else:
                results.append(run_pg(setup, tmp, args, index))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)
    credit_cost(args)


if __name__ == "__main__":
    main()
