"""What every HTTP adapter shares: one pooled client, error mapping, bounded downloads, redaction."""

from __future__ import annotations

import binascii
import functools
import math
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import httpx
import orjson
import pybase64
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from .base import GeneratedImage, UpstreamError
from .options import HTTPProviderOptions

MAX_REDIRECTS = 3
# httpx-aiohttp reads bodies in 16 KB pieces: a hundred trips through aiohttp's and httpx's stream
# layers for one 1.6 MB answer, about a third of the gateway's CPU per image. Its class attribute
# is the knob; up to 1 MB comes back per read, whatever has arrived.
AiohttpResponseStream.CHUNK_SIZE = 1 << 20


def make_transport(options: HTTPProviderOptions) -> httpx.AsyncBaseTransport:
    """The connection pool of one client. The aiohttp transport reads megabyte bodies at about half
    the CPU of httpx's default one (bench/gateway_overhead.py)."""
    limits = httpx.Limits(max_connections=options.max_connections, max_keepalive_connections=options.max_connections)
    verify = httpx.create_ssl_context(trust_env=False)

    def session() -> aiohttp.ClientSession:  # made on the first call, inside the running loop
        connector = aiohttp.TCPConnector(limit=options.max_connections, keepalive_timeout=limits.keepalive_expiry,
                                         ssl=verify)
        # No cookie jar: nothing an upstream sets on one caller's call rides on another's.
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return AiohttpTransport(limits=limits, trust_env=False, client=session)


def make_client(options: HTTPProviderOptions, headers: dict[str, str],
                transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """One pooled client per provider instance; the api key lives only in these headers."""
    timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s)
    return httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=False,
                             transport=transport or make_transport(options))


@functools.lru_cache(maxsize=256)
def parsed_url(url: str) -> httpx.URL:
    """`url` parsed once: an API's few endpoints are called over and over, and httpx parses a str
    URL on every request. URLs are immutable, so one object serves every call."""
    return httpx.URL(url)


