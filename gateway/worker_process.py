"""The delivery worker's process: `python -m gateway.worker_process`, started by `DeliveryWorker`.

It runs the delivery services (`gateway.delivery_role`) on the store the parent commits
to, and answers the parent over the link described in `gateway.worker`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import structlog

from gateway import logs
from gateway.config import Config, from_dict
from gateway.delivery import Dispatcher
from gateway.delivery_role import DeliveryLost, DeliveryRole
from gateway.metrics import Metrics
from gateway.server import install_uvloop
from gateway.worker import MAX_STATUS_BYTES, POKE, STATUS

log = structlog.get_logger("gateway.worker")


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
    metrics = Metrics(per_account_labels=config.metrics.per_account_labels)
    role = DeliveryRole(config, metrics)
    await role.open()

    async def listen() -> None:
        while chunk := await commands.read(4096):
            if POKE in chunk and role.dispatcher is not None:
                role.dispatcher.poke()
            for _ in range(chunk.count(STATUS)):
                answers.write(json.dumps(_status(role.dispatcher, metrics)).encode() + b"\n")

    def ready(dispatcher: Dispatcher) -> None:
        # Pokes read while it started went nowhere: look in the store once more.
        dispatcher.poke()
        log.info("delivery_worker_ready")

    listening = asyncio.create_task(listen())
    stopping = asyncio.create_task(stop.wait())
    try:
        await role.run({listening, stopping}, on_ready=ready)
    finally:
        for task in (listening, stopping):
            task.cancel()
        await role.close()
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
