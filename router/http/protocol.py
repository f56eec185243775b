"""The HTTP/1.1 protocol `imagegate serve` runs: uvicorn's httptools one (llhttp, in C), with the
400 for a request it cannot parse written in the shape of the surface the request's path belongs
to, as every other 400 of the gateway is, instead of uvicorn's plain text.

llhttp is stricter than h11: it refuses a control character in a header value, which RFC 9110
§5.5 makes invalid. Such a request never reaches the app, so nothing is charged or sent upstream."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import ApiError
from .responses import error_response

MESSAGE = "the request is not valid HTTP/1.1: its request line or one of its headers could not be parsed"


class GatewayHttpProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        # The path, when the parser got that far (the request line comes before the headers).
        target: bytes = getattr(self, "url", b"")
        path = target.split(b"?", 1)[0].decode("latin-1")
        response = error_response(ApiError(400, MESSAGE, code="invalid_http_request"), path)
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in [*self.server_state.default_headers, *response.raw_headers, (b"connection", b"close")]:
            head.extend([name, b": ", value, b"\r\n"])
        self.transport.write(b"".join([*head, b"\r\n", response.body]))
        self.transport.close()
