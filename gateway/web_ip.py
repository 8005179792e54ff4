"""The caller's address of a request, the same for every edge: the send URL, the admin API
and `/metrics` (whose wrong tokens count against the admin API's lockouts).

The TCP peer, or, behind `server.trusted_proxies`, the X-Forwarded-For hop they vouch for
(the pure rule is `iprules.client_ip`). The proxies' networks are parsed once, when an app
is built (`trust`), and found from any app mounted under it.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from gateway import iprules

TRUSTED_PROXIES: web.AppKey[tuple[iprules.IPNetwork, ...]] = web.AppKey("trusted_proxies",
                                                                        tuple)


def trust(app: web.Application, proxies: Sequence[str]) -> None:
    """The proxies (`server.trusted_proxies`) whose X-Forwarded-For `app` believes, and
    every app mounted under it."""
    app[TRUSTED_PROXIES] = iprules.parse_networks(proxies)


def caller_ip(request: web.Request) -> iprules.IPAddress | None:
    """The caller's address (None when the peer is unknown, e.g. a closed transport)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    host = peer[0] if isinstance(peer, tuple) and peer else None
    forwarded = ",".join(request.headers.getall("X-Forwarded-For", [])) or None
    proxies: tuple[iprules.IPNetwork, ...] = request.config_dict[TRUSTED_PROXIES]
    return iprules.client_ip(host, forwarded, proxies)
