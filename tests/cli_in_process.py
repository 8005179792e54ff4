"""The `http2sms` tool run in the test process, through click's CliRunner."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from click.testing import CliRunner, Result

from gateway import cli


def invoke(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Result:
    """`http2sms *args` in this process. A command runs its own event loop: an async test
    calls this in a thread (`asyncio.to_thread`).

    The command's stdout must be its answer alone, and a gateway under test may be logging
    meanwhile: while the command runs, log lines go to the stderr of the test.
    """
    with logging_kept():
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        return CliRunner().invoke(cli.http2sms, list(args), env=env, input=input,
                                  catch_exceptions=False)


@contextmanager
def logging_kept() -> Iterator[None]:
    """Logging as it was, after a command that may configure it for the stderr it had."""
    configured, saved = structlog.is_configured(), structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        if configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
