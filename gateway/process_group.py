"""`http2sms serve --processes N`: N send processes sharing the listening port.

One Python process uses one core; on a machine with more, N processes each listen on the
same port with SO_REUSEPORT, and the kernel spreads the incoming connections among them.
They meet only in the store, as separate gateways do: each send is charged in its own
commit (on SQLite the processes' group commits take turns for the write lock; on
PostgreSQL they run side by side). The first process delivers as `server.delivery_worker`
and `server.delivery` say; the others only take sends (`server.delivery = false`), so
that one delivery worker serves the group.

This module is both sides: `supervise` runs in the `http2sms serve` process, which only
supervises (it listens on nothing); `python -m gateway.process_group READY POKES ROLE` is
a child, reading its settings as one JSON line on its standard input (not on its command
line nor in its environment: they hold the admin token) and writing `ready` on the
descriptor READY once it listens; POKES is the group's pipe, which it reads (ROLE
`delivers`) or writes (`sends`). The end of its standard input means the supervisor is
gone (killed, say): the child stops as on SIGTERM, so none is left behind.

The processes that only take sends tell the first one about their commits through a pipe
the supervisor opened for the group (a byte `p` per commit that accepted messages, none
when the pipe is full: one unread byte is enough), and the first one pokes its delivery
worker as after its own commits: their messages leave as soon as its own do, not at the
worker's next look at the store.

- SIGTERM or SIGINT to the supervisor: each child gets SIGTERM and stops cleanly within
  `server.shutdown_grace_seconds` (a second signal is passed on: cut what is left); one
  still running a few seconds later is killed. The children run in their own session, so
  a terminal's Ctrl-C reaches them once, through the supervisor.
- A child that dies after it listened is started again (after a wait that grows while it
  keeps dying soon after its starts: gateway.restarts): the others serve meanwhile (the
  kernel leaves a closed socket out of the group), and nothing answered is lost (a send
  is answered only after its commit); only the answers of its requests in flight are,
  which the clients may retry. A child that exits before it listens (the port taken by
  another program, a TLS file missing, the store unreachable) would fail again: the whole
  group stops with status 1, for its service manager to report it and restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway import logs
from gateway.app import Gateway
from gateway.config import Config, from_dict, to_dict
from gateway.records import SendOutcome
from gateway.restarts import RestartDelay
from gateway.server import install_uvloop, serve
from gateway.store import StoreError, open_store

log = structlog.get_logger("gateway.server")

READY = b"ready\n"
POKE = b"p"
# What a child does with the group's poke pipe.
DELIVERS, SENDS = "delivers", "sends"
# Seconds between a child's death and its new start, doubled after each quick death
# (gateway.restarts).
RESTART_SECONDS = 1.0
# Past the grace period, how long the children get before they are killed.
KILL_MARGIN_SECONDS = 5.0


def child_config(config: Config, index: int) -> Config:
    """The settings of child `index`: the first delivers as configured, the others not."""
    return config if index == 0 else config.replace({"server.delivery": False})


@dataclass
class _Child:
    index: int
    config: Config
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    starts: int = 0
    started_at: float = 0.0
    # The read end of the pipe on which the running process says it listens.
    announcer: int = -1


class ProcessGroup:
    """Starts, watches and stops the send processes of one `serve --processes N`."""

    def __init__(self, config: Config, processes: int, *,
                 restart_seconds: float = RESTART_SECONDS) -> None:
        self._config = config
        self._children = [_Child(i, child_config(config, i)) for i in range(processes)]
        self._restart_seconds = restart_seconds
        self._stopping = False
        self._failed = asyncio.Event()
        # Open for the group's whole life: a child started again gets the same pipe.
        self._pokes = os.pipe()
        os.set_blocking(self._pokes[1], False)  # a full pipe must never stall a send

    @property
    def pids(self) -> list[int]:
        return [c.process.pid for c in self._children if c.process is not None]

    async def run(self, *, ready: Callable[[], None] | None = None) -> int:
        """Until a signal (0 once every child stopped cleanly, else 1) or until a child
        cannot start (1)."""
        loop = asyncio.get_running_loop()
        signals = asyncio.Queue[int]()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        watchers = [asyncio.create_task(self._watch(child)) for child in self._children]
        try:
            waiting = asyncio.gather(*(child.ready.wait() for child in self._children))
            signalled = asyncio.ensure_future(signals.get())
            failed = asyncio.ensure_future(self._failed.wait())
            first: set[asyncio.Future[Any]] = {waiting, signalled, failed}
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                log.info("processes_ready", processes=len(self._children), pids=self.pids)
                if ready is not None:
                    ready()
                await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            failed.cancel()
            if signalled.done():
                log.info("processes_stopping", pids=self.pids)
            else:
                signalled.cancel()
                log.error("processes_failed", reason="a send process could not start; "
                          "stopping the group")
            clean = await self._stop(signals)
            return 0 if clean and not self._failed.is_set() else 1
        finally:
            for watcher in watchers:
                watcher.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for fd in self._pokes:
                os.close(fd)

    async def _watch(self, child: _Child) -> None:
        restarts = RestartDelay(self._restart_seconds)
        while not self._stopping:
            try:
                await self._spawn(child)
            except OSError as exc:
                log.error("process_start_failed", index=child.index, error=str(exc))
                self._failed.set()
                return
            process = child.process
            assert process is not None
            child.started_at = asyncio.get_running_loop().time()
            announced = asyncio.ensure_future(self._announced(child, process))
            code = await process.wait()
            with contextlib.suppress(asyncio.CancelledError):
                await announced
            if self._stopping:
                return
            if not child.ready.is_set():
                log.error("process_exited_at_start", index=child.index, pid=process.pid,
                          code=code)
                self._failed.set()
                return
            wait = restarts.after(asyncio.get_running_loop().time() - child.started_at)
            log.error("process_exited", index=child.index, pid=process.pid, code=code,
                      restart_in=wait)
            child.ready.clear()
            await asyncio.sleep(wait)

    async def _spawn(self, child: _Child) -> None:
        read_end, write_end = os.pipe()
        role, pokes = (DELIVERS, self._pokes[0]) if child.index == 0 \
            else (SENDS, self._pokes[1])
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.process_group", str(write_end), str(pokes),
                role, stdin=asyncio.subprocess.PIPE, pass_fds=(write_end, pokes),
                start_new_session=True)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        child.process = process
        child.starts += 1
        child.ready.clear()
        child.announcer = read_end
        assert process.stdin is not None
        process.stdin.write(json.dumps(to_dict(child.config)).encode() + b"\n")
        log.info("process_started", index=child.index, pid=process.pid)

    async def _announced(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        """Set `child.ready` when it writes READY on its descriptor."""
        fd = child.announcer
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
        try:
            if await reader.readline() == READY and process.returncode is None:
                child.ready.set()
        finally:
            transport.close()

    async def _stop(self, signals: asyncio.Queue[int]) -> bool:
        """SIGTERM to each child, a second signal passed on, SIGKILL past the grace."""
        self._stopping = True
        running = [c.process for c in self._children
                   if c.process is not None and c.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.server.shutdown_grace_seconds \
            + KILL_MARGIN_SECONDS
        exits = asyncio.ensure_future(asyncio.gather(*(p.wait() for p in running)))
        while not exits.done():
            again = asyncio.ensure_future(signals.get())
            either: set[asyncio.Future[Any]] = {exits, again}
            await asyncio.wait(either, timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if again.done():
                for process in running:  # a second signal: hurry (see server.shut_down)
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.send_signal(signal.SIGTERM)
                continue
            again.cancel()
            if not exits.done():
                log.warning("processes_killed", pids=[p.pid for p in running
                                                      if p.returncode is None])
                for process in running:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                await exits
        codes = exits.result()
        log.info("processes_stopped", codes=codes)
        return all(code == 0 for code in codes)


async def prepare(config: Config) -> None:
    """Open the store once before the children do: its migrations run here, once, and a
    store that cannot be opened is one clear error rather than N."""
    store = open_store(config.store, "cli")
    await store.open()
    await store.close()


async def supervise(config: Config, processes: int, *,
                    ready: Callable[[], None] | None = None) -> int:
    await prepare(config)
    return await ProcessGroup(config, processes).run(ready=ready)


# -- the child ------------------------------------------------------------------------------

class _SupervisorGone(asyncio.Protocol):
    """The end of standard input: the supervisor is gone; stop as on SIGTERM."""

    def connection_lost(self, exc: Exception | None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def link_pokes(gateway: Gateway, pokes: int, role: str) -> None:
    """Wire the group's poke pipe: written after this process's commits (`sends`), or read
    to poke this process's delivery (`delivers`)."""
    if role == SENDS:
        def tell(outcomes: Sequence[SendOutcome]) -> None:
            if any(outcome.accepted and outcome.ids for outcome in outcomes):
                # Full: pokes are waiting to be read already, one is as good as many.
                with contextlib.suppress(BlockingIOError, BrokenPipeError):
                    os.write(pokes, POKE)

        gateway.after_commit.append(tell)
        return
    os.set_blocking(pokes, False)

    def poked() -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(pokes, 4096):
                pass
        if gateway.worker is not None:
            gateway.worker.poke()
        elif gateway.dispatcher is not None:
            gateway.dispatcher.poke()

    asyncio.get_running_loop().add_reader(pokes, poked)


async def _child(config: Config, announce: int, pokes: int, role: str) -> None:
    loop = asyncio.get_running_loop()
    # The settings line was read before: what follows is only ever the end of the pipe.
    await loop.connect_read_pipe(_SupervisorGone, sys.stdin)

    def ready(_url: str) -> None:
        with contextlib.suppress(OSError):
            os.write(announce, READY)
        os.close(announce)

    await serve(config, ready=ready, reuse_port=True,
                built=lambda gateway: link_pokes(gateway, pokes, role))


def child_main(argv: list[str]) -> int:
    install_uvloop()
    announce, pokes, role = int(argv[1]), int(argv[2]), argv[3]
    line = sys.stdin.buffer.readline()
    if not line:
        return 0  # the supervisor went away before sending the settings
    config = from_dict(json.loads(line))
    logs.configure(config.log.format, config.log.level, final=True)
    try:
        asyncio.run(_child(config, announce, pokes, role))
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv))
