"""The operator interface, version 2: what a connector to a network provides and answers.

The gateway talks to one `Operator`. The built-in simulated network (`simulated`) is the
default; a real SMPP connection is meant to be a second implementation of the same
interface. Its shape is a real network's:

- `submit` answers each message on its own, in a `SubmitResult`:
  - `Taken`: the operator is responsible for it now, and gave one reference per part
    (SMPP: the `message_id` of each `submit_sm_resp`); its reports will name them.
  - `Later`: not taken, try again after `retry_after` seconds (throttled, queue full,
    link down). The message stays queued; nothing is charged or refunded.
  - `Refused`: a final answer (a final ptt); the gateway settles it as it settles a
    failure reported later, refunding it when that ptt is not billed.
  A connector answers messages in order and may stop early: the messages without an
  answer (a batch that failed half-way, say the link dropped after three `submit_sm_resp`
  of five) are tried again later, and only those. An exception from `submit` means that
  none of the batch was taken.
- `resume` is for messages it took before a restart: it must not send them again, only
  keep waiting for their reports (SMPP: the SMSC redelivers pending receipts).
- What the network says on its own goes to the `OperatorSink` given to `start`:
  - `reports`: delivery reports, each naming the operator's reference of one part. The
    gateway finds the message by that reference (any part finds it). A message follows
    its parts' reports in the order they arrive, and the first final one settles it,
    except "delivered": a message of several parts is delivered when every part is
    reported delivered (the store counts them), so a failed part fails it. A reference
    `<ref>#<n>` names a part carried by the submit of `<ref>` (SMPP's message_payload):
    it is delivered with `<ref>`.
  - `inbound`: messages sent by a handset to the gateway's numbers (replies, STOP), or
    the parts of long ones as they come (the gateway stores each and reassembles).
  Both only buffer, so a connector may call them from any callback, and both return an
  `Acknowledgement`: a future that completes once what it was given is committed to the
  store (or, for an inbound message, handed to whatever the gateway does with it). A
  connector whose network redelivers what is not acknowledged (SMPP: answer `deliver_sm`
  only then) awaits it before answering; one that does not care ignores it. It is
  cancelled if the gateway stops first: the network will redeliver.
- `link_status` says whether the link is up right now (SMPP: bound); `/readyz` reports
  not ready while it is down.

Two members are optional (read with `batch_hint` and `expiry` below), so that a connector
without them (the simulator, the tests' fakes) needs nothing:
- `batch_hint`: most messages one `submit` call should carry. A connector that paces its
  submits (SMPP: a window and throughput caps) answers a big batch only after many
  seconds, and the dispatcher records nothing of a batch before its answer: the reports
  of its first messages would wait that long (SMPP: their deliver_sm unanswered, the
  SMSC's timeout running), and the claim's lease could run out. With a hint the
  dispatcher hands over chunks of that size, the next one claimed while one is on its way.
- `expiry`: when the gateway stops waiting for a taken message's final report, and at
  which ptt it then settles it (SMPP: an SMSC may never send the receipt). Without it the
  connector's network always settles what it took (the simulator expires messages itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from gateway.records import OperatorReport, OutgoingMessage

Acknowledgement = asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class Taken:
    """The operator took the message: one reference per part, in part order."""

    message_id: int
    references: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Later:
    """Not taken now; the gateway tries again after `retry_after` seconds."""

    message_id: int
    retry_after: float
    reason: str  # "throttled", "queue full", "link down", ...


@dataclass(frozen=True, slots=True)
class Refused:
    """A final answer without delivery: the message ends at `ptt` (a final ptt code)."""

    message_id: int
    ptt: int
    note: str = ""


SubmitResult = Taken | Later | Refused


class PartOf(NamedTuple):
    """Where a part of a long message goes: its message's concatenation reference (shared
    by its parts), their count, and its number (1 to total)."""

    group: int
    total: int
    seq: int


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message from a handset to one of the gateway's numbers (a reply, a STOP), or one
    part of a long one (`part`): the gateway keeps the parts, each before acknowledging
    it, until the message is whole."""

    # The operator's: the same when the network sends it again (its acknowledgement
    # lost), so that the gateway keeps it once.
    reference: str
    sender: str      # the handset's number
    receiver: str    # the gateway's number or short code it was sent to
    body: str
    at: float
    part: PartOf | None = None


@dataclass(frozen=True, slots=True)
class LinkStatus:
    up: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Expiry:
    """A message taken `after_seconds` ago with no final report ends at `ptt` (final)."""

    after_seconds: float
    ptt: int
    note: str


class OperatorUnavailable(Exception):
    """The operator cannot take any of the batch now (link down): try all of it later."""


class OperatorSink(Protocol):
    """Where a connector hands what the network says on its own (see the module doc)."""

    def reports(self, reports: Sequence[OperatorReport]) -> Acknowledgement: ...
    def inbound(self, messages: Sequence[Inbound]) -> Acknowledgement: ...


class Operator(Protocol):
    async def start(self, sink: OperatorSink) -> None: ...
    async def stop(self) -> None: ...
    async def submit(self, messages: Sequence[OutgoingMessage]) -> Sequence[SubmitResult]:
        """One answer per message, in order; fewer if the batch failed half-way."""
    async def resume(self, messages: Sequence[OutgoingMessage]) -> None: ...
    def link_status(self) -> LinkStatus: ...


def batch_hint(operator: Operator) -> int | None:
    """The operator's optional `batch_hint` (see the module doc), None without one."""
    hint = getattr(operator, "batch_hint", None)
    return hint if isinstance(hint, int) and hint > 0 else None


def expiry(operator: Operator) -> Expiry | None:
    """The operator's optional `expiry` (see the module doc), None without one."""
    found = getattr(operator, "expiry", None)
    return found if isinstance(found, Expiry) else None
