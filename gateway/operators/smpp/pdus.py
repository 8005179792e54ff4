"""What goes into and comes out of SMPP PDUs: parts and their coding, receipts, inbound text.

Pure, no I/O. The PDUs themselves are smpplib's (`gateway.operators.smpp.session`); this
module decides their content:

- A message is split exactly as the send path counted and priced it
  (`gateway.encoding`): GSM 03.38 parts of 153 septets (160 alone), an extension character
  never split from its escape; UCS-2 parts of 67 units (70 alone), a surrogate pair never
  split. So the parts sent are the parts charged.
- GSM text is sent one septet an octet (the SMPP default alphabet, data_coding 0), or as
  IA5 / Latin-1 octets when the SMSC wants data_coding 1 or 3; UCS-2 is UTF-16-BE with
  data_coding 8. A flash message (class 0), one for the SIM (class 2) or the terminal
  equipment (class 3) is sent with the message-class data codings: 0x10, 0x12, 0x13 (GSM)
  and 0x18, 0x1A, 0x1B (UCS-2); class 1, the default, needs none.
- Long messages carry a concatenation UDH (`udh`, the default), SAR TLVs (`sar`), or the
  whole text in one `message_payload` (`payload`).
- A receipt's reference is `receipted_message_id` when present, else the `id:` of its
  text, rewritten as the SMSC wrote submit_sm_resp's message_id (`receipt_id`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway import encoding
from gateway.encoding import Coding

LongMessages = Literal["udh", "sar", "payload"]
ReceiptId = Literal["same", "decimal", "hex"]

# esm_class bits
ESM_UDHI = 0x40
ESM_RECEIPT = 0x04           # SMSC delivery receipt
ESM_TYPE_MASK = 0x3C
ESM_INTERMEDIATE = 0x20      # intermediate delivery notification

DC_UCS2 = 0x08
DC_GSM_CLASS0 = 0x10
DC_UCS2_CLASS0 = 0x18

# The same tables and sizes as the send path's (gateway/encoding.py): the parts sent are
# the parts counted and priced.
_GSM_SINGLE, _GSM_PART = encoding.GSM_SINGLE, encoding.GSM_PART
_UCS2_SINGLE, _UCS2_PART = encoding.UCS2_SINGLE, encoding.UCS2_PART
_GSM_BASIC = encoding.GSM_BASIC_TABLE
# Each extension character's code after the escape (GSM 03.38, 6.2.1.1).
_GSM_EXTENSION = {"\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C,
                  "~": 0x3D, "]": 0x3E, "|": 0x40, "€": 0x65}
_ENCODE_GSM = {ch: bytes([i]) for i, ch in enumerate(_GSM_BASIC) if ch != "\x1b"}
_ENCODE_GSM.update({ch: bytes([0x1B, code]) for ch, code in _GSM_EXTENSION.items()})
_DECODE_EXTENSION = {code: ch for ch, code in _GSM_EXTENSION.items()}


@dataclass(frozen=True, slots=True)
class Part:
    """The content of one submit_sm."""

    short_message: bytes
    data_coding: int
    esm_class: int = 0
    # smpplib's TLV names -> values (sar_*, message_payload)
    tlvs: dict[str, int | bytes] = field(default_factory=dict)


def gsm_encode(text: str) -> bytes:
    """GSM 03.38, one septet an octet (unpacked), extension characters as ESC + code."""
    return b"".join(_ENCODE_GSM[ch] for ch in text)


def gsm_decode(data: bytes) -> str:
    out: list[str] = []
    escape = False
    for byte in data:
        if escape:
            out.append(_DECODE_EXTENSION.get(byte, " "))
            escape = False
        elif byte == 0x1B:
            escape = True
        elif byte < len(_GSM_BASIC):
            out.append(_GSM_BASIC[byte])
        else:
            out.append("?")
    return "".join(out)


def split_text(body: str, coding: int) -> list[str]:
    """The text of each part, as `gateway.encoding.segment` counts them."""
    if Coding(coding) is Coding.GSM7:
        def width(ch: str) -> int:
            return 2 if ch in _GSM_EXTENSION else 1
        single, part = _GSM_SINGLE, _GSM_PART
    else:
        def width(ch: str) -> int:
            return 2 if ch > "\uffff" else 1
        single, part = _UCS2_SINGLE, _UCS2_PART
    if sum(width(ch) for ch in body) <= single:
        return [body]
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for ch in body:
        w = width(ch)
        if used + w > part:
            parts.append("".join(current))
            current, used = [], 0
        current.append(ch)
        used += w
    parts.append("".join(current))
    return parts


def data_coding(coding: int, klass: int, gsm_data_coding: int) -> int:
    """The data_coding of a message of `klass` (the send URL's `class`): 1 (the handset's
    display, the default) needs no class bits; 0 (flash), 2 (SIM) and 3 (terminal
    equipment) are the message-class codings, GSM 0x10-0x13 and UCS-2 0x18-0x1B."""
    if klass in (0, 2, 3):
        return (DC_UCS2_CLASS0 if Coding(coding) is Coding.UCS2 else DC_GSM_CLASS0) | klass
    return DC_UCS2 if Coding(coding) is Coding.UCS2 else gsm_data_coding


def is_ucs2(dc: int) -> bool:
    """UCS-2: data_coding 8, or a message-class coding with the UCS-2 alphabet (0x18-0x1B)."""
    return dc == DC_UCS2 or (dc & 0xF0 == 0x10 and dc & 0x0C == 0x08)


def encode_text(text: str, dc: int) -> bytes:
    if is_ucs2(dc):
        return text.encode("utf-16-be", "surrogatepass")
    if dc == 1:
        return text.encode("ascii", "replace")
    if dc == 3:
        return text.encode("latin-1", "replace")
    return gsm_encode(text)


def build_parts(body: str, coding: int, klass: int, *, gsm_data_coding: int = 0,
                long_messages: LongMessages = "udh", reference: int = 0) -> list[Part]:
    """The submit_sm contents of a message; `reference` (0-255, or 0-65535 with SAR) ties
    the parts of a long message together."""
    dc = data_coding(coding, klass, gsm_data_coding)
    texts = split_text(body, coding)
    if len(texts) == 1:
        return [Part(encode_text(body, dc), dc)]
    if long_messages == "payload":
        return [Part(b"", dc, 0, {"message_payload": encode_text(body, dc)})]
    total = len(texts)
    parts: list[Part] = []
    for seq, text in enumerate(texts, start=1):
        encoded = encode_text(text, dc)
        if long_messages == "sar":
            parts.append(Part(encoded, dc, 0, {"sar_msg_ref_num": reference & 0xFFFF,
                                               "sar_total_segments": total,
                                               "sar_segment_seqnum": seq}))
        else:
            udh = bytes([0x05, 0x00, 0x03, reference & 0xFF, total, seq])
            parts.append(Part(udh + encoded, dc, ESM_UDHI))
    return parts


# -- what the SMSC sends ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Receipt:
    reference: str
    stat: str
    err: str
    text: str


# A field starts the text or follows white space: `paid:99` holds no `id:`.
_FIELD = re.compile(r"(?:^|(?<=\s))(id|sub|dlvrd|submit date|done date|stat|err):\s*(\S*)",
                    re.IGNORECASE)
# `text:` is the message's first characters, written by whoever sent it: nothing after it
# is a field (an SMS reading "your id:99" must not name another message).
_TEXT = re.compile(r"(?:^|(?<=\s))text:", re.IGNORECASE)
# message_state TLV -> the stat of a receipt's text (SMPP 3.4, 5.2.28)
MESSAGE_STATES = {1: "ENROUTE", 2: "DELIVRD", 3: "EXPIRED", 4: "DELETED", 5: "UNDELIV",
                  6: "ACCEPTD", 7: "UNKNOWN", 8: "REJECTD"}


def is_receipt(esm_class: int) -> bool:
    return esm_class & ESM_TYPE_MASK in (ESM_RECEIPT, ESM_INTERMEDIATE)


def receipt_reference(text_id: str, receipt_id: ReceiptId) -> str:
    """A receipt text's `id:` written as submit_sm_resp wrote the message_id."""
    try:
        if receipt_id == "decimal":
            return format(int(text_id, 10), "x")
        if receipt_id == "hex":
            return str(int(text_id, 16))
    except ValueError:
        pass
    return text_id


