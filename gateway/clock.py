"""Time as the rest of the gateway sees it, so tests can move it instead of sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that only moves when a test calls `advance`; sleepers wake when it passes them."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)


async def sleep_until(clock: Clock, deadline: float | None, wake: asyncio.Event) -> bool:
    """Wait until `deadline` on `clock` (None: no deadline) or until `wake` is set; True
    when `wake` was set.

    Background loops sleep here so that new work (a nearer deferred time, a new callback)
    can cut their sleep short. `wake` is cleared on return: callers re-examine all their
    state after each return, so a set that raced with the timer is never lost.
    """
    if wake.is_set():
        wake.clear()
        return True
    if deadline is not None and deadline - clock.now() <= 0:
        return False
    pending: set[asyncio.Future[Any]] = {asyncio.ensure_future(wake.wait())}
    if deadline is not None:
        pending.add(asyncio.ensure_future(_sleep_to(clock, deadline)))
    try:
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in pending:
            future.cancel()
    woken = wake.is_set()
    wake.clear()
    return woken


async def _sleep_to(clock: Clock, deadline: float) -> None:
    # The delay is taken when the task first runs, not when it is made: a test clock moved
    # in between would otherwise count the delay from its new time, and oversleep.
    await clock.sleep(deadline - clock.now())
