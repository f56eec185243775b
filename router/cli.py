"""The `imagegate` command: serve, check-config."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config


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

    from .app import create_app

    cfg = _load_or_exit(args.config)
    host = args.host or cfg.server.host
    port = cfg.server.port if args.port is None else args.port
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=args.log_level, timeout_graceful_shutdown=30,
                access_log=False)


def cmd_check_config(args: argparse.Namespace) -> None:
    cfg = _load_or_exit(args.file)
    print(f"{args.file}: OK ({len(cfg.models)} models, {len(cfg.providers)} providers)")
    for path, name in cfg.unset_env:
        print(f"  note: {path} uses ${{{name}}}, which is not set; that provider will be disabled")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagegate", description="One OpenAI-compatible image endpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the gateway")
    serve.add_argument("--config", help="YAML file (default: the embedded config/default.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a YAML file; exit 1 listing each bad key")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