def normalize_reference(message_id: str, receipt_id: ReceiptId) -> str:
    """submit_sm_resp's message_id as stored: hex ones lower-case without leading zeros
    when receipts write them in decimal, so that both meet."""
    if receipt_id == "decimal":
        try:
            return format(int(message_id, 16), "x")
        except ValueError:
            return message_id
    if receipt_id == "hex":
        try:
            return str(int(message_id, 10))
        except ValueError:
            return message_id
    return message_id


def parse_receipt(text: str, *, receipted_message_id: str | None = None,
                  message_state: int | None = None, receipt_id: ReceiptId = "same"
                  ) -> Receipt | None:
    text_starts = _TEXT.search(text)
    head = text[:text_starts.start()] if text_starts else text
    fields: dict[str, str] = {}
    for name, value in _FIELD.findall(head):
        fields.setdefault(name.lower(), value)  # the first: a repeated field is no override
    if receipted_message_id:
        reference = normalize_reference(receipted_message_id, receipt_id)
    elif fields.get("id"):
        reference = receipt_reference(fields["id"], receipt_id)
    else:
        return None
    stat = fields.get("stat", "").upper()
    if not stat and message_state is not None:
        stat = MESSAGE_STATES.get(message_state, "UNKNOWN")
    return Receipt(reference, stat or "UNKNOWN", fields.get("err", ""), text)


