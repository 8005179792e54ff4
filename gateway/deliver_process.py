"""`http2sms deliver`: a delivery worker on its own, with no HTTP listener.

For deployments that scale sends and delivery apart (systemd units, containers): gateways
with `server.delivery = false` take the sends, and these processes hand the stored
messages to the operator, store its reports and call the callbacks. Nobody pokes them
after a commit: their dispatcher looks at the store every `poll_seconds`.

On PostgreSQL several run at once: each holds the store's `delivery` name shared, and they
share the work through claims with leases (`FOR UPDATE SKIP LOCKED`), so no message is
submitted twice and no callback sent twice; one that dies leaves its claims to the others
when their leases end. The shared hold keeps out a gateway delivering alone, which frees
every claim at its start (and waits while one does).

On SQLite one process delivers at a time, as with `serve`'s worker: this one holds the
store's `delivery` lock, or waits for it and says so.

It runs what every process that delivers runs (gateway.delivery_role), the retention purge
(gateway.purge) included.

SIGTERM or SIGINT: finish the batch in hand, store the reports received, stop; a second
signal stops at once.
"""

from __future__ import annotations

import asyncio
import os
import signal

import structlog

from gateway.config import Config
from gateway.delivery import Dispatcher
from gateway.delivery_role import DeliveryRole
from gateway.metrics import Metrics
from gateway.server import store_location
from gateway.store import parse_url

log = structlog.get_logger("gateway.deliver")

# The backends on which delivery workers share a store; elsewhere one delivers at a time.
SHARED_BACKENDS = frozenset({"postgresql", "postgres"})


def shares_delivery(location: str) -> bool:
    """Whether several delivery workers may deliver side by side from this store."""
    return parse_url(location)[0] in SHARED_BACKENDS


async def run(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Deliver until SIGTERM or SIGINT, then stop cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def signalled() -> None:
        if not stop.is_set():
            stop.set()
            return
        # A second signal: stop now. Safe: what it held is claimed with leases, and what
        # the operator answered and was not stored is redone (delivery is at least once).
        log.warning("deliver_cut", reason="second signal")
        os._exit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled)
    location = config.store.location
    shared = shares_delivery(location)
    if shared:
        log.info("deliver_starting", store=store_location(location), mode="shared",
                 detail="delivers side by side with the other `deliver` workers on this "
                        "database, through claims with leases")
    else:
        log.info("deliver_starting", store=store_location(location), mode="alone",
                 detail="on SQLite one process delivers at a time: this one takes the "
                        "store's delivery lock, or waits while another process holds it")
    metrics = Metrics(per_account_labels=config.metrics.per_account_labels)
    role = DeliveryRole(config, metrics, shared=shared)
    await role.open()

    def delivering(dispatcher: Dispatcher) -> None:
        log.info("deliver_ready", mode="shared" if shared else "alone")
        if ready is not None:
            ready.set()

    stopping = asyncio.create_task(stop.wait())
    try:
        await role.run({stopping}, on_ready=delivering,
                       on_stop=lambda: log.info("deliver_stopping"))
    finally:
        stopping.cancel()
        await role.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        log.info("deliver_stopped")
