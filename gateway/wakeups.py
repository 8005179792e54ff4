"""Wake-ups from other nodes: their commits wake this process's workers at once.

A send committed on one gateway is delivered by whichever gateway (or `http2sms deliver`)
holds the store's delivery; a callback or an alert queued on one node may be sent by the
outbox worker of another. Within one process, and between a gateway and its own delivery
worker, the after-commit hooks do that. Between nodes, the store does (`wake_ups`:
LISTEN/NOTIFY on PostgreSQL, nothing on SQLite, whose processes share one machine), and
each worker's polling stays the fallback: a wake-up lost with its connection costs a poll
interval, never a message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

from gateway.store import StoreLifecycle, Topic


class WakeUps:
    """A `Service`: while it runs, another node's commits of a topic call its callbacks."""

    def __init__(self, store: StoreLifecycle,
                 callbacks: Mapping[Topic, Sequence[Callable[[], None]]]) -> None:
        self._store = store
        self._callbacks = {topic: tuple(called) for topic, called in callbacks.items()
                           if called}
        self._held = contextlib.AsyncExitStack()

    def _calling(self, topic: Topic) -> Callable[[], None]:
        called = self._callbacks[topic]

        def call() -> None:
            for callback in called:
                callback()

        return call

    async def start(self) -> None:
        if self._callbacks:
            await self._held.enter_async_context(self._store.wake_ups(
                {topic: self._calling(topic) for topic in self._callbacks}))

    async def stop(self) -> None:
        await self._held.aclose()
