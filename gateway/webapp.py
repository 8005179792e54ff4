"""The public web app: the edges (send URL, health, admin API, console) on one aiohttp app.

Each edge receives what it needs of the gateway here, when it is mounted; none of them
imports the assembly to find it. The app starts the gateway and stops it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import admin, console, health, web_ip
from gateway.app import Gateway
from gateway.inflight import INFLIGHT, InflightLimit
from gateway.send import handler as send_handler


def create_app(gateway: Gateway) -> web.Application:
    """The public web app: the send URL (and, unless split off, the admin API)."""
    config = gateway.config
    limiter = InflightLimit(config.server.max_inflight, gateway.metrics,
                            unlimited=health.PATHS)
    app = web.Application(client_max_size=config.server.max_request_bytes,
                          middlewares=[limiter.middleware])
    app[INFLIGHT] = limiter
    app[send_handler.PIPELINE] = gateway.pipeline
    web_ip.trust(app, config.server.trusted_proxies)  # the send URL's, /1.0's, /metrics'
    send_handler.setup(app)
    health.setup(app, gateway)
    admin.setup(app, gateway)  # /1.0: the admin API, or only its public routes
    if not config.admin.host:
        console.setup(app, gateway)  # else on the admin listener (create_admin_listener_app)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def create_admin_listener_app(gateway: Gateway) -> web.Application:
    """The separate admin listener's app (`admin.host` set): the admin API, /metrics and
    the web console, none of which the public listener then serves."""
    app = admin.create_admin_app(gateway)
    console.setup(app, gateway)
    return app
