"""Artifacts belong to the key that made them: uploads, results, signed URLs, edits and usage (auth on)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.conftest import StartGateway, b64, base_config, png_bytes
from tests.fakes.openai_upstream import FakeOpenAI
from tests.state.test_billing import ADMIN, usage


def _gateway(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway, **server: Any) -> Any:
    cfg = base_config(tmp_path, fake_openai.base_url)
    cfg["auth"] = {"enabled": True, "admin_key": ADMIN}
    cfg["server"].update(server)
    return start_gateway(cfg)


@pytest.fixture
def gw(tmp_path: Path, fake_openai: FakeOpenAI, start_gateway: StartGateway) -> Any:
    return _gateway(tmp_path, fake_openai, start_gateway)


def make_key(gw: Any) -> str:
    made = gw.http.post("/admin/keys", json={"name": "t", "credits": "1.00"},
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def upload(gw: Any, key: str, data: bytes) -> str:
    answer = gw.http.post("/v1/uploads", files={"file": ("a.png", data, "image/png")}, headers=auth(key))
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def content(gw: Any, path: str, key: str | None = None) -> httpx.Response:
    return gw.http.get(path, headers=auth(key) if key else {})


def shown(answer: httpx.Response) -> str:
    kind = answer.headers.get("content-type", "")
    return answer.text[:500] if "json" in kind or "text" in kind else f"{kind}, {len(answer.content)} bytes"


def assert_error(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, shown(answer)
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error


def stored(gw: Any) -> list[str]:
    return sorted(p.name for p in Path(gw.state.artifacts.dir).glob("art_*"))


def test_upload_is_seen_by_its_owner_only(gw: Any) -> None:
    owner, stranger = make_key(gw), make_key(gw)
    data = png_bytes(80, 80, (1, 2, 3))
    art = upload(gw, owner, data)
    path = f"/v1/artifacts/{art}/content"
    got = content(gw, path, owner)
    assert got.status_code == 200 and got.content == data and got.headers["content-type"] == "image/png"
    assert_error(content(gw, path, stranger), 404, "artifact_not_found")
    bare = content(gw, path)
    assert bare.status_code == 401, shown(bare)
    assert set(bare.json()["error"]) == {"message", "type", "param", "code"}
    assert data not in bare.content


@pytest.mark.parametrize("query", ["?x=signature=", "?nosignature=1", "?signature=abc", "?expires=99999999999",
                                   "?x=expires=1&y=signature=2"])
def test_a_query_that_only_looks_signed_is_not_a_credential(gw: Any, query: str) -> None:
    owner, stranger = make_key(gw), make_key(gw)
    data = png_bytes(40, 40, (9, 8, 7))
    path = f"/v1/artifacts/{upload(gw, owner, data)}/content{query}"
    bare = content(gw, path)
    assert bare.status_code == 401 and data not in bare.content, shown(bare)
    assert_error(content(gw, path, stranger), 404, "artifact_not_found")
    assert content(gw, path, owner).content == data


def test_url_result_is_owned_and_its_signed_url_needs_no_key(gw: Any) -> None:
    owner, stranger = make_key(gw), make_key(gw)
    answer = gw.http.post("/v1/images/generations", headers=auth(owner),
                          json={"model": "demo", "prompt": "x", "size": "64x64", "response_format": "url"})
    assert answer.status_code == 200, answer.text
    item = answer.json()["data"][0]
    url = urlsplit(item["url"])
    assert url.path.startswith("/v1/artifacts/art_") and {"expires", "signature"} <= set(parse_qs(url.query))
    signed = httpx.get(item["url"], timeout=30)  # no key at all
    assert signed.status_code == 200 and signed.headers["content-type"] == "image/png"
    bare_path = url.path
    mine = content(gw, bare_path, owner)
    assert mine.status_code == 200 and mine.content == signed.content
    assert_error(content(gw, bare_path, stranger), 404, "artifact_not_found")
    assert content(gw, bare_path).status_code == 401


def _signed(gw: Any, owner: str) -> tuple[str, int, str]:
    art = upload(gw, owner, png_bytes(64, 64))
    query = parse_qs(urlsplit(gw.state.artifacts.signed_path(_meta(gw, art))).query)
    return art, int(query["expires"][0]), query["signature"][0]


def _meta(gw: Any, art: str) -> Any:
    found = gw.state.artifacts._read(art)
    assert found is not None, art
    return found[0]


def _url(art: str, expires: int | str, signature: str) -> str:
    return f"/v1/artifacts/{art}/content?expires={expires}&signature={signature}"


def test_forged_or_extended_signature_is_403(gw: Any) -> None:
    art, expires, signature = _signed(gw, make_key(gw))
    assert content(gw, _url(art, expires, signature)).status_code == 200  # the genuine URL works
    flipped = signature[:10] + ("0" if signature[10] != "0" else "1") + signature[11:]
    assert_error(content(gw, _url(art, expires, flipped)), 403, "invalid_signature")
    assert_error(content(gw, _url(art, expires + 3600, signature)), 403, "invalid_signature")
    assert_error(content(gw, _url(art, expires - 1, signature)), 403, "invalid_signature")
    other = upload(gw, make_key(gw), png_bytes(64, 64, (9, 9, 9)))  # a valid signature of one id opens no other
    assert_error(content(gw, _url(other, expires, signature)), 403, "invalid_signature")


def test_expired_signature_is_403(gw: Any) -> None:
    art, _, _ = _signed(gw, make_key(gw))
    past = int(time.time()) - 60
    genuine = gw.state.artifacts._signature(art, past)  # signed with the gateway's own secret, but expired
    assert_error(content(gw, _url(art, past, genuine)), 403, "invalid_signature")


def test_edit_with_another_keys_artifact_is_404_and_costs_nothing(gw: Any, fake_openai: FakeOpenAI) -> None:
    owner, stranger = make_key(gw), make_key(gw)
    art = upload(gw, owner, png_bytes(256, 256, (200, 0, 0)))
    edit = {"model": "remote", "prompt": "make it blue", "size": "256x256"}
    for reference in ({"image": art}, {"images": [{"file_id": art}]}):
        answer = gw.http.post("/v1/images/edits", json={**edit, **reference}, headers=auth(stranger))
        assert_error(answer, 404, "artifact_not_found")
    assert fake_openai.requests == []
    seen = usage(gw, stranger)
    assert seen["balance_micros"] == 1_000_000 and [e["kind"] for e in seen["ledger"]] == ["topup"]
    mine = gw.http.post("/v1/images/edits", json={**edit, "image": art}, headers=auth(owner))
    assert mine.status_code == 200, mine.text  # the owner may use it
    assert len(fake_openai.requests) == 1
    assert fake_openai.last.files[0][2] == png_bytes(256, 256, (200, 0, 0))


def test_usage_shows_only_the_callers_own_entries(gw: Any) -> None:
    one, two = make_key(gw), make_key(gw)
    for key, size in ((one, "64x64"), (one, "128x128"), (two, "96x96")):
        answer = gw.http.post("/v1/images/generations", json={"model": "demo", "prompt": "x", "size": size},
                              headers=auth(key))
        assert answer.status_code == 200, answer.text
    first, second = usage(gw, one), usage(gw, two)
    assert first["key_id"] != second["key_id"]
    for seen in (first, second):
        assert {e["key_id"] for e in seen["ledger"]} == {seen["key_id"]}
        assert sum(e["amount_micros"] for e in seen["ledger"]) == seen["balance_micros"]
    assert not {e["id"] for e in first["ledger"]} & {e["id"] for e in second["ledger"]}
    # 96 × 96 × 0.0015 USD/MP = 13.824 → 14 micros: the other key's two requests are not in it
    assert [(e["kind"], e["amount_micros"]) for e in second["ledger"]] == [
        ("capture", 0), ("hold", -14), ("topup", 1_000_000)]


@pytest.mark.parametrize("as_json", [False, True], ids=["multipart", "json"])
def test_upload_over_max_body_mb_is_413_and_nothing_stored(tmp_path: Path, fake_openai: FakeOpenAI,
                                                           start_gateway: StartGateway, as_json: bool) -> None:
    gw = _gateway(tmp_path, fake_openai, start_gateway, max_body_mb=1)
    key = make_key(gw)
    big = png_bytes(64, 64) + os.urandom(1_200_000)  # a PNG with trailing bytes: over 1 MB either way
    if as_json:
        answer = gw.http.post("/v1/uploads", json={"file": "data:image/png;base64," + b64(big)}, headers=auth(key))
    else:
        answer = gw.http.post("/v1/uploads", files={"file": ("big.png", big, "image/png")}, headers=auth(key))
    assert_error(answer, 413, "request_too_large")
    assert stored(gw) == []
    art = upload(gw, key, png_bytes(64, 64))  # a small one still goes through
    assert stored(gw) and all(name.startswith(art) for name in stored(gw))
