"""What the SMSC's answers mean for a message: command_status and receipt states -> ptt.

The default tables below are documented in the README ("An SMSC over SMPP"); an
`[operator.smpp] errors` table overrides them per SMSC: keys are command_status values
(`"0x0000000B"` or `"11"`) for submit_sm answers, or `"err:NNN"` for the `err:` of a
receipt's text (it then wins over the receipt's `stat:`).

A submit_sm answer is one of three things:
- OK: taken.
- Try later, never counted as a failure: throttled (ESME_RTHROTTLED), queue full
  (ESME_RMSGQFUL), a system error or a temporary application error (ESME_RSYSERR,
  ESME_RX_T_APPN), not bound (ESME_RINVBNDSTS).
- Refused: any other status, a final ptt. A status the table does not know ends at ptt 20
  ("undeliverable in its current form", not billed: refunded), since the message never
  left the SMSC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway import ptt

ESME_ROK = 0x00
ESME_RINVMSGLEN = 0x01
ESME_RINVBNDSTS = 0x04
ESME_RSYSERR = 0x08
ESME_RINVSRCADR = 0x0A
ESME_RINVDSTADR = 0x0B
ESME_RBINDFAIL = 0x0D
ESME_RINVPASWD = 0x0E
ESME_RINVSYSID = 0x0F
ESME_RMSGQFUL = 0x14
ESME_RINVNUMDESTS = 0x33
ESME_RINVSRCTON = 0x48
ESME_RINVSRCNPI = 0x49
ESME_RINVDSTTON = 0x50
ESME_RINVDSTNPI = 0x51
ESME_RTHROTTLED = 0x58
ESME_RX_T_APPN = 0x64
ESME_RX_P_APPN = 0x65
ESME_RX_R_APPN = 0x66
ESME_RDELIVERYFAILURE = 0xFE

NAMES: Mapping[int, str] = {
    ESME_ROK: "ESME_ROK", ESME_RINVMSGLEN: "ESME_RINVMSGLEN",
    ESME_RINVBNDSTS: "ESME_RINVBNDSTS", ESME_RSYSERR: "ESME_RSYSERR",
    ESME_RINVSRCADR: "ESME_RINVSRCADR", ESME_RINVDSTADR: "ESME_RINVDSTADR",
    ESME_RBINDFAIL: "ESME_RBINDFAIL", ESME_RINVPASWD: "ESME_RINVPASWD",
    ESME_RINVSYSID: "ESME_RINVSYSID", ESME_RMSGQFUL: "ESME_RMSGQFUL",
    ESME_RINVNUMDESTS: "ESME_RINVNUMDESTS", ESME_RINVSRCTON: "ESME_RINVSRCTON",
    ESME_RINVSRCNPI: "ESME_RINVSRCNPI", ESME_RINVDSTTON: "ESME_RINVDSTTON",
    ESME_RINVDSTNPI: "ESME_RINVDSTNPI", ESME_RTHROTTLED: "ESME_RTHROTTLED",
    ESME_RX_T_APPN: "ESME_RX_T_APPN", ESME_RX_P_APPN: "ESME_RX_P_APPN",
    ESME_RX_R_APPN: "ESME_RX_R_APPN", ESME_RDELIVERYFAILURE: "ESME_RDELIVERYFAILURE",
}

# Answers after which the SMSC wants us to slow down (the window and rate shrink a while).
SLOW_DOWN: frozenset[int] = frozenset({ESME_RTHROTTLED, ESME_RMSGQFUL})
# Answers that leave the message queued, to be tried again.
TRY_LATER: frozenset[int] = SLOW_DOWN | {ESME_RSYSERR, ESME_RX_T_APPN, ESME_RINVBNDSTS}

UNKNOWN_REFUSAL = 20
# submit_sm command_status -> ptt, for final refusals.
DEFAULT_REFUSALS: Mapping[int, int] = {
    ESME_RINVMSGLEN: 20,
    ESME_RINVSRCADR: 20, ESME_RINVSRCTON: 20, ESME_RINVSRCNPI: 20,
    ESME_RINVDSTADR: 23, ESME_RINVDSTTON: 23, ESME_RINVDSTNPI: 23, ESME_RINVNUMDESTS: 23,
    ESME_RX_P_APPN: 29, ESME_RX_R_APPN: 28,
    ESME_RDELIVERYFAILURE: 5,
}

# A receipt's stat -> ptt. ACCEPTD and ENROUTE are not final: the message stays at ptt 3.
DEFAULT_STATS: Mapping[str, int] = {
    "DELIVRD": 4, "EXPIRED": 8, "DELETED": 5, "UNDELIV": 5, "ACCEPTD": 3, "ENROUTE": 3,
    "UNKNOWN": 6, "REJECTD": 5,
}


def status_name(status: int) -> str:
    return NAMES.get(status, f"0x{status:08X}")


@dataclass(frozen=True, slots=True)
class ErrorTable:
    """The default tables with the settings' overrides."""

    refusals: Mapping[int, int]
    receipt_errors: Mapping[str, int]

    @classmethod
    def from_settings(cls, overrides: Mapping[str, int]) -> ErrorTable:
        refusals = dict(DEFAULT_REFUSALS)
        receipt_errors: dict[str, int] = {}
        for key, code in overrides.items():
            if ptt.lookup(code) is None:
                raise ValueError(f"setting operator.smpp.errors.{key}: unknown ptt {code}")
            if key.lower().startswith("err:"):
                receipt_errors[key[4:].strip().lstrip("0") or "0"] = code
            else:
                refusals[int(key, 0)] = code
        return cls(refusals, receipt_errors)

    def refusal(self, status: int) -> int:
        return self.refusals.get(status, UNKNOWN_REFUSAL)

    def receipt(self, stat: str, err: str) -> int:
        if err and self.receipt_errors:
            code = self.receipt_errors.get(err.lstrip("0") or "0")
            if code is not None:
                return code
        return DEFAULT_STATS.get(stat.upper(), 6)
