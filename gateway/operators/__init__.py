"""The operator connector: what hands messages to a network and hears back their states.

The gateway talks to one `Operator`. The built-in simulated network (`simulated`) is the
default; a real SMPP connection is meant to be a second implementation of the same
interface:

- `submit` returns once the operator has taken responsibility for the messages (for SMPP:
  each `submit_sm_resp` received). It raises `OperatorUnavailable` when it cannot take
  them at all, and the caller keeps them queued and retries. A message the operator
  refuses individually is reported as a failed state, not raised.
- `resume` is for messages it already took before a restart: it must not send them again,
  only keep waiting for their reports (SMPP: the SMSC redelivers pending DLRs).
- States come back asynchronously through the `ReportSink` given to `start`. The sink only
  buffers (it never blocks), so an operator may call it from any callback.
- An optional `connected` attribute says whether the link is up right now (SMPP: bound);
  `/readyz` reports not ready while it is False. Without it the operator counts as up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.clock import Clock
from gateway.config import ConfigError, OperatorConfig, SimulatedOperatorConfig
from gateway.records import OutgoingMessage, StateUpdate

ReportSink = Callable[[Sequence[StateUpdate]], None]


class OperatorUnavailable(Exception):
    """The operator cannot take messages now (link down, throttled); retry later."""


class Operator(Protocol):
    async def start(self, reports: ReportSink) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, messages: Sequence[OutgoingMessage]) -> None: ...
    async def resume(self, messages: Sequence[OutgoingMessage]) -> None: ...


def create(config: OperatorConfig, clock: Clock) -> Operator:
    """The operator named by `operator.kind`."""
    if isinstance(config, SimulatedOperatorConfig):
        from gateway.operators.simulated import SimulatedOperator

        return SimulatedOperator(config, clock)
    raise ConfigError(f"setting operator.kind: unknown operator {config.kind!r} "
                      "(available: simulated)")
