"""Who the client is, and whether it came over HTTPS, behind a reverse proxy.

Only a peer within `PASSERELLE_FORWARDED_ALLOW_IPS` (the TLS-terminating proxy, deploy/nginx.conf)
may say so: from it, Werkzeug's `ProxyFix` applies the last `X-Forwarded-For`, `-Proto` and `-Host`
value (the one that proxy set) to the request; from any other peer those headers are removed
before the app sees them. gunicorn interprets none of them (deploy/gunicorn.conf.py), so this is
the one place they are trusted. Whether a request arrived with any of them at all (`relayed`) is
noted before they are applied or removed.
"""
from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger(__name__)

#: Every forwarding header a client could send; the ones ProxyFix is not told to apply are
#: removed from every request, so that no later code can read a value nobody vouched for.
_APPLIED = ("HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST")
_NEVER_TRUSTED = ("HTTP_X_FORWARDED_PORT", "HTTP_X_FORWARDED_PREFIX", "HTTP_FORWARDED", "HTTP_X_REAL_IP")
#: The environ key where `TrustedProxies` notes whether the request arrived with a forwarding header.
_RELAYED = "passerelle.relayed"
#: Rate limits count an IPv6 client by this prefix: a site or a host is given a /64 at least, and
#: may use any address in it.
_IPV6_CLIENT_PREFIX = 64


def parse_proxies(raw: str) -> tuple[Network, ...]:
    """`PASSERELLE_FORWARDED_ALLOW_IPS`: addresses or networks separated by commas; `*` is any peer."""
    networks: list[Network] = []
    for item in (part.strip() for part in raw.split(",")):
        if item == "*":
            networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        elif item:
            try:
                networks.append(ipaddress.ip_network(item))
            except ValueError as exc:
                raise ValueError(f"PASSERELLE_FORWARDED_ALLOW_IPS lists IP addresses or networks (10.0.0.2, "
                                 f"10.0.0.0/24) separated by commas, or *; got {item!r}") from exc
    return tuple(networks)


def _address(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`peer` as an IP address (an IPv4 one seen on a dual-stack socket as ::ffff:a.b.c.d as
    a.b.c.d); None if it is none (a Unix socket, `unknown`)."""
    try:
        address = ipaddress.ip_address(peer or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(peer: str | None, proxies: Iterable[Network]) -> bool:
    """Whether the connection's peer address is one of the trusted proxies."""
    address = _address(peer)
    return address is not None and any(address in network for network in proxies)


class TrustedProxies:
    """WSGI middleware: `ProxyFix(x_for=1, x_proto=1, x_host=1)` for a request from a trusted proxy,
    the forwarding headers removed from any other; either way the request is marked `relayed` if it
    carried one. Reads the app's `FORWARDED_ALLOW_IPS` on each request. Warns once per app (a
    gunicorn worker builds one) when a peer on loopback that is not trusted sends forwarding headers
    (a proxy on this host left out of `PASSERELLE_FORWARDED_ALLOW_IPS`: all its clients count as one)."""

    def __init__(self, app: Flask) -> None:
        self._config = app.config
        self._direct = app.wsgi_app
        self._proxied = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)
        self._warned = False

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Any:
        environ[_RELAYED] = any(name in environ for name in _APPLIED + _NEVER_TRUSTED)
        for name in _NEVER_TRUSTED:
            environ.pop(name, None)
        peer = environ.get("REMOTE_ADDR")
        if is_trusted(peer, self._config["FORWARDED_ALLOW_IPS"]):
            return self._proxied(environ, start_response)
        if environ[_RELAYED] and not self._warned and (address := _address(peer)) is not None \
                and address.is_loopback:
            self._warned = True
            log.warning("a proxy on this host relays requests but is not in PASSERELLE_FORWARDED_ALLOW_IPS: "
                        "its forwarding headers are ignored (said once)")
        for name in _APPLIED:
            environ.pop(name, None)
        return self._direct(environ, start_response)


def relayed(environ: Mapping[str, Any]) -> bool:
    """Whether the request arrived with a forwarding header, from a trusted proxy or not: its peer
    relayed it for a client elsewhere. A request `TrustedProxies` did not see counts as relayed."""
    return bool(environ.get(_RELAYED, True))


def client_address() -> str:
    """Who rate limits count the current request against: the client's address (the peer's, or the
    one the trusted proxy names), an IPv4 one seen as ::ffff:a.b.c.d as a.b.c.d, and an IPv6 one by
    its /64 (`2001:db8:5:7::/64`), since one client may use every address of its prefix."""
    address = _address(request.remote_addr)
    if address is None:
        return request.remote_addr or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/{_IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


def init_app(app: Flask) -> None:
    app.wsgi_app = TrustedProxies(app)  # type: ignore[method-assign]
