"""The delivery worker's process: `python -m gateway.worker_process`, started by `DeliveryWorker`.

It runs the delivery services (`gateway.app.delivery_services`) on the store the parent
commits to, and answers the parent over the link described in `gateway.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from zoneinfo import ZoneInfo

import structlog

from gateway import logs
from gateway.app import delivery_services
from gateway.clock import SystemClock
from gateway.config import Config, from_dict
from gateway.delivery import Dispatcher
from gateway.metrics import Metrics
from gateway.purge import Purger
from gateway.server import install_uvloop, spare_the_start_up_heap
from gateway.store import Held, StoreError, StoreLifecycle, Taken, open_store
from gateway.worker import MAX_STATUS_BYTES, POKE, STATUS

log = structlog.get_logger("gateway.worker")


class DeliveryLost(StoreError):
    """The store's delivery lock went while this worker delivered (PostgreSQL: its
    connection ended, and another worker may deliver already): it stops at once rather
    than deliver beside it. Whoever started it starts it again (the gateway after
    `restart_seconds`, systemd or the container's restart policy for `deliver`)."""


async def run(config: Config, commands: asyncio.StreamReader,
              answers: asyncio.WriteTransport) -> None:
    """Deliver until `commands` ends (or SIGTERM), then stop cleanly.

    Status requests are answered from the start, while this worker still waits for another
    one to let go of the store (`delivering` false): a gateway whose worker waits is
    not ready, and says why at once.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when we
    # stop (it closes our stdin), so that its last commits are still delivered.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The delivery role: its writes give way to the sends' and are not synced on their own
    # (see `gateway.store.open_store`).
    store = open_store(config.store, "delivery")
    metrics = Metrics(per_account_labels=config.metrics.per_account_labels)
    await store.open()
    delivering: Dispatcher | None = None

    async def listen() -> None:
        while chunk := await commands.read(4096):
            if POKE in chunk and delivering is not None:
                delivering.poke()
            for _ in range(chunk.count(STATUS)):
                answers.write(json.dumps(_status(delivering, metrics)).encode() + b"\n")

    listening = asyncio.create_task(listen())
    stopping = asyncio.create_task(stop.wait())
    only = contextlib.AsyncExitStack()
    try:
        holding = asyncio.create_task(hold_delivery(store, only))
        await asyncio.wait({holding, listening, stopping},
                           return_when=asyncio.FIRST_COMPLETED)
        if not holding.done():
            # Told to stop while another worker delivers: nothing of ours to finish.
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding
            return
        held = holding.result()
        losing = asyncio.create_task(held.lost.wait())
        callbacks, dispatcher = delivery_services(config, store, SystemClock(), metrics,
                                                  ZoneInfo(config.send.timezone),
                                                  follow_store=True)
        # The retention purge: this process's writes give way to the sends' (see
        # gateway.purge), and it runs where this worker holds the store's delivery.
        purger = Purger(store, SystemClock(), config.retention, metrics=metrics)
        try:
            await callbacks.start()
            await dispatcher.start()
            await purger.start()
            delivering = dispatcher
            # Pokes read while it started went nowhere: look in the store once more.
            dispatcher.poke()
            log.info("delivery_worker_ready")
            spare_the_start_up_heap()  # full collections paused this process up to 30 ms too
            await asyncio.wait({listening, stopping, losing},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            losing.cancel()
            await purger.stop()
            await dispatcher.stop()
            await callbacks.stop()
        lost(held)
    finally:
        for task in (listening, stopping):
            task.cancel()
        await store.close()
        await only.aclose()
        log.info("delivery_worker_stopped")


def _status(dispatcher: Dispatcher | None, metrics: Metrics) -> dict[str, object]:
    """The answer to a status request (`gateway.worker.WorkerStatus`)."""
    if dispatcher is None:
        return {"delivering": False, "operator_connected": False,
                "operator_detail": "this gateway does not deliver", "waiting_hand_over": 0,
                "waiting_reports": 0, "metrics": metrics.exposition().decode()}
    link = dispatcher.operator.link_status()
    return {"delivering": True, "operator_connected": link.up,
            "operator_detail": link.detail,
            "waiting_hand_over": dispatcher.waiting_hand_over,
            "waiting_reports": dispatcher.waiting_reports,
            "metrics": metrics.exposition().decode()}


def lost(held: Held) -> None:
    """Raise DeliveryLost if the delivery lock went while this worker held it."""
    if held.lost.is_set():
        log.error("delivery_lock_lost", reason=held.reason,
                  detail="this worker stopped delivering; it is started again")
        raise DeliveryLost(f"the store's delivery lock was lost: {held.reason}")


async def hold_delivery(store: StoreLifecycle, holder: contextlib.AsyncExitStack, *,
                        shared: bool = False) -> Held:
    """Wait until no other delivery worker runs on this store, then keep it that way
    until `holder` closes. `shared` (`http2sms deliver` on PostgreSQL): wait only for a
    worker delivering alone; other shared ones deliver side by side.

    A worker whose parent was killed finishes its batch after a new gateway has started.
    Had both run at once, the old one could mark sent a message the new one had already
    passed over, and that message would wait for the next restart. The store's
    `exclusive("delivery")` lock, held until this worker stops (or dies), makes the new
    worker wait instead. So does a second gateway's worker on the same store, for as
    long as the first gateway runs.
    """
    try:
        return await holder.enter_async_context(store.exclusive("delivery", shared=shared))
    except Taken:
        log.warning("delivery_elsewhere", reason=(
            "a gateway delivering alone (server.delivery true) delivers from this store; "
            "this worker waits for it to stop (set server.delivery = false on the gateways "
            "when `http2sms deliver` workers deliver)") if shared else (
            "another gateway's delivery worker (or this gateway's previous one, finishing) "
            "delivers from this store; this one waits to take over and is not ready "
            "meanwhile"))
        held = await holder.enter_async_context(store.exclusive("delivery", wait=True,
                                                                shared=shared))
        log.warning("delivery_taken_over", reason="the delivery worker that held this store "
                    "stopped; this one delivers now")
        return held


async def _main() -> int:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader(limit=MAX_STATUS_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    answers, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)
    line = await commands.readline()
    if not line:
        return 0  # the parent went away before sending the settings
    config = from_dict(json.loads(line))
    logs.configure(config.log.format, config.log.level, final=True)
    try:
        await run(config, commands, answers)
    except DeliveryLost:
        return 1  # logged; the gateway starts a new worker
    return 0


def main() -> int:
    install_uvloop()
    try:
        return asyncio.run(_main())
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
