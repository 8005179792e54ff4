"""The delivery worker: the operator, its reports and the callbacks in a child process.

In-process: the metrics merge and the dispatcher following a store another connection
writes. Real processes (`python -m gateway serve` and its `python -m gateway.worker_process` child,
real HTTP, a real callback receiver): delivery, readiness and metrics through the parent, the
child killed and started again, the parent killed, the worker switched off. Last, the
store's own retry of the write lock held by another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import Clock, ManualClock, SystemClock
from gateway.config import Config
from gateway.delivery import Dispatcher
from gateway.metrics import Metrics, merge_expositions
from gateway.operators import create as create_operator
from gateway.records import SendOrder, SendOutcome, User
from gateway.service import Management
from gateway.store import Store, open_store
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SENDER, eventually
from tests.process.test_reliability import Receiver
from tests.serverproc import ServerProcess, demo_params, prepare_store, servers, wait_for
from tests.store.test_sqlite import write_locked

ADMIN_TOKEN = "worker-admin-token-0123456789"
# Every message delivered (ptt 4): no failure or retry drawn by the simulated network.
DELIVER_ALL = {"HTTP2SMS_OPERATOR_FAILURE_RATIO": "0", "HTTP2SMS_OPERATOR_RETRY_RATIO": "0"}
# Info level: the worker's start, ready and exit events are logged there.
INFO = {"HTTP2SMS_LOG_LEVEL": "info"}
DELIVERED = 4


# -- 1. merging the expositions of two processes ------------------------------------------

def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed back by prometheus_client."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"sample twice: {key}"
            found[key] = sample.value
    return found


def header_names(text: bytes, kind: str) -> Counter[str]:
    """How many `# HELP` or `# TYPE` lines each name has."""
    return Counter(line.split()[2] for line in text.decode().splitlines()
                   if line.startswith(f"# {kind} "))


# A label value a caller could choose: the format escapes quotes, backslashes and newlines.
ODD = 'acc"quoted\\back\nline'


def test_merge_adds_samples_keeps_each_family_once_and_the_earliest_created() -> None:
    gateway, worker = Metrics(), Metrics()
    gateway.sent(100, ODD, messages=2, credits=2.0)
    gateway.sent(201, None, messages=0, credits=0.0)          # in one process only
    worker.sent(100, ODD, messages=3, credits=3.0)
    gateway.commit_seconds.observe(0.003)
    worker.commit_seconds.observe(0.3)
    worker.callback_attempts.labels("ok").inc(4)               # in the other one only
    gateway.inflight.inc(2)                                    # a gauge set in one process
    odd = (("account", ODD), ("outcome", "100"))
    created = ("http2sms_send_requests_created", odd)
    mine = gateway.exposition()
    # The worker's series began earlier than the gateway's: its `_created` must win,
    # whichever text comes first.
    early = samples(mine)[created] - 100.0
    theirs_text = worker.exposition().decode()
    pattern = re.compile(r"^(http2sms_send_requests_created\{[^\n]*outcome=\"100\"\}) \S+$",
                         re.MULTILINE)
    theirs_text, replaced = pattern.subn(lambda m: f"{m.group(1)} {early!r}", theirs_text)
    assert replaced == 1, theirs_text
    theirs = theirs_text.encode()

    for merged in (merge_expositions(mine, theirs), merge_expositions(theirs, mine)):
        got = samples(merged)  # parses back
        assert got[("http2sms_send_requests_total", odd)] == 2  # one per request
        assert got[("http2sms_send_requests_total", (("account", ""), ("outcome", "201")))] == 1
        assert got[("http2sms_messages_accepted_total", (("account", ODD),))] == 5
        assert got[("http2sms_credits_spent_total", (("account", ODD),))] == 5.0
        assert got[("http2sms_callback_attempts_total", (("result", "ok"),))] == 4
        assert got[("http2sms_inflight_requests", ())] == 2
        assert got[("http2sms_lockouts_total", ())] == 0
        assert got[("http2sms_store_commit_seconds_count", ())] == 2
        assert got[("http2sms_store_commit_seconds_sum", ())] == pytest.approx(0.303)
        assert got[("http2sms_store_commit_seconds_bucket", (("le", "0.0025"),))] == 0
        assert got[("http2sms_store_commit_seconds_bucket", (("le", "0.005"),))] == 1
        assert got[("http2sms_store_commit_seconds_bucket", (("le", "0.25"),))] == 1
        assert got[("http2sms_store_commit_seconds_bucket", (("le", "0.5"),))] == 2
        assert got[("http2sms_store_commit_seconds_bucket", (("le", "+Inf"),))] == 2
        assert got[created] == early
        # Every series of either process, and no other.
        assert set(got) == set(samples(mine)) | set(samples(theirs))
        # One HELP and one TYPE line per family, as many families as the two processes
        # have between them.
        helps, types = header_names(merged, "HELP"), header_names(merged, "TYPE")
        assert set(helps.values()) == {1} and set(types.values()) == {1}
        assert len(types) == len(helps) == len(
            set(header_names(mine, "TYPE")) | set(header_names(theirs, "TYPE")))
        # The label value is escaped in the text itself, not only read back right.
        assert '\\"quoted\\\\back\\nline' in merged.decode()


def test_merge_keeps_the_type_lines_of_its_inputs() -> None:
    text = Metrics().exposition()
    merged = merge_expositions(text)

    def headers(exposition: bytes, kind: str) -> Counter[str]:
        return Counter(line for line in exposition.decode().splitlines()
                       if line.startswith(f"# {kind} "))

    assert "# TYPE http2sms_send_requests_total counter" in headers(text, "TYPE")
    # Counters keep their `_total` in HELP and TYPE lines: the parser drops it, the merge
    # must put it back, or a scraper sees families without their samples.
    assert headers(merged, "TYPE") == headers(text, "TYPE")
    assert header_names(merged, "HELP") == header_names(text, "HELP")


# -- 2. a dispatcher following a store another connection writes ---------------------------

T0 = 1_700_000_000.0
# The simulator keeps this number at ptt 25 (a temporary failure, not final) until it
# expires: a second hand-over to the operator would show as a second (25, 8) event.
STUCK_AT_25 = "+33612399025"
STUCK = 25


@dataclass
class Following:
    """A dispatcher on its own store, and another store committing sends on the same file."""

    dispatcher: Dispatcher
    sending: Store
    user: User
    clock: Clock

    async def commit(self, *recipients: str, deferred_until: float | None = None) -> list[int]:
        order = SendOrder(self.user.account_id, self.user.id, LOGIN, SENDER, "followed", 1, 1,
                          1, True, "", recipients, (100,) * len(recipients),
                          deferred_until=deferred_until)
        outcomes: list[SendOutcome] = await self.sending.commit_sends([order],
                                                                      at=self.clock.now())
        assert [o.accepted for o in outcomes] == [True], outcomes
        # As the gateway's after-commit hook does. A dispatcher following the store
        # ignores it (it needs a poke); a one-process one looks in the store.
        self.dispatcher.on_commit(outcomes)
        return list(outcomes[0].ids)

    async def final(self, ids: list[int], timeout: float = 5.0) -> None:
        async def done() -> bool:
            return all([(await self.sending.get_message(i)).state == "final" for i in ids])

        await eventually(done, timeout)

    async def reaches(self, message_id: int, ptt: int) -> None:
        async def there() -> bool:
            return (await self.sending.get_message(message_id)).ptt == ptt

        await eventually(there)

    async def history(self, message_id: int) -> list[tuple[int | None, int]]:
        return [(e.ptt, e.dlr) for e in await self.sending.message_events(message_id)]

    async def once_more(self, receiver: str) -> None:
        """One more pass of the hand-over loop: a new message, poked, until it is final.

        Reports are stored in order, so any duplicate report of an earlier message is in
        the store by then.
        """
        later = await self.commit(receiver)
        self.dispatcher.poke()
        await self.final(later)


@contextlib.asynccontextmanager
async def following(config: Config, *, poll_seconds: float, clock: Clock | None = None,
                    max_batch: int = 1000, follow_store: bool = True,
                    start: bool = True) -> AsyncIterator[Following]:
    """`start` False: the test starts the dispatcher itself (after committing)."""
    clock = clock or SystemClock()
    sending = open_store(config.store.path, "send")
    await sending.open()
    store = open_store(config.store.path, "delivery")
    dispatcher: Dispatcher | None = None
    try:
        manage = Management(sending, config, clock)
        await manage.create_account(ACCOUNT, 1000)
        await manage.add_sender(ACCOUNT, SENDER)
        await manage.create_user(ACCOUNT, LOGIN, PASSWORD)
        user = await sending.get_user(ACCOUNT, LOGIN)
        await store.open()
        dispatcher = Dispatcher(store, clock, create_operator(config.operator, clock),
                                max_batch=max_batch, follow_store=follow_store,
                                poll_seconds=poll_seconds)
        if start:
            await dispatcher.start()
            # Its first read of the (empty) store is done: from here on only a poke or a
            # poll makes it look again, so a test knows what explains each delivery.
            await eventually(dispatcher._recovered.is_set)
            assert dispatcher.submitted == 0
        yield Following(dispatcher, sending, user, clock)
    finally:
        if dispatcher is not None:
            await dispatcher.stop()
        await store.close()
        await sending.close()


async def test_a_poke_delivers_what_another_store_committed(config: Config) -> None:
    # A minute between polls: within this test only the poke can explain a delivery.
    async with following(config, poll_seconds=60) as f:
        first = await f.commit("+33612345001", "+33612345002")
        f.dispatcher.poke()
        await f.final(first)
        second = await f.commit("+33612345003")
        f.dispatcher.poke()
        await f.final(second)
        for message_id in first + second:
            assert await f.history(message_id) == [(None, 0), (3, 4), (DELIVERED, 1)]
        assert f.dispatcher.submitted == 3


async def test_without_a_poke_new_messages_are_found_at_the_next_poll(config: Config) -> None:
    async with following(config, poll_seconds=0.2) as f:
        ids = await f.commit("+33612345001", "+33612345002")
        await f.final(ids)
        more = await f.commit("+33612345003")
        await f.final(more)
        assert await f.history(more[0]) == [(None, 0), (3, 4), (DELIVERED, 1)]
        assert f.dispatcher.submitted == 3


@pytest.mark.parametrize(("poked", "poll_seconds"), [(True, 60.0), (False, 0.2)],
                         ids=["poked", "polled"])
async def test_a_deferred_message_committed_elsewhere_goes_when_due(
        config: Config, poked: bool, poll_seconds: float) -> None:
    async with following(config, poll_seconds=poll_seconds) as f:
        due = f.clock.now() + 0.5
        (message_id,) = await f.commit("+33612345001", deferred_until=due)
        if poked:
            f.dispatcher.poke()
        assert (await f.sending.get_message(message_id)).state == "deferred"
        await f.final([message_id])
        message = await f.sending.get_message(message_id)
        assert message.sent_at is not None and message.sent_at >= due
        assert await f.history(message_id) == [(None, 0), (3, 4), (DELIVERED, 1)]
        assert f.dispatcher.submitted == 1


async def test_a_deferred_message_is_handed_to_the_operator_once(config: Config) -> None:
    async with following(config, poll_seconds=60) as f:
        (stuck,) = await f.commit(STUCK_AT_25, deferred_until=f.clock.now() + 0.2)
        f.dispatcher.poke()
        await f.reaches(stuck, STUCK)
        # The hand-over loop reads the store again: it must not take the deferred message,
        # now sent, for one to resume.
        await f.once_more("+33612345001")
        assert await f.history(stuck) == [(None, 0), (3, 4), (STUCK, 8)]
        assert f.dispatcher.submitted == 2


async def test_a_deferred_message_due_during_a_backlog_is_handed_over_once(
        config: Config) -> None:
    clock = ManualClock(T0)
    async with following(config, poll_seconds=60, clock=clock, max_batch=1) as f:
        queued = await f.commit("+33612345001", "+33612345002", "+33612345003")
        (stuck,) = await f.commit(STUCK_AT_25, deferred_until=T0 + 10)
        with write_locked(config.store.path):
            f.dispatcher.poke()
            # Nothing goes to the operator before it is claimed, and a claim is a write.
            await not_submitted(f.dispatcher)
            clock.advance(10)
            await not_submitted(f.dispatcher)
        # One message at a time, the deferred one (due) with the backlog.
        await f.final(queued)
        await f.reaches(stuck, STUCK)
        await f.once_more("+33612345004")
        assert await f.history(stuck) == [(None, 0), (3, 4), (STUCK, 8)]
        assert f.dispatcher.submitted == 5


@pytest.mark.parametrize("follow_store", [True, False], ids=["worker", "one-process"])
async def test_a_deferred_message_due_during_recovery_is_handed_over_once(
        config: Config, follow_store: bool) -> None:
    clock = ManualClock(T0)
    async with following(config, poll_seconds=60, clock=clock, max_batch=1,
                         follow_store=follow_store, start=False) as f:
        # What a previous run left: three queued, one deferred due during the recovery.
        queued = await f.commit("+33612345001", "+33612345002", "+33612345003")
        (stuck,) = await f.commit(STUCK_AT_25, deferred_until=T0 + 10)
        with write_locked(config.store.path):
            await f.dispatcher.start()
            # The recovery only reads; the hand-over waits for the lock to claim.
            await eventually(f.dispatcher._recovered.is_set)
            await not_submitted(f.dispatcher)
            clock.advance(10)
            await not_submitted(f.dispatcher)
        await f.final(queued)
        await f.reaches(stuck, STUCK)
        # The recovery is over, and a message committed after it goes out behind whatever
        # the recovery handed over: its final state comes after any duplicate report.
        await eventually(f.dispatcher._recovered.is_set)
        await f.once_more("+33612345004")
        assert await f.history(stuck) == [(None, 0), (3, 4), (STUCK, 8)]
        assert f.dispatcher.submitted == 5


async def not_submitted(dispatcher: Dispatcher) -> None:
    """A bounded chance for the dispatcher to hand something over: it must not."""
    with contextlib.suppress(AssertionError):
        await eventually(lambda: dispatcher.submitted > 0, timeout=0.3)
    assert dispatcher.submitted == 0


# -- 3. the real processes ----------------------------------------------------------------

def stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces or parentheses itself.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def is_worker(pid: int) -> bool:
    """A live (not zombie) `python -m gateway.worker_process` process."""
    found = stat(pid)
    if found is None or found[0] in ("Z", "X"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return b"gateway.worker_process" in cmdline


def children(parent: int) -> list[int]:
    """The live child processes of `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            status = stat(int(entry.name))
            if status is not None and status[1] == parent and status[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


async def the_worker(server: ServerProcess, not_: int | None = None) -> int:
    """The pid of the server's one worker child (other than `not_`), once it runs."""
    async def one() -> int | None:
        workers = [pid for pid in children(server.proc.pid) if is_worker(pid)]
        assert len(workers) <= 1, workers
        return workers[0] if workers and workers[0] != not_ else None

    return await wait_for(one, timeout=10, what="the delivery worker")


async def start(db: Path, env: Mapping[str, str] | None = None) -> ServerProcess:
    """The gateway with an admin token, info logs and every message delivered."""
    return await ServerProcess.start(db, env={"HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN, **INFO,
                                              **DELIVER_ALL, **(env or {})})


def logged(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.events(event)]


async def send(session: aiohttp.ClientSession, server: ServerProcess, to: str) -> list[int]:
    async with session.get(server.send_url, params=demo_params(to=to)) as resp:
        body = await resp.text()
    assert resp.status == 200 and body.startswith("OK\n"), body
    return [int(i) for i in body.split("\n")[2:]]


async def called_back(receiver: Receiver, ids: list[int], timeout: float = 10) -> None:
    """Every message's final state (delivered) reached the receiver."""
    async def heard() -> bool:
        return all(DELIVERED in receiver.calls.get(i, []) for i in ids)

    await wait_for(heard, timeout=timeout, what=f"the callbacks of {ids}")


async def ready(session: aiohttp.ClientSession, server: ServerProcess) -> dict[str, Any]:
    async with session.get(server.base + "/readyz") as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
    assert answer["checks"]["operator"] == "connected", answer
    return answer


async def test_the_worker_delivers_calls_back_and_reports_through_the_parent(
        tmp_path: Path) -> None:
    db = tmp_path / "worker.sqlite3"
    async with Receiver() as receiver, servers() as started, \
            aiohttp.ClientSession() as session:
        await prepare_store(db, callback=receiver.url)
        server = await start(db)
        started.append(server)
        worker = await the_worker(server)
        assert children(server.proc.pid) == [worker]
        ids = await send(session, server, "+33612345678,+33612345679")
        assert len(ids) == 2
        await called_back(receiver, ids)
        await ready(session, server)

        async with session.get(server.base + "/metrics",
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            assert resp.status == 200
            body = await resp.read()
        got = samples(body)  # parses back, no sample twice
        # The send path's figures come from the parent, the callbacks' from the worker.
        assert sum(v for (name, _), v in got.items()
                   if name == "http2sms_send_requests_total") > 0
        assert got[("http2sms_callback_attempts_total", (("result", "ok"),))] > 0
        types = header_names(body, "TYPE")
        assert types["http2sms_send_requests_total"] == 1
        assert set(types.values()) == {1}, types

        assert await server.stop() == 0
        assert not is_worker(worker)


async def test_a_killed_worker_is_started_again_and_delivery_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "killed.sqlite3"
    async with Receiver() as receiver, servers() as started, \
            aiohttp.ClientSession() as session:
        await prepare_store(db, callback=receiver.url)
        server = await start(db)
        started.append(server)
        old = await the_worker(server)
        os.kill(old, signal.SIGKILL)

        async def exited() -> list[dict[str, Any]] | None:
            return logged(server, "delivery_worker_exited") or None

        (event,) = await wait_for(exited, timeout=10, what="the worker's exit to be seen")
        assert (event["pid"], event["code"]) == (old, -signal.SIGKILL)
        # Committed while no worker runs (it is started again a second later): the store
        # keeps it for the next one.
        orphan = await send(session, server, "+33612345001")
        assert len(logged(server, "delivery_worker_started")) == 1
        await called_back(receiver, orphan)
        new = await the_worker(server, not_=old)
        assert [e["pid"] for e in logged(server, "delivery_worker_started")] == [old, new]
        later = await send(session, server, "+33612345002")
        await called_back(receiver, later)
        await ready(session, server)
        assert await server.stop() == 0
        assert not is_worker(new)


async def test_a_killed_parent_leaves_no_worker_behind(tmp_path: Path) -> None:
    db = tmp_path / "orphan.sqlite3"
    await prepare_store(db)
    async with servers() as started:
        server = await start(db)
        started.append(server)

        async def worker_ready() -> bool:
            return bool(server.events("delivery_worker_ready"))

        await wait_for(worker_ready, timeout=10, what="the worker to be ready")
        worker = await the_worker(server)
        try:
            server.proc.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(server.proc.wait(), 10) == -signal.SIGKILL

            # Its stdin ends with the parent: it stops on its own.
            async def gone() -> bool:
                return not is_worker(worker)

            await wait_for(gone, timeout=10, what="the orphaned worker to exit")

            async def stopped() -> bool:
                return bool(server.events("delivery_worker_stopped"))

            await wait_for(stopped, timeout=5, what="the worker's last log line")
        finally:
            if is_worker(worker):
                os.kill(worker, signal.SIGKILL)


async def test_without_the_worker_one_process_delivers_and_calls_back(tmp_path: Path) -> None:
    db = tmp_path / "single.sqlite3"
    async with Receiver() as receiver, servers() as started, \
            aiohttp.ClientSession() as session:
        await prepare_store(db, callback=receiver.url)
        server = await start(db, {"HTTP2SMS_SERVER_DELIVERY_WORKER": "0"})
        started.append(server)
        # Services start before the listener: a worker would be running by now.
        assert children(server.proc.pid) == []
        ids = await send(session, server, "+33612345678,+33612345679")
        await called_back(receiver, ids)
        await ready(session, server)
        assert children(server.proc.pid) == []
        assert await server.stop() == 0
        assert not server.events("delivery_worker_started")
