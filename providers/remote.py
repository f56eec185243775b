"""`HTTPProvider`: the base of every adapter that calls a remote HTTP API.

It owns one pooled `httpx.AsyncClient` per provider instance (the credentials live only in its
headers) and a second, credential-less one for result downloads; it bounds the whole call with the
instance's `timeout_s`, and turns every transport failure and garbage answer into an UpstreamError
whose message never carries a secret.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import anyio
import httpx

from . import http
from .base import ImageRequest, Provider, ProviderResult, UpstreamError
from .options import HTTPProviderOptions


class HTTPProvider(Provider):
    options: HTTPProviderOptions
    # Whether the upstream refuses every call without `api_key` (then an empty key disables the route).
    requires_api_key = True

    def __init__(self, name: str, options: HTTPProviderOptions) -> None:
        super().__init__(name, options)
        self.base = options.base_url.rstrip("/")
        self._client: httpx.AsyncClient | None = None
        self._transport: httpx.AsyncBaseTransport | None = None  # the API client's, for `receive`
        self._downloads: httpx.AsyncClient | None = None

    # -- what subclasses provide ---------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        """Headers that carry the credentials; sent on API calls, never on downloads."""
        return {}

    @abstractmethod
    async def run(self, request: ImageRequest) -> ProviderResult:
        """Generate, within the whole-call deadline that `generate` sets."""

    def error(self, response: httpx.Response) -> UpstreamError:
        """An upstream error answer as what the client should see; subclasses read their error body."""
        return http.error_for_status(response.status_code, f"HTTP {response.status_code}",
                                     retry_after=http.retry_after_seconds(response))

    # -- shared machinery ----------------------------------------------------------------------
    def secrets(self) -> list[str]:
        return [self.options.api_key]

    def missing_settings(self) -> list[str]:
        return ["api_key"] if self.requires_api_key and not self.options.api_key else []

    async def start(self) -> None:
        self._transport = http.make_transport(self.options)
        self._client = http.make_client(self.options, {"accept": "application/json", **self.auth_headers()},
                                        self._transport)
        self._downloads = http.make_client(self.options, {})

    async def aclose(self) -> None:
        for client in (self._client, self._downloads):
            if client is not None:
                await client.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "provider not started"
        return self._client

    async def generate(self, request: ImageRequest) -> ProviderResult:
        try:
            with anyio.fail_after(self.options.timeout_s):
                return await self.run(request)
        except TimeoutError:
            raise UpstreamError(f"upstream did not finish within {self.options.timeout_s:g} s", status=504,
                                code="upstream_timeout", retryable=True) from None

    async def receive(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, bytearray]:
        """One API call: the answer (closed: status and headers) and its body, read whole into one
        buffer but never past `max_answer_mb` (a broken upstream or a proxy must not be able to
        fill the gateway's memory)."""
        request = self.client.build_request(method, http.parsed_url(url), **kwargs)
        assert self._transport is not None, "provider not started"
        try:
            response = await http.send_direct(self._transport, request)
            try:
                body = await http.read_buffer(response, int(self.options.max_answer_mb * 1024 * 1024))
            finally:
                await response.aclose()
        except http.TooLarge:
            raise http.bad_response(f"upstream answer is larger than {self.options.max_answer_mb:g} MB") from None
        except httpx.HTTPError as exc:
            raise http.transport_error(exc) from None
        return response, body

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One API call, its answer read whole (as `receive`) into a plain httpx.Response."""
        response, body = await self.receive(method, url, **kwargs)
        return _whole(response, bytes(body))

    async def call(self, method: str, url: str, **kwargs: Any) -> Any:
        """Send, map an error status through `error`, and parse the JSON answer."""
        response = await self.send(method, url, **kwargs)
        if response.status_code >= 300:
            raise self.error(response)
        return http.parse_json(response)

    async def call_images(self, method: str, url: str, **kwargs: Any) -> tuple[Any, list[memoryview]]:
        """`call` for an images answer: the JSON without its `b64_json` strings, and those as views
        into the answer's buffer (http.parse_images_answer), so megabytes of base64 pass through."""
        response, body = await self.receive(method, url, **kwargs)
        if response.status_code >= 300:
            raise self.error(_whole(response, bytes(body)))
        return http.parse_images_answer(body)

    def download_hosts(self) -> list[str]:
        return [http.base_host(self.base), *self.options.download_hosts]

    async def download(self, url: str) -> bytes:
        """Fetch a result URL now (they expire), from this provider's own hosts only."""
        assert self._downloads is not None, "provider not started"
        return await http.download(self._downloads, url, allowed_hosts=self.download_hosts(),
                                   max_bytes=int(self.options.max_download_mb * 1024 * 1024),
                                   timeout_s=self.options.download_timeout_s)

    def clean(self, message: Any, limit: int = 500) -> str:
        """An upstream message made safe to show: text, bounded, with every secret redacted."""
        return http.redact(str(message), self.secrets())[:limit]


def _whole(response: httpx.Response, body: bytes) -> httpx.Response:
    # The body is decoded already: the headers must not say it is still compressed.
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=body, request=response.request)
