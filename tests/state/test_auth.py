"""`auth.enabled: true` through the official openai SDK against a live gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from imagegate.router.pipeline import accounts
from imagegate.router.state import open_store
from tests.conftest import StartGateway, base_config, expect_error

ADMIN = "admin-secret-for-tests"


@pytest.fixture
def gw(tmp_path: Path, start_gateway: StartGateway) -> Any:
    cfg = base_config(tmp_path)
    cfg["models"]["other"] = {"price_per_mp": 0.01, "routes": [{"provider": "demo", "model": "demo"}]}
    cfg["auto"] = {"policy": "priority", "candidates": ["other", "demo"]}
    cfg["state"] = {"url": f"sqlite:///{tmp_path / 'state.db'}"}
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    return start_gateway(cfg)


def make_key(gw: Any, **fields: Any) -> dict[str, Any]:
    made = gw.http.post("/admin/keys", json={"name": "t", **fields}, headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    return made.json()


def client(gw: Any, key: str) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=30)


def generate(sdk: OpenAI, model: str = "demo") -> Any:
    return sdk.images.generate(model=model, prompt="a red cube", size="64x64")


def test_no_or_wrong_key_is_401(gw: Any) -> None:
    err = expect_error(lambda: generate(client(gw, "ig_" + "x" * 32)), 401)
    assert err.response.json()["error"]["code"] == "invalid_api_key" and err.response.headers["x-request-id"]
    expect_error(lambda: generate(client(gw, "sk-not-ours")), 401)
    expect_error(lambda: client(gw, "whatever").models.list(), 401)
    bare = httpx.post(f"{gw.url}/v1/images/generations", json={"prompt": "x"}, timeout=30)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"


def test_open_endpoints_need_no_key(gw: Any) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert gw.http.get(path).status_code == 200, path


def test_allowed_key_is_served_and_revoked_key_is_401(gw: Any) -> None:
    key = make_key(gw, models=["demo"])
    sdk = client(gw, key["key"])
    result = generate(sdk)
    assert result.data[0].b64_json
    assert generate(sdk, "demo-alias").data[0].b64_json  # an alias of an allowed model is that model
    assert sdk.models.list().data
    gw.http.post(f"/admin/keys/{key['id']}/revoke", headers={"authorization": f"Bearer {ADMIN}"})
    expect_error(lambda: generate(sdk), 401)


def test_model_outside_the_keys_list_is_403(gw: Any) -> None:
    sdk = client(gw, make_key(gw, models=["demo"])["key"])
    err = expect_error(lambda: generate(sdk, "other"), 403)
    assert err.response.json()["error"]["code"] == "model_not_allowed"
    # "auto" picks among the allowed candidates only: "other" comes first in the config, "demo" serves.
    auto = sdk.images.generate(model="auto", prompt="a red cube", size="64x64")
    assert auto.model == "demo"  # type: ignore[attr-defined]
    only_other = client(gw, make_key(gw, models=["other"])["key"])
    assert generate(only_other, "other").data[0].b64_json
    expect_error(lambda: generate(only_other, "demo"), 403)


def test_key_without_model_list_may_use_every_model(gw: Any) -> None:
    sdk = client(gw, make_key(gw)["key"])
    assert generate(sdk, "other").data[0].b64_json and generate(sdk, "demo").data[0].b64_json


def test_auth_off_by_default_takes_any_key(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = start_gateway(base_config(tmp_path))
    assert generate(client(gw, "anything")).data[0].b64_json


def test_a_key_revoked_elsewhere_is_refused_by_its_hold_while_still_trusted(gw: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway trusts a key it found for a second without asking the store; a key with credits
    revoked meanwhile elsewhere (the CLI, another replica) is refused by its hold, and pays nothing."""
    monkeypatch.setattr(accounts, "KEY_FRESH_S", 3600.0)  # the key stays trusted however slow this machine is
    key = make_key(gw, credits="5")
    sdk = client(gw, key["key"])
    assert generate(sdk).data[0].b64_json  # found, and trusted from now on

    async def revoke_elsewhere() -> int | None:
        store = await open_store(f"sqlite:///{tmp_path / 'state.db'}")
        try:
            await store.revoke(key["id"])
            return await store.balance(key["id"])
        finally:
            await store.close()

    balance = asyncio.run(revoke_elsewhere())
    err = expect_error(lambda: generate(sdk), 401)
    assert err.response.json()["error"]["message"] == "this API key has been revoked"
    listed = gw.http.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert [k["balance_micros"] for k in listed if k["id"] == key["id"]] == [balance]  # nothing held or charged
