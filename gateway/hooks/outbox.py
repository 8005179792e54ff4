"""The outbox worker: runs durable work items (callbacks, alerts) until each succeeds or dies.

Items are written to the store's outbox in the same transaction as the change they report,
so nothing is lost if the gateway stops. The worker claims due items under a lease (a crash
mid-attempt makes the item due again when the lease ends), runs a `Handler` on each with a
global and a per-key concurrency bound (the key is typically the destination host, so one
slow host only ever ties up its own slots) and, when given an `account_share`, a fair share
per account (one customer's many slow endpoints leave slots to the others: see
`ClaimBounds`), and records the results in batches: done, or a retry after an exponential
backoff with jitter, or dead once the retry window is over. The bounds are applied when
items are claimed, so a claimed item starts at once rather than waiting in a slot.

Each attempt's result (ok, retry, dead) goes to the handler's `observe` (its metrics) and to
the log with the handler's `log_fields` (e.g. the message id and host of a callback): a
success at debug level (one per state change of every message: too many for info, and the
store keeps them all, see `http2sms message show`), a retry at info, a give-up at warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from gateway.clock import Clock, sleep_until
from gateway.records import ClaimBounds, OutboxItem, OutboxResult
from gateway.store import OutboxStore, rules

log = structlog.get_logger("gateway.outbox")

Result = Literal["ok", "retry", "dead"]

# How often, at most, a claim reads past busy targets' items (see `_step`).
DEEP_CLAIM_SECONDS = 1.0


class AttemptFailed(Exception):
    """An attempt failed; `detail` is short, safe to store and log (no secrets, no URL)."""

    def __init__(self, detail: str, *, permanent: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        # Retrying cannot help (e.g. a malformed target): give up at once.
        self.permanent = permanent


class Handler(Protocol):
    """What the worker runs on each item of its kinds."""

    @property
    def kinds(self) -> Sequence[str]:
        """The outbox kinds it takes (read only: a tuple class attribute will do)."""

    def key(self, kind: str, target: str) -> str:
        """Items with the same key share a concurrency bound (e.g. the target host).

        Of the kind and target alone: a claim judges due items by them."""

    def log_fields(self, item: OutboxItem) -> dict[str, Any]:
        """What identifies the item in logs (a message id, a host), never a secret or URL."""

    def observe(self, item: OutboxItem, result: Result) -> None:
        """Count one attempt's result in the metrics."""

    async def handle(self, item: OutboxItem) -> str | None:
        """Do the work; return an optional short detail, raise `AttemptFailed` on failure."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_retry: float = 5.0
    max_retry: float = 3600.0
    give_up_after: float = 24 * 3600.0
    # Each delay is stretched by up to this share, so items that failed together (a host
    # going down) do not all come back at the same instant.
    jitter: float = 0.2


def next_attempt_at(policy: RetryPolicy, *, attempts: int, created_at: float, now: float,
                    rng: random.Random) -> float | None:
    """When to try again after `attempts` failed attempts, or None to give up."""
    doublings = min(max(attempts - 1, 0), 60)
    base = min(policy.first_retry * 2.0 ** doublings, policy.max_retry)
    at = now + base * (1.0 + policy.jitter * rng.random())
    deadline = created_at + policy.give_up_after
    if now >= deadline:
        return None
    # The last retry lands on the deadline itself: retried for the whole window, no less.
    return min(at, deadline)


@dataclass
class _Running:
    task: asyncio.Task[None]
    key: str
    target: str


@dataclass
class WorkerStats:
    succeeded: int = 0
    failed: int = 0
    dead: int = 0


class OutboxWorker:
    def __init__(self, store: OutboxStore, clock: Clock, handler: Handler, policy: RetryPolicy,
                 *, max_concurrency: int = 256, per_key: int = 8,
                 account_share: int | None = None, lease: float = 90.0,
                 stop_grace: float = 5.0, poll_seconds: float = 30.0,
                 rng: random.Random | None = None, name: str = "outbox") -> None:
        self._store = store
        self._clock = clock
        self.handler = handler
        self._kinds = tuple(handler.kinds)
        self._policy = policy
        self._max = max(1, max_concurrency)
        self._per_key = max(1, per_key)
        self._account_share = None if account_share is None else max(1, account_share)
        self._lease = lease
        self._stop_grace = stop_grace
        self._poll = poll_seconds
        self._rng = rng or random.Random()
        self._name = name
        self._running: dict[int, _Running] = {}
        self._key_load: Counter[str] = Counter()
        self._account_load: Counter[int] = Counter()
        self._key_slots: dict[str, asyncio.Semaphore] = {}
        self._results: list[OutboxResult] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._next_deep = 0.0
        self.stats = WorkerStats()

    def wake(self) -> None:
        """New items may be due now (called after they are committed)."""
        self._wake.set()

    async def start(self) -> None:
        await self.handler.open()
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Stop claiming, let attempts in progress finish briefly, record what finished."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        tasks = [r.task for r in self._running.values()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._stop_grace)
            # Cut short: their lease makes them due again after a restart.
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._flush()
        await self.handler.close()

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            try:
                deadline = await self._step()
            except Exception as exc:
                log.error("outbox_step_failed", worker=self._name, error=str(exc))
                deadline = self._clock.now() + self._policy.first_retry
            now = self._clock.now()
            if deadline is not None and deadline <= now:
                continue
            # Look again now and then even unwoken: items may come from another process
            # (the command-line tool) or from a transaction whose committer forgot to wake us.
            idle_until = now + self._poll
            await sleep_until(self._clock, idle_until if deadline is None
                              else min(deadline, idle_until), self._wake)

    async def _step(self) -> float | None:
        """Record results, claim what can start; return when to look again (None: on wake)."""
        now = self._clock.now()
        free = self._max - len(self._running)
        busy = self._busy_targets()
        bounds = ClaimBounds(per_key=self._per_key, key_of=self.handler.key,
                             key_load=dict(self._key_load),
                             account_share=self._account_share,
                             account_load=dict(self._account_load))
        full = rules.accounts_at_their_share(bounds, free)
        # Reading past a busy target's (or a full account's) backlog costs a scan of it: at
        # most once a second, so that other items behind it still get their turn.
        deep = bool(busy or full) and now >= self._next_deep
        if deep:
            self._next_deep = now + DEEP_CLAIM_SECONDS
        results, self._results = self._results, []
        try:
            items = await self._store.claim_outbox(
                self._kinds, now=now, lease=self._lease, limit=max(free, 0), bounds=bounds,
                skip_targets=busy, skip_accounts=full, deep=deep, results=results)
        except BaseException:
            # Kept for the next pass; if the gateway stops first, the leases expire and
            # the items are tried again.
            self._results[:0] = results
            raise
        for item in items:
            if item.id not in self._running:
                self._launch(item)
        if free > 0 and len(items) == free and len(self._running) < self._max:
            return self._clock.now()  # more may be due
        if self._running:
            # A finishing attempt wakes us, and new items do (`wake`). Look again within a
            # second anyway for retries coming due behind busy targets: cheaper than
            # asking the store for the next due time after every attempt.
            return self._clock.now() + DEEP_CLAIM_SECONDS
        next_at = await self._store.next_outbox_at(self._kinds)
        if next_at is not None and next_at <= self._clock.now():
            return self._clock.now()  # due but not in this claim's window: look again
        return next_at

    def _busy_targets(self) -> list[str]:
        return sorted({r.target for r in self._running.values()
                       if self._key_load[r.key] >= self._per_key})

    def _launch(self, item: OutboxItem) -> None:
        try:
            key = self.handler.key(item.kind, item.target)
        except Exception:
            key = "?"
        self._key_load[key] += 1
        self._account_load[item.account_id] += 1
        task = asyncio.create_task(self._attempt(item, key), name=f"{self._name}-{item.id}")
        self._running[item.id] = _Running(task, key, item.target)

    async def _attempt(self, item: OutboxItem, key: str) -> None:
        slots = self._key_slots.setdefault(key, asyncio.Semaphore(self._per_key))
        try:
            failure: AttemptFailed | None = None
            async with slots:
                try:
                    detail = await self.handler.handle(item) or "ok"
                except AttemptFailed as exc:
                    failure = exc
                except Exception as exc:  # a handler bug must not stop the worker
                    log.error("outbox_handler_error", worker=self._name, item=item.id,
                              kind=item.kind, **self._fields(item), error=type(exc).__name__)
                    failure = AttemptFailed(f"internal error: {type(exc).__name__}")
            if failure is not None:
                detail = failure.detail
            self._results.append(self._result(item, key, failure, detail))
        finally:
            self._running.pop(item.id, None)
            self._key_load[key] -= 1
            if self._key_load[key] <= 0:
                del self._key_load[key]
                self._key_slots.pop(key, None)
            self._account_load[item.account_id] -= 1
            if self._account_load[item.account_id] <= 0:
                del self._account_load[item.account_id]
            self._wake.set()

    def _fields(self, item: OutboxItem) -> dict[str, Any]:
        try:
            return self.handler.log_fields(item)
        except Exception:  # a malformed item must still be logged, and recorded
            return {}

    def _observe(self, item: OutboxItem, result: Result) -> None:
        try:
            self.handler.observe(item, result)
        except Exception as exc:  # metrics must never cost an attempt its result
            log.error("outbox_observe_failed", worker=self._name, item=item.id,
                      error=type(exc).__name__)

    def _result(self, item: OutboxItem, key: str, failure: AttemptFailed | None,
                detail: str) -> OutboxResult:
        now = self._clock.now()
        if failure is None:
            self.stats.succeeded += 1
            self._observe(item, "ok")
            log.debug("outbox_attempt_ok", worker=self._name, item=item.id, kind=item.kind,
                      **self._fields(item), attempt=item.attempts, detail=detail)
            return OutboxResult(item.id, now, True, detail)
        retry_at = None if failure.permanent else next_attempt_at(
            self._policy, attempts=item.attempts, created_at=item.created_at, now=now,
            rng=self._rng)
        if retry_at is None:
            self.stats.dead += 1
            self._observe(item, "dead")
            log.warning("outbox_item_dead", worker=self._name, item=item.id, kind=item.kind,
                        **self._fields(item), attempt=item.attempts, detail=detail)
        else:
            self.stats.failed += 1
            self._observe(item, "retry")
            log.info("outbox_attempt_failed", worker=self._name, item=item.id,
                     kind=item.kind, **self._fields(item), attempt=item.attempts,
                     detail=detail, retry_in=round(retry_at - now, 1))
        return OutboxResult(item.id, now, False, detail, retry_at)

    async def _flush(self) -> None:
        if not self._results:
            return
        batch, self._results = self._results, []
        try:
            await self._store.record_outbox_results(batch)
        except Exception:
            # Kept for the next pass; if the gateway stops first, the leases expire and
            # the items are tried again.
            self._results[:0] = batch
            raise
