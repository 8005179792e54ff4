"""The process runner of `http2sms serve`: listeners, TLS, signals, shutdown, process-wide setup.

What changes the whole process (the request parser, the event loop policy, the collector)
is done from here, not where the gateway or its web app is built: building them changes
nothing outside them. The delivery worker's process (`gateway.worker_process`) shares the
last two.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from contextlib import suppress

import structlog
from aiohttp import web

from gateway import http_parser
from gateway.admin.api import PREFIX
from gateway.app import Gateway, build
from gateway.config import Config
from gateway.connections import ConnectionGuard
from gateway.display import redact_url
from gateway.inflight import INFLIGHT
from gateway.store import shown
from gateway.webapp import create_admin_listener_app, create_app

if sys.platform != "win32":
    import resource

log = structlog.get_logger("gateway.server")

# The host that means "every address": with it the listener takes IPv4 clients too.
ANY_IPV6 = ("::", "[::]")


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    return context


def store_location(location: str) -> str:
    """Where the store is, for a log line: a path as it is; a URL without its password nor
    its query's values (libpq takes `?password=` and `sslpassword=` there too)."""
    if "://" not in location:
        return location
    url = shown(location)
    return redact_url(url) if "?" in url or "#" in url else url


class GuardedSite(web.TCPSite):
    """A TCP listener whose connections go through the connection guard.

    `::` (any IPv6 address) listens on IPv4 too, as users expect of "every address": asyncio
    makes its IPv6 sockets IPv6-only, which refused every IPv4 client. IPv4 peers then show
    as `::ffff:a.b.c.d`, which `iprules.parse_ip` folds back to IPv4 everywhere.
    """

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 *, ssl_context: ssl.SSLContext | None = None,
                 reuse_port: bool | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True,
                         reuse_port=reuse_port)
        self._guard = guard

    async def start(self) -> None:
        # TCPSite.start's own work with its private attributes, every option passed on
        # (tests/unit/test_canaries.py checks that aiohttp still keeps them there).
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would listen
        server = self._runner.server
        assert server is not None
        factory = self._guard.factory(server)
        loop = asyncio.get_running_loop()
        if self._host in ANY_IPV6 and socket.has_dualstack_ipv6():
            sock = socket.create_server(("::", self._port), family=socket.AF_INET6,
                                        backlog=self._backlog, dualstack_ipv6=True,
                                        reuse_port=bool(self._reuse_port))
            sock.setblocking(False)
            self._server = await loop.create_server(factory, sock=sock, ssl=self._ssl_context,
                                                    backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def backstop_idle_timeout(config: Config) -> float:
    """aiohttp's own idle timeout (about an hour unless set): a second line, a little past
    the guard's, which does the closing (and counts it)."""
    return config.server.idle_timeout_seconds + 1.0


async def start_admin_listener(gateway: Gateway, guard: ConnectionGuard | None = None, *,
                               reuse_port: bool = False) -> web.AppRunner | None:
    """Start the admin listener when `admin.host` is set; the caller cleans the runner up.

    The gateway itself is started and stopped by the public app, so this app has no
    lifecycle of its own and must be cleaned up before the public one. `guard`: the public
    listener's, so that a client's connections to both count together.
    """
    config = gateway.config
    if not config.admin.host:
        return None
    runner = web.AppRunner(create_admin_listener_app(gateway), access_log=None,
                           handle_signals=False,
                           shutdown_timeout=config.server.shutdown_grace_seconds,
                           keepalive_timeout=backstop_idle_timeout(config))
    await runner.setup()
    site = GuardedSite(runner, config.admin.host, config.admin.port,
                       guard or ConnectionGuard.from_config(config, gateway.metrics),
                       ssl_context=ssl_context(config), reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    scheme = "https" if config.server.tls_cert else "http"
    log.info("admin_listening", url=f"{scheme}://{config.admin.host}:{config.admin.port}"
                                     f"{PREFIX}")
    return runner


def spare_the_start_up_heap() -> None:
    """Leave what start-up allocated (modules, tables, the app) out of the collector's passes.

    It lives as long as the process, yet each full collection walked all of it again: under
    scripts/bench the send process paused up to 31-54 ms in each of them, about every 2 s,
    which put every request in flight at that moment into the p99. Frozen, the full passes
    took 39 ms in all instead of 164-200 over a run, and p99 went from 50-67 ms to 36-43 ms
    (three runs each, alternating).
    """
    gc.collect()
    gc.freeze()


def raise_file_limit(config: Config) -> int:
    """Raise the soft limit on open files to the hard one, as Go's runtime does; warn when
    it stays low. Every connection holds a descriptor: at the usual soft limit of 1,024,
    one client's connections could leave none for anyone else (or for the store)."""
    if sys.platform == "win32":
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    cap = config.server.max_connections_per_address
    wanted = 2 * cap + 64 if cap else 4096
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("low_file_limit", open_files=soft, wanted=wanted,
                    hint="raise it (systemd LimitNOFILE=, docker run --ulimit nofile=), or "
                         "lower server.max_connections_per_address")
    return soft


def install_uvloop() -> None:
    """uvloop when installed (the `fast` extra): a faster event loop, same behaviour."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(config: Config, *, ready: Callable[[str], None] | None = None,
                reuse_port: bool = False,
                built: Callable[[Gateway], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; the access log stays off because URLs carry passwords.

    `reuse_port`: one of several processes listening on the same ports (SO_REUSEPORT,
    `gateway.process_group`), which links them to each other through `built`, called with
    the gateway before it starts."""
    grace = config.server.shutdown_grace_seconds
    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    # Raw non-ASCII bytes in the send URL, as OVH takes them: for every connection this
    # process serves, so here rather than where the app is built.
    http_parser.install(always=config.server.raw_url_bytes_always)
    raise_file_limit(config)
    gateway = build(config, delivery_worker=config.server.delivery_worker,
                    delivery=config.server.delivery)
    if built is not None:
        built(gateway)
    app = create_app(gateway)
    # `shut_down` drains the requests itself; aiohttp then only cancels what is left.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=min(1.0, grace / 4),
                           max_line_size=config.server.max_url_bytes,
                           keepalive_timeout=backstop_idle_timeout(config))
    await runner.setup()
    admin_runner: web.AppRunner | None = None
    # One guard for both listeners: descriptors are the process's, whichever port.
    guard = ConnectionGuard.from_config(config, gateway.metrics)
    try:
        site = GuardedSite(runner, config.server.host, config.server.port, guard,
                           ssl_context=ssl_context(config), reuse_port=reuse_port or None)
        await site.start()
        # Its own listener when admin.host is set; None when the admin API shares this one.
        admin_runner = await start_admin_listener(gateway, guard, reuse_port=reuse_port)
    except BaseException:
        await runner.cleanup()
        raise
    scheme = "https" if config.server.tls_cert else "http"
    url = f"{scheme}://{config.server.host}:{config.server.port}"
    log.info("listening", url=url, store=store_location(config.store.location))
    spare_the_start_up_heap()
    if ready is not None:
        ready(url)
    await signals.get()
    log.info("shutting_down", grace_seconds=grace)
    clean = await shut_down(runner, gateway, grace, admin_runner=admin_runner, hurry=signals)
    # With several processes on one port (`--processes`), what each one served.
    log.info("stopped", clean=clean, send_requests=_send_requests(gateway))


def _send_requests(gateway: Gateway) -> int:
    """Send URL requests this process answered, whatever their outcome."""
    return int(sum(sample.value for metric in gateway.metrics.send_requests.collect()
                   for sample in metric.samples if sample.name.endswith("_total")))


# The share of the grace period that requests in flight get to finish.
DRAIN_SHARE = 0.75


async def shut_down(runner: web.AppRunner, gateway: Gateway, grace: float, *,
                    admin_runner: web.AppRunner | None = None,
                    hurry: asyncio.Queue[int] | None = None) -> bool:
    """Stop accepting, let requests in flight finish, stop the gateway: all within `grace`.

    Requests get 3/4 of the grace period, the services' flush the rest. Past the grace
    period (or at a second signal) what still runs is cut. That is safe: an answered send
    is already committed, and deliveries and callbacks resume from the store at the next
    start. Returns False when something had to be cut.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, grace)
    runners = [r for r in (admin_runner, runner) if r is not None]
    for each in runners:
        for site in list(each.sites):
            await site.stop()

    async def drain() -> None:
        limiter = runner.app[INFLIGHT]
        if not await limiter.drain(grace * DRAIN_SHARE):
            log.warning("shutdown_requests_cut", requests=limiter.inflight)
        # The public app's cleanup stops the gateway, so it goes last.
        for each in runners:
            await each.cleanup()

    work = asyncio.ensure_future(drain())
    second = asyncio.ensure_future(hurry.get()) if hurry is not None else None
    try:
        await asyncio.wait({work} if second is None else {work, second},
                           timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if second is not None:
            second.cancel()
    if work.done():
        if not work.cancelled() and work.exception() is not None:
            log.error("shutdown_failed", error=str(work.exception()))
            return False
        return True
    hurried = second is not None and second.done() and not second.cancelled()
    log.warning("shutdown_cut", grace_seconds=grace,
                reason="second signal" if hurried else "grace period over")
    work.cancel()
    if gateway.worker is not None:
        gateway.worker.kill()
    # Stopping services may take a moment to notice the cancellation; do not wait long.
    await asyncio.wait({work}, timeout=1.0)
    with suppress(Exception):
        await asyncio.wait_for(gateway.store.close(), 1.0)
    return False
