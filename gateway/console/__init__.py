"""The web console under `/console/`: the account owner's control panel (see views.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from gateway.console.sessions import ConsoleAuth
from gateway.console.views import PREFIX, Services, build
from gateway.service import Management

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["PREFIX", "setup"]


async def _to_console(request: web.Request) -> web.StreamResponse:
    # Only a browser's visit of the bare address: a query or another method on `/` is no
    # console visit (OVH's send URL has its own path), and keeps the 404 it always had.
    if request.query_string or request.method not in ("GET", "HEAD"):
        raise web.HTTPNotFound()
    raise web.HTTPFound(f"{PREFIX}/")


def setup(app: web.Application, gateway: Gateway) -> None:
    """Mount the console on `app` (the public app, or the admin listener's), `/` leading
    to it; nothing when `console.enabled` is off."""
    config = gateway.config
    if not config.console.enabled:
        return
    services = Services(manage=Management(gateway.store, config, gateway.clock),
                        auth=ConsoleAuth(gateway.store, config, gateway.clock,
                                        gateway.pipeline.guard, gateway.pipeline.verifier),
                        pipeline=gateway.pipeline, config=config, clock=gateway.clock)
    app.add_subapp(PREFIX, build(services))
    app.router.add_route("*", "/", _to_console)
