"""SMS text coding detection and segmentation (GSM 03.38 / UCS-2).

Pure computation, no I/O: it runs on every send request, so the character
tables are built once at import and the common cases avoid Python-level loops.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "MAX_PARTS",
    "Coding",
    "EncodingError",
    "Segmentation",
    "detect_coding",
    "is_gsm7",
    "segment",
]


class Coding(enum.IntEnum):
    # Values are sent verbatim as the smsCoding URL parameter.
    GSM7 = 1
    UCS2 = 2


class EncodingError(ValueError):
    """Text contains characters outside GSM 03.38 but GSM7 was forced."""


# Segment doesn't enforce this; it's exported so callers share one limit.
MAX_PARTS = 6

# GSM 03.38 basic table in code-point order (0x00-0x7F). 0x1B (ESC) is the
# escape to the extension table, never a user character, so it is excluded
# here; keeping the table positional makes it easy to audit against the spec.
GSM_BASIC_TABLE = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)

_GSM_BASIC: frozenset[str] = frozenset(GSM_BASIC_TABLE) - {"\x1b"}
# Each of these is sent as ESC + code, hence two septets.
GSM_EXTENSION: frozenset[str] = frozenset("\f^{}\\[~]|€")
_GSM_ALL: frozenset[str] = _GSM_BASIC | GSM_EXTENSION

# (single-message capacity, per-part capacity once a User Data Header for
# concatenation is needed); the SMPP connector packs parts by the same numbers.
GSM_SINGLE, GSM_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


@dataclass(frozen=True, slots=True)
class Segmentation:
    coding: Coding
    # GSM: septets (extension chars count 2); UCS-2: UTF-16 code units.
    units: int
    parts: int


def is_gsm7(text: str) -> bool:
    """Return True if every character is encodable in GSM 03.38."""
    # issuperset iterates the str in C, far cheaper than a generator.
    return _GSM_ALL.issuperset(text)


def detect_coding(text: str) -> Coding:
    return Coding.GSM7 if is_gsm7(text) else Coding.UCS2


def segment(text: str, coding: Coding | None = None) -> Segmentation:
    """Count units and SMS parts for ``text``.

    ``coding=None`` auto-detects; ``Coding.GSM7`` raises EncodingError on a
    non-GSM character; ``Coding.UCS2`` is honoured even for GSM-safe text.
    """
    # Coding(...) also accepts the raw URL-parameter ints and rejects others.
    coding = detect_coding(text) if coding is None else Coding(coding)
    if coding is Coding.GSM7:
        return _segment_gsm(text)
    return _segment_ucs2(text)


def _segment_gsm(text: str) -> Segmentation:
    if not _GSM_ALL.issuperset(text):
        bad = next(ch for ch in text if ch not in _GSM_ALL)
        raise EncodingError(
            f"character {bad!r} (U+{ord(bad):04X}) is not in the GSM 03.38 alphabet"
        )
    n_ext = sum(text.count(ch) for ch in GSM_EXTENSION)
    units = len(text) + n_ext
    if units <= GSM_SINGLE:
        return Segmentation(Coding.GSM7, units, 1)
    if n_ext == 0:
        # Every char is one septet, so nothing can straddle a boundary.
        return Segmentation(Coding.GSM7, units, -(-units // GSM_PART))
    return Segmentation(Coding.GSM7, units, _pack(text, GSM_PART, GSM_EXTENSION))


def _segment_ucs2(text: str) -> Segmentation:
    # surrogatepass so a lone surrogate (legal in a Python str) counts as one
    # unit instead of raising.
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    if units <= UCS2_SINGLE:
        return Segmentation(Coding.UCS2, units, 1)
    if units == len(text):
        # No surrogate pairs, so nothing can straddle a boundary.
        return Segmentation(Coding.UCS2, units, -(-units // UCS2_PART))
    return Segmentation(Coding.UCS2, units, _pack_astral(text, UCS2_PART))


def _pack(text: str, capacity: int, doubles: frozenset[str]) -> int:
    # Greedy fill: a two-unit char that doesn't fit starts the next part, so
    # an ESC is never separated from its code (a part may then hold one less).
    parts, used = 1, 0
    for ch in text:
        width = 2 if ch in doubles else 1
        used += width
        if used > capacity:
            parts += 1
            used = width
    return parts


def _pack_astral(text: str, capacity: int) -> int:
    # Same greedy fill as _pack, for surrogate pairs (chars above the BMP).
    parts, used = 1, 0
    for ch in text:
        width = 2 if ch > "\uffff" else 1
        used += width
        if used > capacity:
            parts += 1
            used = width
    return parts