async def send_direct(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
    """An API call built by the provider's client (its headers, timeouts and body), sent straight
    to the client's transport, its answer still to be read. httpx.AsyncClient.send adds only what
    these calls do not use: the redirect and auth flows (neither is followed), a cookie jar
    (nothing an upstream sets on one caller's call should ride on another's), and a stream wrapper
    that times the answer. On a small answer those cost as much CPU as the call (README,
    Performance)."""
    response = await transport.handle_async_request(request)
    response.request = request
    return response


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


MAX_RETRY_AFTER_S = 3600.0  # a longer hint is noise; the router's retry policy caps it lower anyway


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Seconds from `Retry-After` (delta-seconds or an HTTP date), within 0..MAX_RETRY_AFTER_S;
    None when absent or unreadable. Upstream text: nothing here may raise."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def error_for_status(status: int, message: str, *, retry_after: float | None = None) -> UpstreamError:
    """Map an upstream HTTP status to what the client sees if no other route serves the request."""
    if status == 429:
        return UpstreamError(f"upstream rate limited: {message}", status=429, code="upstream_rate_limited",
                             retryable=True, retry_after=retry_after)
    if status >= 500:
        return UpstreamError(f"upstream error ({status}): {message}", status=502, code="upstream_error",
                             retryable=True, retry_after=retry_after)
    if status in (401, 403):
        # The gateway's own upstream credentials are wrong: not the client's fault, another route may work.
        return UpstreamError("upstream rejected the gateway's credentials", status=502, code="upstream_auth_failed",
                             fallback=True)
    if status == 404:
        return UpstreamError(f"upstream could not find the model or endpoint: {message}", status=502,
                             code="upstream_not_found", fallback=True)
    return UpstreamError(f"upstream rejected the request: {message}", status=400, code="upstream_rejected")


def transport_error(exc: httpx.HTTPError) -> UpstreamError:
    # Before the request was sent: the aiohttp transport reports a refused connection as ConnectTimeout.
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return UpstreamError("upstream unreachable", status=503, code="upstream_unavailable", retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError("upstream timed out", status=504, code="upstream_timeout", retryable=True)
    if isinstance(exc, httpx.WriteError):  # the request never got through whole: nothing was done
        return UpstreamError("upstream unreachable", status=503, code="upstream_unavailable", retryable=True)
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        # The request was sent and the answer lost: the upstream may have done (and billed) the work,
        # as after a read timeout, so it counts as one (retryable, and marked paid by the router).
        return UpstreamError("upstream connection lost before it answered", status=504, code="upstream_timeout",
                             retryable=True)
    return UpstreamError("upstream request failed", status=502, code="upstream_error", retryable=True)


def parse_json(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise UpstreamError("upstream answered with something that is not JSON", status=502,
                            code="upstream_bad_response", fallback=True) from None


def decode_b64_image(text: Any, *, seed: int | None = None) -> GeneratedImage:
    """Base64 (or a data URI), as a str or as a view into the upstream's answer, into bytes; the
    base64 is kept as it came (ASCII bytes). Garbage is a 502, not a 500."""
    if isinstance(text, str):
        if not text.isascii():
            raise bad_response("upstream image data is not valid base64")
        b64: bytes | memoryview = text.encode("ascii")
    elif isinstance(text, (bytes, memoryview)):
        b64 = text
    else:
        b64 = b""
    if b64[:5] == b"data:":
        b64 = b64[bytes(b64[:200]).find(b",") + 1:]
    if not len(b64):
        raise bad_response("image data missing from upstream answer")
    try:
        # pybase64: the stdlib decoder costs ~3 ms per megabyte, most of the gateway's own time.
        data = pybase64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise bad_response("upstream image data is not valid base64") from None
    return GeneratedImage(data=data, seed=seed, b64=b64)


_TO_STRING = re.compile(rb'\s*:\s*"')


def parse_images_answer(body: bytearray) -> tuple[Any, list[memoryview]]:
    """An images answer (`{"data": [{"b64_json": "…"}, …]}`) parsed without copying its base64:
    each `"b64_json"` string is cut out of the buffer as a view (left as "" in what is parsed), the
    rest parsed by orjson. The views come in the order of the items whose `b64_json` is "" then.
    Anything unexpected (an escape inside a value) falls back to parsing the whole answer."""
    view, skeleton, spans, pos = memoryview(body), [], [], 0
    while (at := body.find(b'"b64_json"', pos)) != -1:
        to_string = _TO_STRING.match(body, at + 10)
        if to_string is None:
            pos = at + 10
            continue
        start = to_string.end()
        end = body.find(b'"', start)
        if end == -1 or body.find(b"\\", start, end) != -1:  # base64 needs no escapes: not ours to cut
            return _parse_all(body), []
        skeleton.append(view[pos:start])
        spans.append(view[start:end])
        pos = end
    skeleton.append(view[pos:])
    try:
        return orjson.loads(b"".join(skeleton)), spans
    except orjson.JSONDecodeError:
        raise bad_response("upstream answered with something that is not JSON") from None


def _parse_all(body: bytearray) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_response("upstream answered with something that is not JSON") from None


def bad_response(message: str) -> UpstreamError:
    return UpstreamError(message, status=502, code="upstream_bad_response", fallback=True)


def host_allowed(url: str, allowed: Iterable[str]) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        return False
    for entry in allowed:
        entry = entry.lower()
        if host == entry.lstrip(".") or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


async def download(
    client: httpx.AsyncClient, url: str, *, allowed_hosts: Iterable[str], max_bytes: int, timeout_s: float
) -> bytes:
    """Fetch an upstream result URL at once: own hosts only (every redirect too), size cap, timeout.

    `client` must carry no credentials: result URLs often live on storage hosts, not the API host.
    """
    allowed = list(allowed_hosts)
    for _ in range(MAX_REDIRECTS + 1):
        if not host_allowed(url, allowed):
            raise bad_response("upstream returned an image URL on a host it does not own")
        try:
            async with client.stream("GET", url, timeout=timeout_s) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    url = urljoin(url, resp.headers["location"])
                    continue
                if resp.status_code != 200:
                    raise UpstreamError(f"upstream image download failed ({resp.status_code})", status=502,
                                        code="upstream_download_failed", retryable=resp.status_code >= 500,
                                        fallback=True)
                return await read_capped(resp, max_bytes)
        except TooLarge:
            raise bad_response("upstream image is larger than the download limit") from None
        except httpx.HTTPError as exc:
            raise transport_error(exc) from None
    raise bad_response("too many redirects downloading the upstream image")


class TooLarge(Exception):
    """A body over its byte cap; each caller turns it into its own error (upstream 502, client 400)."""


async def read_buffer(resp: httpx.Response, max_bytes: int) -> bytearray:
    """The body in one buffer, allocated once at the declared Content-Length (grown only past it,
    as a compressed body is), refused early by that header and then counted, so a lying header
    cannot pass."""
    declared = resp.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else 0
    if size > max_bytes:
        raise TooLarge
    buffer, filled = bytearray(size), 0
    async for chunk in resp.aiter_bytes():
        end = filled + len(chunk)
        if end > max_bytes:
            raise TooLarge
        buffer[filled:end] = chunk  # past the end this grows the buffer
        filled = end
    if filled < len(buffer):
        del buffer[filled:]
    return buffer


async def read_capped(resp: httpx.Response, max_bytes: int) -> bytes:
    """`read_buffer` as immutable bytes (downloads and input URLs: images kept as bytes)."""
    return bytes(await read_buffer(resp, max_bytes))


def base_host(base_url: str) -> str:
    return (urlsplit(base_url).hostname or "").lower()
