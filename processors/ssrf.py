"""Where the notify stage may send: the SSRF guard of webhook URLs.

A webhook URL is an operator's input, and the notify worker POSTs from inside the
network, so by default only ``https://`` URLs whose host is (and resolves only to)
public addresses are accepted. Refused, unless the subscription was added with the
flag that allows it:

==========================================  ===================  ===================
target                                      example              flag
==========================================  ===================  ===================
``http://`` (not https)                     ``http://host/``     ``--allow-http``
loopback                                    127.0.0.1, ::1       ``--allow-private``
private (RFC 1918, ULA)                     10/8, fd00::/8       ``--allow-private``
link-local (cloud metadata)                 169.254.169.254      ``--allow-private``
unspecified                                 0.0.0.0, ::          ``--allow-private``
any other non-global (CGNAT, reserved...)   100.64.0.1           ``--allow-private``
==========================================  ===================  ===================

:func:`check_url` runs at ``webhook add`` (a name is resolved and every address it
resolves to is checked). :class:`Resolver` runs before every request: it resolves the
host again, checks every address (DNS rebinding: a name that was public at ``add``
may point inside later) and returns the address to connect to, so the request goes
to the address that was checked (the TLS name and ``Host`` stay the URL's).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVE_TTL_S = 30.0


class Refused(ValueError):
    """A URL the guard does not allow; the message says why and which flag allows it."""


def category(ip: IP) -> str | None:
    """Why this address is refused (None: a public address)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private:
        return "private"
    if not ip.is_global or ip.is_multicast:
        return "non-global"
    return None


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_addresses(host: str, addresses: list[IP], allow_private: bool) -> None:
    if allow_private:
        return
    for ip in addresses:
        if (why := category(ip)) is not None:
            shown = host if str(ip) == host else f"{host} ({ip})"
            raise Refused(f"url: {shown} is a {why} address; pass --allow-private to allow it")


def check_scheme(url: str, allow_http: bool) -> None:
    scheme = urlsplit(url).scheme
    if scheme != "https" and not (scheme == "http" and allow_http):
        raise Refused(f"url: {scheme}:// is not https://; pass --allow-http to allow it")


def resolve_now(host: str, port: int) -> list[IP]:
    if (ip := _literal(host)) is not None:
        return [ip]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"url: {host} does not resolve ({exc.strerror})") from None
    return [ipaddress.ip_address(i[4][0]) for i in infos]


def check_url(url: str, *, allow_private: bool = False, allow_http: bool = False) -> None:
    """Refuse ``url`` unless its scheme and every address of its host are allowed."""
    check_scheme(url, allow_http)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not allow_private:
        check_addresses(host, resolve_now(host, parts.port or 443), allow_private)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: the checked address, and the URL's own host name."""

    ip: str
    host: str


class Resolver:
    """Send-time resolution and check, cached for ``ttl_s`` per host."""

    def __init__(self, ttl_s: float = RESOLVE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[tuple[str, int], tuple[float, list[IP]]] = {}

    async def target(self, url: str, *, allow_private: bool, allow_http: bool) -> Target:
        check_scheme(url, allow_http)
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (ip := _literal(host)) is not None:
            addresses = [ip]
        else:
            key = (host, port)
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                addresses = hit[1]
            else:
                loop = asyncio.get_running_loop()
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except socket.gaierror as exc:
                    raise OSError(f"{host} does not resolve ({exc.strerror})") from None
                addresses = [ipaddress.ip_address(i[4][0]) for i in infos]
                self._cache[key] = (time.monotonic() + self.ttl_s, addresses)
        check_addresses(host, addresses, allow_private)
        return Target(str(addresses[0]), host)
