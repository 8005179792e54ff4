"""The pieces of `serve --processes N` that need no process: each child's settings, and the
group's poke pipe between the send processes and the one that delivers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import Config
from gateway.process_group import DELIVERS, POKE, SENDS, child_config, link_pokes
from gateway.records import SendOutcome


def test_the_first_process_delivers_as_configured_the_others_take_sends_only() -> None:
    config = Config().replace({"server.delivery_worker": False})
    assert child_config(config, 0) is config
    other = child_config(config, 1)
    assert other.server.delivery is False and other.server.delivery_worker is False
    assert other.replace({"server.delivery": True}) == config


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def outcome(*ids: int) -> SendOutcome:
    return SendOutcome(accepted=bool(ids), ids=ids)


async def test_a_send_process_pokes_after_a_commit_that_accepted_messages(
        pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    gateway: Any = SimpleNamespace(after_commit=[])
    link_pokes(gateway, write_end, SENDS)
    (tell,) = gateway.after_commit
    tell([outcome()])
    os.set_blocking(read_end, False)
    with pytest.raises(BlockingIOError):
        os.read(read_end, 10)  # a refused send wakes no one
    tell([outcome(), outcome(7, 8)])
    assert os.read(read_end, 10) == POKE
    for _ in range(100_000):  # a full pipe never blocks nor fails a send
        tell([outcome(9)])


async def test_the_delivering_process_pokes_its_worker_when_told(
        pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    poked = asyncio.Event()
    gateway: Any = SimpleNamespace(worker=SimpleNamespace(poke=poked.set), dispatcher=None)
    link_pokes(gateway, read_end, DELIVERS)
    try:
        os.write(write_end, POKE * 3)
        await asyncio.wait_for(poked.wait(), 5)
    finally:
        asyncio.get_running_loop().remove_reader(read_end)
