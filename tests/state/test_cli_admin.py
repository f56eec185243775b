"""`python -m router.cli keys …` against a temp SQLite config, and the admin HTTP API for keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import StartGateway, base_config

REPO = Path(__file__).resolve().parents[2]
ADMIN = "admin-secret-for-tests"


def keys(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imagegate", "keys", *args, "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_create_list_topup_revoke(tmp_path: Path) -> None:
    cfg = base_config(tmp_path)
    cfg["state"] = {"url": f"sqlite:///{tmp_path / 'state.db'}"}
    config = tmp_path / "imagegate.yaml"
    config.write_text(yaml.safe_dump(cfg))

    made = keys(config, "create", "--name", "ci", "--credits", "12.50", "--models", "demo-alias", "--rpm", "30")
    assert made.returncode == 0, made.stderr
    fields = dict(line.split(":", 1) for line in made.stdout.splitlines())
    key_id, secret = fields["id"].strip(), fields["key"].strip()
    assert secret.startswith("ig_") and fields["balance"].strip() == "12.50"
    webhook_secret = fields["webhook"].strip()
    assert webhook_secret.startswith("whsec_")
    rotated = keys(config, "webhook-secret", key_id)
    assert rotated.returncode == 0 and rotated.stdout.strip().startswith("whsec_")
    assert rotated.stdout.strip() != webhook_secret and webhook_secret not in keys(config, "list").stdout

    listed = keys(config, "list", "--json")
    assert listed.returncode == 0 and secret not in listed.stdout
    (item,) = json.loads(listed.stdout)["data"]
    assert (item["id"], item["balance_micros"], item["models"], item["rpm"]) == (key_id, 12_500_000, ["demo"], 30)
    assert secret not in keys(config, "list").stdout

    topped = keys(config, "topup", key_id, "--credits", "0.25")
    assert topped.returncode == 0 and "12.75" in topped.stdout
    assert keys(config, "revoke", key_id).returncode == 0
    assert json.loads(keys(config, "list", "--json").stdout)["data"][0]["revoked_at"] is not None

    # Each run is a process start (seconds): two refusals stand for the rest, which the admin API tests cover.
    for bad in (["topup", key_id, "--credits", "0.0000001"], ["create", "--name", "x", "--models", "no-such-model"],
                ["webhook-secret", "key_nosuchkey"]):
        failed = keys(config, *bad)
        assert failed.returncode == 1 and failed.stderr.startswith("imagegate keys"), (bad, failed.stderr)
        assert "Traceback" not in failed.stderr


def _admin_gateway(tmp_path: Path, start_gateway: StartGateway, admin_key: str = ADMIN) -> Any:
    cfg = base_config(tmp_path)
    cfg["state"] = {"url": f"sqlite:///{tmp_path / 'state.db'}"}
    cfg["auth"] = {"admin_key": admin_key}
    return start_gateway(cfg)


def test_admin_api_needs_the_admin_key(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = _admin_gateway(tmp_path, start_gateway)
    for headers in ({}, {"authorization": "Bearer wrong"}):
        assert gw.http.get("/admin/keys", headers=headers).status_code == 401
        made = gw.http.post("/admin/keys", json={"name": "x"}, headers=headers)
        assert made.status_code == 401 and made.json()["error"]["code"] == "invalid_admin_key"
        assert gw.http.post("/admin/keys/key_x/topup", json={"credits": "1"}, headers=headers).status_code == 401
    assert gw.http.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"] == []


def test_admin_api_off_without_an_admin_key(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = _admin_gateway(tmp_path, start_gateway, admin_key="")
    assert gw.http.get("/admin/keys").status_code == 404


def test_admin_api_manages_keys(tmp_path: Path, start_gateway: StartGateway) -> None:
    gw = _admin_gateway(tmp_path, start_gateway)
    auth = {"authorization": f"Bearer {ADMIN}"}
    made = gw.http.post("/admin/keys", headers=auth, json={"name": "web", "credits": "2.5", "models": ["demo-alias"],
                                                          "concurrency": 3})
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["key"].startswith("ig_") and body["models"] == ["demo"] and body["balance_micros"] == 2_500_000
    listed = gw.http.get("/admin/keys", headers=auth)
    assert body["key"] not in listed.text and listed.json()["data"][0]["id"] == body["id"]
    topped = gw.http.post(f"/admin/keys/{body['id']}/topup", headers=auth, json={"credits": "0.5"})
    assert topped.json()["balance_micros"] == 3_000_000
    revoked = gw.http.post(f"/admin/keys/{body['id']}/revoke", headers=auth)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert gw.http.post("/admin/keys/key_missing/revoke", headers=auth).status_code == 404
    for bad in ({}, {"name": "x", "credits": "-1"}, {"name": "x", "models": ["nope"]}, {"name": "x", "rpm": 0},
                {"name": "x", "colour": "red"}):
        refused = gw.http.post("/admin/keys", headers=auth, json=bad)
        assert refused.status_code == 400 and set(refused.json()["error"]) == {"message", "type", "param", "code"}
    unlimited = gw.http.post("/admin/keys", headers=auth, json={"name": "free"}).json()
    refused = gw.http.post(f"/admin/keys/{unlimited['id']}/topup", headers=auth, json={"credits": "1"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "key_unlimited"
