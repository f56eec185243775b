"""`imagegate keys create|list|revoke|topup`: the store named by the config's `state.url`, directly.

No running gateway is needed (SQLite waits for the gateway's writes; PostgreSQL is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from . import config
from .state import KeyRecord, StateError, Store, format_usd, open_store, usd_to_micros


def add_parser(sub: Any, load: Callable[[str | None], config.Config]) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke, top up, rotate the webhook secret")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; its secret is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--credits", help="a balance in USD (e.g. 25.00); omitted: unlimited, no balance kept")
    create.add_argument("--models", help="comma-separated models (ids or aliases) the key may use; omitted: all")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--concurrency", type=int, help="requests at once")
    listing = actions.add_parser("list", help="every key, without secrets")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    revoke = actions.add_parser("revoke", help="a revoked key answers 401 from then on")
    revoke.add_argument("id")
    topup = actions.add_parser("topup", help="add credits to a key's balance")
    topup.add_argument("id")
    topup.add_argument("--credits", required=True, help="USD to add (e.g. 10 or 2.50)")
    rotate = actions.add_parser("webhook-secret", help="a new webhook signing secret for a key, printed once")
    rotate.add_argument("id")
    for parser in (create, listing, revoke, topup, rotate):
        parser.add_argument("--config", help="YAML file whose state.url names the store (default: embedded)")
    keys.set_defaults(func=lambda args: run(args, load(args.config)))


def run(args: argparse.Namespace, cfg: config.Config) -> None:
    action: Callable[[Store, argparse.Namespace, config.Config], Awaitable[None]] = _ACTIONS[args.action]
    try:
        asyncio.run(_with_store(cfg.state.url, lambda store: action(store, args, cfg)))
    except (StateError, ValueError) as exc:
        print(f"imagegate keys {args.action}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


async def _with_store(url: str, work: Callable[[Store], Awaitable[None]]) -> None:
    store = await open_store(url)
    try:
        await work(store)
    finally:
        await store.close()


def _canonical(cfg: config.Config, names: str) -> list[str]:
    """Aliases become the ids they name, as the gateway compares resolved ids."""
    ids = {alias: model_id for model_id, m in cfg.models.items() for alias in [model_id, *m.aliases]}
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in ids:
            raise ValueError(f"unknown model '{name}' (known: {', '.join(sorted(cfg.models))})")
        out.append(ids[name])
    return out


def _line(key: KeyRecord) -> str:
    models = ",".join(key.models) if key.models is not None else "*"
    status = "revoked" if key.revoked else "active"
    return "\t".join([key.id, key.name, key.prefix + "…", status, format_usd(key.balance_micros), models,
                      str(key.rpm or "-"), str(key.concurrency or "-")])


async def _create(store: Store, args: argparse.Namespace, cfg: config.Config) -> None:
    credits = usd_to_micros(args.credits) if args.credits is not None else None
    models = _canonical(cfg, args.models) if args.models is not None else None
    key, secret = await store.create_key(args.name, credits, models, args.rpm, args.concurrency)
    webhook_secret = await store.rotate_webhook_secret(key.id)
    print(f"id:      {key.id}")
    print(f"key:     {secret}")
    print(f"balance: {format_usd(key.balance_micros)}")
    print(f"webhook: {webhook_secret}")
    print("The key and its webhook secret are shown only now; imagegate keeps the key's hash.", file=sys.stderr)


async def _webhook_secret(store: Store, args: argparse.Namespace, cfg: config.Config) -> None:
    print(await store.rotate_webhook_secret(args.id))
    print("The new webhook secret signs every event from now on; the old one no longer does.", file=sys.stderr)


async def _list(store: Store, args: argparse.Namespace, cfg: config.Config) -> None:
    keys = await store.list_keys()
    if args.json:
        print(json.dumps({"object": "list", "data": [k.public() for k in keys]}, indent=2))
        return
    print("\t".join(["id", "name", "prefix", "status", "balance", "models", "rpm", "concurrency"]))
    for key in keys:
        print(_line(key))


async def _revoke(store: Store, args: argparse.Namespace, cfg: config.Config) -> None:
    key = await store.revoke(args.id)
    print(f"revoked {key.id} ({key.name})")


async def _topup(store: Store, args: argparse.Namespace, cfg: config.Config) -> None:
    key = await store.topup(args.id, usd_to_micros(args.credits, allow_zero=False), "cli topup")
    print(f"{key.id}: balance {format_usd(key.balance_micros)}")


_ACTIONS: dict[str, Callable[[Store, argparse.Namespace, config.Config], Awaitable[None]]] = {
    "create": _create, "list": _list, "revoke": _revoke, "topup": _topup, "webhook-secret": _webhook_secret}
