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
from gateway.metrics import Metrics
from gateway.server import install_uvloop, spare_the_start_up_heap
from gateway.store import StoreLifecycle, Taken, open_store
from gateway.worker import MAX_STATUS_BYTES, POKE, STATUS

log = structlog.get_logger("gateway.worker")


async def run(config: Config, commands: asyncio.StreamReader,
              answers: asyncio.WriteTransport) -> None:
    """Deliver until `commands` ends (or SIGTERM), then stop cleanly."""
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
    only = contextlib.AsyncExitStack()
    try:
        await _only_worker(store, only)
    except BaseException:
        await store.close()
        raise
    callbacks, dispatcher = delivery_services(config, store, SystemClock(), metrics,
                                              ZoneInfo(config.send.timezone),
                                              follow_store=True)
    try:
        await callbacks.start()
        await dispatcher.start()
        log.info("delivery_worker_ready")
        spare_the_start_up_heap()  # full collections paused this process up to 30 ms too

        async def listen() -> None:
            while chunk := await commands.read(4096):
                if POKE in chunk:
                    dispatcher.poke()
                for _ in range(chunk.count(STATUS)):
                    link = dispatcher.operator.link_status()
                    answers.write(json.dumps({
                        "operator_connected": link.up,
                        "operator_detail": link.detail,
                        "waiting_hand_over": dispatcher.waiting_hand_over,
                        "waiting_reports": dispatcher.waiting_reports,
                        "metrics": metrics.exposition().decode(),
                    }).encode() + b"\n")

        listening = asyncio.create_task(listen())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({listening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (listening, stopping):
            task.cancel()
    finally:
        await dispatcher.stop()
        await callbacks.stop()
        await store.close()
        await only.aclose()
        log.info("delivery_worker_stopped")


async def _only_worker(store: StoreLifecycle, holder: contextlib.AsyncExitStack) -> None:
    """Wait until no other delivery worker runs on this store, then keep it that way
    until `holder` closes.

    A worker whose parent was killed finishes its batch after a new gateway has started.
    Had both run at once, the old one could mark sent a message the new one had already
    passed over, and that message would wait for the next restart. The store's
    `exclusive("delivery")` lock, held until this worker stops (or dies), makes the new
    worker wait instead.
    """
    try:
        await holder.enter_async_context(store.exclusive("delivery"))
    except Taken:
        log.info("delivery_worker_waiting", reason="another worker is stopping")
        await holder.enter_async_context(store.exclusive("delivery", wait=True))


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
    await run(config, commands, answers)
    return 0


def main() -> int:
    install_uvloop()
    try:
        return asyncio.run(_main())
    except KeyboardInterrupt:
        return 1


if __name__ == "__main__":
    sys.exit(main())
