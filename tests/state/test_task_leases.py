"""Leases are renewed only for the tasks a replica is really running: a row that names this replica
but that no coroutine runs any more (its end could not be written) must lapse and be swept, even
while the replica is busy with other tasks."""

from __future__ import annotations

import asyncio
from pathlib import Path

from imagegate.router.state import Store, open_store
from tests.conftest import StartGateway, base_config
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.tasks_support import ADMIN, accepted, get_task, make_key, poll, submit, usage, wait_for


def test_an_orphaned_task_row_lapses_while_the_replica_runs_others(
        tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> None:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["state"]["lease_s"] = 1.5
    gw = start_gateway(cfg)
    key = make_key(gw.http, "1")
    replica = gw.state.tasks.replica
    key_id = usage(gw.http, key)["key_id"]

    async def orphan() -> str:
        # What a task whose end could not be written leaves: an active row leased to this very
        # replica, with a hold, that no coroutine of the replica runs. Written through a store of
        # the test's own on the gateway's database.
        store = await open_store(cfg["state"]["url"])
        try:
            return await _orphan(store, key_id, replica)
        finally:
            await store.close()


    fake_openai.behave(delay_s=8)  # keeps the replica busy (and renewing) for longer than the lease
    busy = accepted(submit(gw.http, key, model="remote", size="256x256"))
    wait_for(lambda: len(fake_openai.requests) == 1, "the busy task to reach the upstream")
    orphan_id = asyncio.run(orphan())
    assert usage(gw.http, key)["balance_micros"] == 1_000_000 - 1_311 - 5_000
    swept = poll(gw.http, key, orphan_id, timeout=20)
    assert swept["status"] == "failed" and swept["error"]["code"] == "task_abandoned", swept
    assert get_task(gw.http, key, busy["id"]).json()["status"] == "running"  # its own lease kept renewing
    assert usage(gw.http, key)["balance_micros"] == 1_000_000 - 1_311  # the orphan's hold came back


async def _orphan(store: Store, key_id: str, replica: str) -> str:
    hold = await store.hold(key_id, 5_000, "orphan")
    record = await store.create_task(
        task_id="task_orphan0000000000000000", key_id=key_id, model="remote", operation="generate",
        response_format="b64_json", hold_id=hold, slot_id=None,
        billing={"megapixels": 0.25, "price_per_mp": 0.02, "cost": 0.005, "held_micros": 5_000, "charged_micros": 0},
        ttl_s=3600, owner=replica, lease_s=1.5)
    return record.id
