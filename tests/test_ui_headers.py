"""The web page's HTTP side without a browser: the exact security headers, redirects, the admin
API's refusal of cross-site writes, no-store on private answers, and the switch."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegate.router.http.ui import CSP
from tests.conftest import Gateway, StartGateway, base_config

ADMIN = "admin-secret-for-headers"


@pytest.fixture
def gw(tmp_path: Path, start_gateway: StartGateway) -> Gateway:
    cfg = base_config(tmp_path)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    return start_gateway(cfg)


def test_the_page_is_served_with_a_strict_policy(gw: Gateway) -> None:
    assert CSP == ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                   "img-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'; "
                   "require-trusted-types-for 'script'; trusted-types 'none'")
    for path, kind in (("/ui/", "text/html"), ("/ui/admin", "text/html"), ("/ui/playground.js", "text/javascript"),
                       ("/ui/app.css", "text/css")):
        answer = gw.http.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith(kind)
        assert answer.headers["content-security-policy"] == CSP
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
    assert gw.http.get("/ui/../config.py").status_code == 404
    assert gw.http.get("/ui/nothing.js").status_code == 404


def test_root_and_ui_redirect_relatively(gw: Gateway) -> None:
    for path in ("/", "/ui"):
        answer = gw.http.get(path, follow_redirects=False)
        assert answer.status_code == 307 and answer.headers["location"] == "ui/"


def test_private_answers_are_not_cached(gw: Gateway) -> None:
    made = gw.http.post("/admin/keys", json={"name": "k", "credits": "1"}, headers={"authorization": f"Bearer {ADMIN}"})
    assert made.headers["cache-control"] == "no-store"
    person = {"authorization": f"Bearer {made.json()['key']}"}
    usage = gw.http.get("/v1/usage", headers=person)
    assert usage.status_code == 200 and usage.headers["cache-control"] == "no-store"
    listed = gw.http.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"})
    assert listed.headers["cache-control"] == "no-store"
    assert "no-store" not in gw.http.get("/v1/models", headers=person).headers.get("cache-control", "")


@pytest.mark.parametrize(("headers", "status"), [
    ({"origin": "https://evil.example"}, 403),
    ({"sec-fetch-site": "cross-site"}, 403),
    ({"sec-fetch-site": "same-site"}, 403),
    ({"content-type": "text/plain"}, 415),
    ({"content-type": "application/x-www-form-urlencoded"}, 415),
])
def test_admin_writes_refuse_cross_site_requests(gw: Gateway, headers: dict[str, str], status: int) -> None:
    answer = gw.http.post("/admin/keys", content=b'{"name": "x"}',
                          headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json", **headers})
    assert answer.status_code == status, answer.text
    listed = gw.http.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert listed == []  # nothing was made


def test_same_origin_admin_writes_pass(gw: Gateway) -> None:
    answer = gw.http.post("/admin/keys", json={"name": "x"}, headers={
        "authorization": f"Bearer {ADMIN}", "origin": gw.url, "sec-fetch-site": "same-origin"})
    assert answer.status_code == 201


def test_dry_run_quotes_without_holding_or_calling(gw: Gateway) -> None:
    key = gw.http.post("/admin/keys", json={"name": "k", "credits": "1"},
                       headers={"authorization": f"Bearer {ADMIN}"}).json()["key"]
    auth = {"authorization": f"Bearer {key}"}
    quote = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "512x512", "n": 2,
                                                          "dry_run": True}, headers=auth)
    assert quote.status_code == 200 and quote.json()["object"] == "image.quote"
    assert quote.json()["billing"]["cost"] == round(512 * 512 * 2 * 0.0015) / 1e6
    usage = gw.http.get("/v1/usage", headers=auth).json()
    assert usage["balance_micros"] == 1_000_000 and [e["kind"] for e in usage["ledger"]] == ["topup"]
    bad = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "p", "size": "100x100",
                                                        "dry_run": True}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"


def test_the_page_can_be_turned_off(tmp_path: Path, start_gateway: StartGateway) -> None:
    cfg = base_config(tmp_path)
    cfg["surfaces"] = {"ui": False}
    off = start_gateway(cfg)
    assert off.http.get("/ui/").status_code == 404 and off.http.get("/", follow_redirects=False).status_code == 404
