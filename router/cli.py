"""The `imagegate` command: serve, worker, check-config, keys."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import config, keys_cli, runtime


def _load_or_exit(path: str | None) -> config.Config:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(f"imagegate: {path or config.DEFAULT_CONFIG} is not a valid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from . import supervisor
    from .app import create_app

    cfg = _load_or_exit(args.config)
    args.workers = _worker_count(args.workers, cfg)
    runtime.keep_freed_memory()
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Past the grace period uvicorn cancels what is left; the gateway answers those 503 a second before.
    options: dict[str, Any] = {"host": host, "port": port, "log_level": args.log_level, "access_log": False,
                               "timeout_graceful_shutdown": cfg.server.shutdown_grace_s + 1,
                               **runtime.SERVER_OPTIONS}
    if args.workers > 1:
        made = _multiprocess_metrics()
        os.environ["IMAGEGATE_CONFIG"] = str(Path(args.config).resolve()) if args.config else ""
        try:
            supervisor.run("imagegate.router.app:app_from_env", args.workers, options)
        finally:
            if made is not None:  # a directory of our own: nothing else reads it once the workers stop
                shutil.rmtree(made, ignore_errors=True)
    else:
        uvicorn.run(create_app(cfg, on_started=runtime.freeze_startup_objects), **options)


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("a number of processes (1 or more), or auto")
    return int(value)


def _worker_count(asked: int | str, cfg: config.Config) -> int:
    """`auto`: one process per CPU core this process may run on. A gateway with local GPU
    providers runs one process: each would load its own copy of the models."""
    local = [name for name, raw in cfg.providers.items() if raw.get("type") == "diffusers"]
    if asked == "auto":
        return 1 if local else max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1)
    if int(asked) > 1 and local:
        print(f"imagegate serve: --workers {asked} with diffusers providers ({', '.join(local)}) would load "
              "the models once per process; serve them with one process (or `imagegate worker`)", file=sys.stderr)
        raise SystemExit(1)
    return int(asked)


def _multiprocess_metrics() -> str | None:
    """Worker processes share counters through files (prometheus-client's multiprocess mode). The
    directory is PROMETHEUS_MULTIPROC_DIR, else a temporary one, made here and returned."""
    from .metrics import MULTIPROCESS_ENV

    made = None if os.environ.get(MULTIPROCESS_ENV) else tempfile.mkdtemp(prefix="imagegate-metrics-")
    directory = made or os.environ[MULTIPROCESS_ENV]
    os.environ[MULTIPROCESS_ENV] = directory
    for stale in Path(directory).glob("*.db"):  # left by an earlier run: their counts are not ours
        stale.unlink()
    return made


def cmd_worker(args: argparse.Namespace) -> None:
    """A GPU host: the same API, served by one process that owns this machine's GPUs (its
    `diffusers` providers), so gateways route to it as an ordinary `openai` upstream."""
    cfg = _load_or_exit(args.config)
    local = [name for name, raw in cfg.providers.items() if raw.get("type") == "diffusers"]
    if not local:
        print(f"imagegate worker: {args.config} configures no `type: diffusers` provider", file=sys.stderr)
        raise SystemExit(1)
    args.workers = 1  # one process per machine: GPU memory is not shared between processes
    cmd_serve(args)


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = _load_or_exit(args.file)
    # Served, an unpriced model is free; checked, it is a mistake until the price is written down.
    unpriced = [m for m, model in cfg.models.items() if not model.priced]
    if unpriced:
        print(f"imagegate: {args.file} is not a valid configuration:", file=sys.stderr)
        for model_id in unpriced:
            print(f"  - models.{model_id}: no price: give price_per_mp (0 for free) or price_per_image",
                  file=sys.stderr)
        raise SystemExit(1)
    if args.probe and (problems := asyncio.run(_probe(cfg))):
        print(f"imagegate: {args.file} is valid, but the probe failed:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{args.file}: OK ({len(cfg.models)} models, {len(cfg.providers)} providers"
          f"{'; state store and artifact store answer' if args.probe else ''})")
    for path, name in cfg.unset_env:
        print(f"  note: {path} uses ${{{name}}}, which is not set; that provider will be disabled")


async def _probe(cfg: config.Config) -> list[str]:
    """Reach the state store and the artifact store as the gateway would, changing nothing."""
    from .artifacts import open_artifacts
    from .state import probe_store

    found = [await probe_store(cfg.state.url), await open_artifacts(cfg.artifacts, b"probe").ping()]
    return [problem for problem in found if problem]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagegate", description="One OpenAI-compatible image endpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the gateway")
    serve.add_argument("--config", help="YAML file (default: the embedded config/default.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=_workers, default=1,
                       help="worker processes, or `auto`: one per usable CPU core (metrics are summed over them)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="serve this machine's GPUs (its diffusers providers) as the same API")
    worker.add_argument("--config", required=True, help="YAML file with `type: diffusers` providers")
    worker.add_argument("--host")
    worker.add_argument("--port", type=int)
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=cmd_worker)
    check = sub.add_parser("check-config", help="validate a YAML file; exit 1 listing each bad key")
    check.add_argument("file")
    check.add_argument("--probe", action="store_true", help="also reach the state store and the artifact store")
    check.set_defaults(func=cmd_check_config)
    keys_cli.add_parser(sub, _load_or_exit)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
