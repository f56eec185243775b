"""Fetching an image URL given as an edit input, without letting clients reach the gateway's own network.

A URL from a client makes the gateway a proxy: without care, `https://169.254.169.254/…` reads cloud
credentials and `https://127.0.0.1:…` reaches admin ports. So: the host is resolved here and refused if
any address is not public; the request then goes to that checked address (DNS is not asked again, so a
rebind cannot swap it); every redirect is checked the same way; the body has a byte cap and the whole
fetch a deadline. Every refusal is an ApiError 400 naming the field.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from imagegate.providers.http import MAX_REDIRECTS, TooLarge, read_capped

from .config import InputsConfig
from .errors import ApiError, invalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_THIS_NET = ipaddress.ip_network("0.0.0.0/8")  # 0.x.x.x reaches this host on Linux
# Metadata services that are not link-local (AWS's IPv6 one, Alibaba's): refused even with allow_private.
_METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))


@dataclass(frozen=True)
class Policy:
    """What a fetch may do; tests build one directly to allow 127.0.0.1 yet still refuse link-local."""

    max_bytes: int
    timeout_s: float
    allow_http: bool = False
    allow_private: bool = False

    @classmethod
    def of(cls, cfg: InputsConfig) -> Policy:
        return cls(int(cfg.max_mb * 1024 * 1024), cfg.timeout_s, cfg.allow_http, cfg.allow_private)


@dataclass(frozen=True)
class Target:
    """One checked hop: the URL as given, and the checked addresses the request may be sent to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    # ::ffff:127.0.0.1, 64:ff9b::a00:1 (NAT64) and 2002:a00:1:: (6to4) all reach the IPv4 inside them.
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.ipv4_mapped or ip.sixtofour


def refusal(ip: IPAddress, policy: Policy) -> str | None:
    """Why `ip` may not be fetched from, or None. The order matters: loopback ::1 is also 'reserved'."""
    ip = _embedded_v4(ip) or ip
    if any(ip in net for net in _METADATA) or ip.is_link_local:
        return "a link-local or metadata address"  # never: this is where cloud credentials are served
    if ip.is_loopback:
        return None if policy.allow_private else "a loopback address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip in _THIS_NET:
        return "a reserved, multicast or unspecified address"
    if ip.is_private or ip in _CGNAT:
        return None if policy.allow_private else "a private address"
    return None if ip.is_global else "not a public address"


def _not_allowed(param: str, why: str, kind: str) -> ApiError:
    return invalid(f"'{param}': the {kind} URL is not allowed: {why}", param, code=f"{kind}_url_not_allowed")


async def _resolve(host: str, port: int, param: str, kind: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]  # a literal: nothing to resolve
    except ValueError:
        pass
    try:
        # anyio's resolver runs off the event loop and can be cancelled by the fetch deadline.
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise invalid(f"'{param}': the {kind} URL's host '{host}' does not resolve", param,
                      code=f"invalid_{kind}_url") from None
    # Scope ids (`fe80::1%eth0`) are cut off; such addresses are refused as link-local anyway.
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


async def check_url(url: str, param: str, policy: Policy, kind: str = "image") -> Target:
    """Parse and resolve one hop; refuse it unless every address the name has is allowed. `kind`
    names the URL in messages and codes (an image URL to fetch, a webhook URL to call)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise invalid(f"'{param}' is not a valid URL", param, code=f"invalid_{kind}_url") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme != "https" and not (scheme == "http" and policy.allow_http):
        raise _not_allowed(param, "only https URLs are allowed", kind)
    if not host or parts.username is not None or parts.password is not None:
        raise invalid(f"'{param}' is not a valid URL (a host, and no user:password@)", param,
                      code=f"invalid_{kind}_url")
    port = port or (443 if scheme == "https" else 80)
    addresses = await _resolve(host, port, param, kind)
    # ANY bad address refuses the name: picking a good one would let a name list both.
    for ip in addresses:
        why = refusal(ip, policy)
        if why:
            raise _not_allowed(param, f"'{host}' is {why}", kind)
    if not addresses:
        raise invalid(f"'{param}': the {kind} URL's host '{host}' does not resolve", param,
                      code=f"invalid_{kind}_url")
    return Target(url, scheme, host, port, tuple(addresses))


def pinned(target: Target, address: IPAddress) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The request URL with the checked address in place of the name, and what keeps TLS on the name.

    httpx connects to the host of the URL, so putting the address there is the pin. The Host header
    carries the name for the server, and `sni_hostname` makes httpcore send the name as SNI and verify
    the certificate against it (ssl's check_hostname uses server_hostname), not against the address.
    """
    parts = urlsplit(target.url)
    literal = f"[{address}]" if address.version == 6 else str(address)
    url = parts._replace(netloc=f"{literal}:{target.port}").geturl()
    default_port = 443 if target.scheme == "https" else 80
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host:  # an IPv6 literal host keeps its brackets in Host
        host_header = f"[{target.host}]" if target.port == default_port else f"[{target.host}]:{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return url, {"host": host_header, "accept": "image/*"}, extensions


async def _get_any(target: Target, param: str, policy: Policy) -> tuple[bytes | None, str | None]:
    """One hop, tried on each checked address in turn (a name with an unreachable IPv6, say)."""
    for address in target.addresses[:-1]:
        try:
            return await _get(target, address, param, policy)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            continue
    return await _get(target, target.addresses[-1], param, policy)


async def _get(target: Target, address: IPAddress, param: str, policy: Policy) -> tuple[bytes | None, str | None]:
    """One hop: (body, None) on 200, (None, next URL) on a redirect; anything else is a 400."""
    url, headers, extensions = pinned(target, address)
    # A client per hop: a pooled connection to the same address could have been verified for another
    # name. trust_env=False: an environment proxy would resolve the name again, undoing the pin.
    async with (
        httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=policy.timeout_s) as client,
        client.stream("GET", url, headers=headers, extensions=extensions) as resp,
    ):
        if resp.is_redirect and resp.headers.get("location"):
            return None, urljoin(target.url, resp.headers["location"])
        if resp.status_code != 200:
            raise invalid(f"'{param}': fetching the image URL failed (HTTP {resp.status_code})", param,
                          code="image_url_fetch_failed")
        return await read_capped(resp, policy.max_bytes), None


async def fetch_image_url(url: str, param: str, policy: Policy) -> bytes:
    """The body at `url` (the caller checks it is an image), each hop checked before it is requested."""
    try:
        with anyio.fail_after(policy.timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                body, url_next = await _get_any(await check_url(url, param, policy), param, policy)
                if body is not None:
                    return body
                assert url_next is not None
                url = url_next
    except TooLarge:
        mb = policy.max_bytes / (1024 * 1024)
        raise invalid(f"'{param}': the image at the URL is larger than {mb:g} MB", param,
                      code="image_url_too_large") from None
    except (TimeoutError, httpx.TimeoutException):
        raise invalid(f"'{param}': fetching the image URL took longer than {policy.timeout_s:g} s", param,
                      code="image_url_timeout") from None
    except httpx.HTTPError as exc:
        # Connection refused, TLS failure (a certificate not valid for the name), a broken response.
        raise invalid(f"'{param}': fetching the image URL failed ({type(exc).__name__})", param,
                      code="image_url_fetch_failed") from None
    raise invalid(f"'{param}': more than {MAX_REDIRECTS} redirects fetching the image URL", param,
                  code="invalid_image_url")
