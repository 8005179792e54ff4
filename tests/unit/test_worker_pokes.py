"""The send process's pokes to its delivery worker: one per commit when commits are rare,
one per `POKE_GAP` under load (a write to the worker's pipe each cost the send process 2.9%
of its CPU under scripts/bench)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from gateway.config import Config
from gateway.worker import POKE, POKE_GAP, DeliveryWorker


class Pipe:
    """The worker's stdin as `poke` sees it: what was written, and when."""

    def __init__(self) -> None:
        self.written: list[tuple[float, bytes]] = []
        self.wrote = asyncio.Event()
        self.transport = SimpleNamespace(get_write_buffer_size=lambda: 0)

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append((asyncio.get_running_loop().time(), data))
        self.wrote.set()


def worker_with(pipe: Pipe) -> DeliveryWorker:
    worker = DeliveryWorker(Config())
    process: Any = SimpleNamespace(stdin=pipe)
    worker._process = process
    return worker


async def test_a_lone_commit_pokes_at_once() -> None:
    pipe = Pipe()
    worker_with(pipe).poke()
    assert [data for _, data in pipe.written] == [POKE]


async def test_commits_within_the_gap_make_one_more_poke_at_its_end() -> None:
    pipe = Pipe()
    worker = worker_with(pipe)
    worker.poke()
    first = pipe.written[0][0]
    pipe.wrote.clear()
    for _ in range(50):
        worker.poke()
    assert len(pipe.written) == 1  # the others wait for the gap's end
    await asyncio.wait_for(pipe.wrote.wait(), 5)
    assert [data for _, data in pipe.written] == [POKE, POKE]
    assert pipe.written[1][0] - first >= POKE_GAP * 0.99
    # Nothing else is left scheduled: the 50 commits are told by that one poke.
    assert worker._poke_later is None
