"""Operator state ("ptt") codes and the DLR status ids reported with them.

The REST shape served by ``GET /1.0/sms/ptts?ptt=N`` mirrors OVHcloud's
``sms.PttDetails``: ``description`` (short description), ``comment``
(details) and ``duration`` (``sms.PttDurationTypeEnum``, the "volatility" of
the state). The field names and enum values are OVHcloud's; the wording of
each entry is this project's own, as no OVHcloud source for it was found.

Beyond the public shape, every entry also carries what the gateway needs to
drive a message's lifecycle: whether the state is final, which DLR id the
customer callback reports, and whether the message stays billed.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from dataclasses import dataclass


class Duration(enum.StrEnum):
    """Whether the condition behind a ptt is lasting (``sms.PttDurationTypeEnum``)."""

    PERMANENT = "permanent"
    TEMPORARY = "temporary"
    # Misspelt on purpose: this is the literal value OVHcloud's API emits.
    INDETERMINATED = "indeterminated"


class Dlr(enum.IntEnum):
    """DLR status ids, as sent in delivery-report callbacks."""

    PENDING = 0
    SUCCESS = 1
    FAILED = 2
    WAITING = 4
    BUFFERED = 8
    NOT_BILLED = 16


DLR_TEXT: Mapping[Dlr, str] = types.MappingProxyType(
    {
        Dlr.PENDING: "creating/pending",
        Dlr.SUCCESS: "success",
        Dlr.FAILED: "failed",
        Dlr.WAITING: "waiting",
        Dlr.BUFFERED: "buffered",
        Dlr.NOT_BILLED: "error, not billed",
    }
)

# DLR ids a message can carry while it may still change state.
_NON_FINAL_DLRS = frozenset({Dlr.PENDING, Dlr.WAITING, Dlr.BUFFERED})


@dataclass(frozen=True, slots=True)
class Ptt:
    """One operator state, with the gateway-side consequences of reaching it."""

    code: int
    description: str
    comment: str
    duration: Duration
    final: bool
    dlr: Dlr
    billed: bool

    def __post_init__(self) -> None:
        # Billing and refunds are keyed on these invariants; an inconsistent
        # entry would silently charge or refund the wrong messages.
        if self.billed == (self.dlr == Dlr.NOT_BILLED):
            raise ValueError(
                f"ptt {self.code}: billed must be False exactly when dlr is NOT_BILLED"
            )
        if self.final == (self.dlr in _NON_FINAL_DLRS):
            raise ValueError(f"ptt {self.code}: final={self.final} contradicts dlr {self.dlr.name}")


def _ptt(
    code: int, description: str, comment: str, duration: Duration, final: bool, dlr: Dlr
) -> Ptt:
    # billed is derived, not declared, so the table cannot disagree with itself.
    return Ptt(code, description, comment, duration, final, dlr, dlr != Dlr.NOT_BILLED)


_P, _T, _I = Duration.PERMANENT, Duration.TEMPORARY, Duration.INDETERMINATED

_TABLE: tuple[Ptt, ...] = (
    _ptt(
        1,
        "Phone problem, retrying",
        "The recipient's handset could not take the message for now (switched off, "
        "out of coverage or memory full). Delivery is being retried.",
        _T,
        False,
        Dlr.BUFFERED,
    ),
    _ptt(
        2,
        "Operator problem, retrying",
        "The recipient's operator could not process the message for now. "
        "Delivery is being retried.",
        _T,
        False,
        Dlr.BUFFERED,
    ),
    _ptt(
        3,
        "Accepted by the operator",
        "The message has been handed to the recipient's operator, which has not yet "
        "reported delivery to the handset.",
        _T,
        False,
        Dlr.WAITING,
    ),
    _ptt(
        4,
        "Delivered",
        "The operator confirmed the message was received by the recipient's handset.",
        _P,
        True,
        Dlr.SUCCESS,
    ),
    _ptt(
        5,
        "Undelivered",
        "The operator reported the message as undelivered without giving a reason.",
        _I,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        6,
        "Final state unknown",
        "The operator did not report whether the message reached the handset; "
        "its final state cannot be determined.",
        _I,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        8,
        "Expired",
        "The message could not be delivered before its validity period ended, usually "
        "because the handset stayed unreachable. Sending it again later may succeed.",
        _T,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        20,
        "Undeliverable in its current form",
        "The message cannot be delivered as it is (format, encoding or sender not "
        "accepted). It was not transmitted to the network.",
        _P,
        True,
        Dlr.NOT_BILLED,
    ),
    _ptt(
        21,
        "Subscriber credit",
        "The recipient's account does not have enough credit to receive this message.",
        _T,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        23,
        "Invalid or barred number",
        "The recipient number does not exist, is no longer assigned or is barred from "
        "receiving SMS. It was not transmitted to the network.",
        _P,
        True,
        Dlr.NOT_BILLED,
    ),
    _ptt(
        24,
        "Subscriber absent",
        "The recipient is not reachable on the network (handset off or out of "
        "coverage). Delivery is being retried.",
        _T,
        False,
        Dlr.BUFFERED,
    ),
    _ptt(
        25,
        "Temporary network failure",
        "A temporary failure on the recipient's network prevented delivery. "
        "Delivery is being retried.",
        _T,
        False,
        Dlr.BUFFERED,
    ),
    _ptt(
        26,
        "Temporary phone failure",
        "The recipient's handset temporarily failed to accept the message (for example "
        "a full memory). Delivery is being retried.",
        _T,
        False,
        Dlr.BUFFERED,
    ),
    _ptt(
        27,
        "Handset incompatible",
        "The recipient's handset does not support this type of message.",
        _P,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        28,
        "Spam suspicion",
        "The message was blocked because it was suspected of being spam. "
        "It was not transmitted to the network.",
        _P,
        True,
        Dlr.NOT_BILLED,
    ),
    _ptt(
        29,
        "Content not permitted",
        "The content of the message is not permitted towards this destination. It was "
        "not transmitted to the network.",
        _P,
        True,
        Dlr.NOT_BILLED,
    ),
    _ptt(
        33,
        "Parental lock",
        "The recipient's line has a parental control that blocks this message.",
        _P,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        39,
        "Operator failure",
        "The recipient's operator failed to deliver the message and did not say "
        "whether the cause is lasting.",
        _I,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        73,
        "Ported number unreachable",
        "The number has been ported to another operator and could not be reached through it.",
        _P,
        True,
        Dlr.FAILED,
    ),
    _ptt(
        74,
        "Roaming",
        "The recipient is roaming on a foreign network, which delays delivery. "
        "Delivery is being retried.",
        _T,
        False,
        Dlr.BUFFERED,
    ),
    _ptt(
        76,
        "Ported number blocked for client",
        "The number has been ported to an operator that does not accept messages from "
        "this account. It was not transmitted to the network.",
        _P,
        True,
        Dlr.NOT_BILLED,
    ),
    _ptt(
        202,
        "Ported number blocked for client",
        "The number has been ported to an operator that does not accept messages from "
        "this account. It was not transmitted to the network.",
        _P,
        True,
        Dlr.NOT_BILLED,
    ),
)

PTTS: Mapping[int, Ptt] = types.MappingProxyType({p.code: p for p in _TABLE})

# A copy-paste duplicate would otherwise silently shadow an earlier entry.
if len(PTTS) != len(_TABLE):
    raise RuntimeError("duplicate ptt code in the ptt table")

# 3 is left out: it is where a healthy delivery waits, not a retry loop.
INTERMEDIATE_CODES: tuple[int, ...] = tuple(
    p.code for p in _TABLE if not p.final and p.dlr is Dlr.BUFFERED
)

FINAL_FAILURE_CODES: tuple[int, ...] = tuple(
    p.code for p in _TABLE if p.final and p.dlr is not Dlr.SUCCESS
)


def lookup(code: int) -> Ptt | None:
    """Return the ptt for ``code``, or None when the code is not known."""
    return PTTS.get(code)


def as_api_dict(p: Ptt) -> dict[str, str]:
    """Render ``p`` exactly as ``GET /1.0/sms/ptts`` returns it (``sms.PttDetails``)."""
    return {
        "description": p.description,
        "comment": p.comment,
        "duration": p.duration.value,
    }
