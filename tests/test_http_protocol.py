"""router/http/protocol.py: a request the HTTP parser refuses gets a 400 in its surface's error
shape, over a raw socket to a live gateway (as `imagegate serve` runs it), and reaches nothing."""

from __future__ import annotations

import socket
from typing import Any

import orjson

from tests.conftest import Gateway
from tests.fakes.openai_upstream import FakeOpenAI


def _exchange(gw: Gateway, request: bytes) -> tuple[bytes, dict[bytes, bytes], Any]:
    """Send `request` raw; the status line, the headers and the JSON body of the answer, read until
    the gateway closes the connection."""
    with socket.create_connection(("127.0.0.1", int(gw.url.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    assert int(headers[b"content-length"]) == len(body)
    return status, headers, orjson.loads(body)


def test_a_control_character_in_a_header_is_an_openai_400(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    body = b'{"model": "remote", "prompt": "p"}'
    status, headers, error = _exchange(gateway, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: application/json\r\nX-Note: a\x01b\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert status == b"HTTP/1.1 400 Bad Request" and headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/json"
    assert error == {"error": {"message": error["error"]["message"], "type": "invalid_request_error",
                               "param": None, "code": "invalid_http_request"}}
    assert "not valid HTTP/1.1" in error["error"]["message"]
    assert fake_openai.requests == []


def test_on_an_a1111_path_the_400_is_in_a1111s_shape(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    status, _, error = _exchange(gateway, b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nX-Note: a\x7fb\r\n"
                                 b"Content-Length: 2\r\n\r\n{}")
    assert status == b"HTTP/1.1 400 Bad Request"
    assert error["error"] == "invalid_http_request" and "not valid HTTP/1.1" in error["detail"]
    assert fake_openai.requests == []


def test_a_request_line_that_does_not_parse_is_a_400_too(gateway: Gateway) -> None:
    status, _, error = _exchange(gateway, b"GET /healthz HTTP/9 junk\r\n\r\n")
    assert status == b"HTTP/1.1 400 Bad Request" and error["error"]["code"] == "invalid_http_request"