@dataclass(frozen=True, slots=True)
class Concatenation:
    reference: int
    total: int
    seq: int


def split_udh(short_message: bytes) -> tuple[Concatenation | None, bytes]:
    """The concatenation element of a UDH (8- or 16-bit reference) and the text after it."""
    if not short_message:
        return None, short_message
    length = short_message[0]
    header, rest = short_message[1:1 + length], short_message[1 + length:]
    pos = 0
    found: Concatenation | None = None
    while pos + 2 <= len(header):
        iei, iel = header[pos], header[pos + 1]
        data = header[pos + 2:pos + 2 + iel]
        if iei == 0x00 and iel == 3:
            found = Concatenation(data[0], data[1], data[2])
        elif iei == 0x08 and iel == 4:
            found = Concatenation((data[0] << 8) | data[1], data[2], data[3])
        pos += 2 + iel
    return found, rest


def decode_text(data: bytes, dc: int) -> str:
    """Inbound text: GSM (0, and class-coded 0x1x/0xFx GSM), IA5, Latin-1, UCS-2."""
    if is_ucs2(dc):
        return data.decode("utf-16-be", "replace")
    if dc == 1:
        return data.decode("ascii", "replace")
    if dc == 3:
        return data.decode("latin-1")
    if dc in (0, DC_GSM_CLASS0) or dc & 0xF0 in (0x10, 0xF0):
        return gsm_decode(data)
    return data.decode("latin-1")


# The deliver_sm fields that make a message from a handset what it is: a deliver_sm sent
# again (its answer missed, or after a reconnection) has the same, another message differs
# in one (its text, its part, the handset's message reference when the SMSC passes it).
FINGERPRINT_FIELDS = (
    "source_addr_ton", "source_addr_npi", "source_addr", "dest_addr_ton", "dest_addr_npi",
    "destination_addr", "esm_class", "protocol_id", "data_coding", "short_message",
    "message_payload", "sar_msg_ref_num", "sar_total_segments", "sar_segment_seqnum",
    "user_message_reference", "source_port", "destination_port",
    # Some SMSCs name each message from a handset (the same id when they send it again).
    "receipted_message_id",
)


def fingerprint(fields: Mapping[str, object]) -> str:
    """The reference of an inbound deliver_sm (SMPP 3.4 gives it none): a digest of its
    FINGERPRINT_FIELDS, so that one sent again is known (the store keeps it once)."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FIELDS:
        value = fields.get(name)
        data = value if isinstance(value, bytes) else \
            ("" if value is None else str(value)).encode()
        digest.update(name.encode() + len(data).to_bytes(4, "big") + data)
    return "smpp-" + digest.hexdigest()[:32]


TON_UNKNOWN, TON_INTERNATIONAL = 0, 1


def inbound_number(addr: str, ton: int) -> str:
    """A number of a deliver_sm as the gateway writes numbers: E.164 (`+33612345678`) when
    its TON says international (the SMSC may still write a `+` or `00`), or when unknown
    and it reads so (digits not starting with 0: the usual international number without
    its `+`); anything else as the SMSC wrote it: a national number (TON 2, or unknown
    starting with 0) cannot be made international without knowing its country, and an
    alphanumeric sender is no number."""
    text = addr.strip()
    if ton not in (TON_UNKNOWN, TON_INTERNATIONAL):
        return text
    if text.startswith("+"):
        digits = text[1:]
    elif text.startswith("00"):
        digits = text[2:]
    elif ton == TON_INTERNATIONAL or not text.startswith("0"):
        digits = text
    else:
        return text
    return "+" + digits if digits.isdigit() else text
