from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.encoding import (
    MAX_PARTS,
    Coding,
    EncodingError,
    Segmentation,
    detect_coding,
    is_gsm7,
    segment,
)

# Written out independently of the module (one string per row of the
# 03.38 table, ESC omitted) so a typo in either copy shows up as a failure.
GSM_BASIC_CHARS = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
GSM_EXTENSION_CHARS = "\f^{}\\[~]|€"
EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair in UTF-16


def test_basic_table_has_127_user_chars() -> None:
    assert len(GSM_BASIC_CHARS) == 127
    assert len(set(GSM_BASIC_CHARS)) == 127


def test_coding_values_match_url_parameter() -> None:
    assert Coding.GSM7 == 1
    assert Coding.UCS2 == 2
    assert MAX_PARTS == 6


@pytest.mark.parametrize("ch", list(GSM_BASIC_CHARS))
def test_every_basic_char_is_gsm7_single_septet(ch: str) -> None:
    assert is_gsm7(ch)
    assert detect_coding(ch) is Coding.GSM7
    assert segment(ch) == Segmentation(Coding.GSM7, 1, 1)


@pytest.mark.parametrize("ch", list(GSM_EXTENSION_CHARS))
def test_every_extension_char_counts_two_septets(ch: str) -> None:
    assert is_gsm7(ch)
    assert segment(ch) == Segmentation(Coding.GSM7, 2, 1)


def test_esc_is_not_a_user_character() -> None:
    assert not is_gsm7("\x1b")
    assert detect_coding("\x1b") is Coding.UCS2


@pytest.mark.parametrize("ch", ["ç", "á", "`", "\t", "\x1b", "Ё", "中", EMOJI])
def test_non_gsm_chars_force_ucs2(ch: str) -> None:
    text = "Hello " + ch
    assert not is_gsm7(text)
    assert detect_coding(text) is Coding.UCS2
    assert segment(text).coding is Coding.UCS2


def test_whole_alphabet_is_gsm7() -> None:
    text = GSM_BASIC_CHARS + GSM_EXTENSION_CHARS
    assert detect_coding(text) is Coding.GSM7
    assert segment(text).units == 127 + 2 * 10


def test_empty_text() -> None:
    assert segment("") == Segmentation(Coding.GSM7, 0, 1)
    assert segment("", Coding.UCS2) == Segmentation(Coding.UCS2, 0, 1)
    assert segment("", Coding.GSM7) == Segmentation(Coding.GSM7, 0, 1)


@pytest.mark.parametrize(
    ("length", "parts"),
    [(1, 1), (160, 1), (161, 2), (306, 2), (307, 3), (918, 6), (919, 7)],
)
def test_gsm_boundaries(length: int, parts: int) -> None:
    assert segment("a" * length) == Segmentation(Coding.GSM7, length, parts)


@pytest.mark.parametrize(
    ("length", "parts"),
    [(1, 1), (70, 1), (71, 2), (134, 2), (135, 3), (402, 6), (403, 7)],
)
def test_ucs2_boundaries(length: int, parts: int) -> None:
    assert segment("ж" * length) == Segmentation(Coding.UCS2, length, parts)


def test_forced_ucs2_on_ascii() -> None:
    assert segment("a" * 70, Coding.UCS2) == Segmentation(Coding.UCS2, 70, 1)
    assert segment("a" * 71, Coding.UCS2) == Segmentation(Coding.UCS2, 71, 2)
    # GSM-only characters are ordinary single BMP code units in UCS-2.
    assert segment("€" * 10, Coding.UCS2) == Segmentation(Coding.UCS2, 10, 1)


def test_forced_gsm7_with_non_gsm_char_raises() -> None:
    with pytest.raises(EncodingError, match=repr("ç")):
        segment("Ça va, ça va", Coding.GSM7)
    # EncodingError is a ValueError so generic handlers catch it too.
    with pytest.raises(ValueError):
        segment(EMOJI, Coding.GSM7)


def test_forced_gsm7_accepts_gsm_text() -> None:
    assert segment("a€", Coding.GSM7) == Segmentation(Coding.GSM7, 3, 1)


def test_euro_fills_single_sms() -> None:
    assert segment("€" * 80) == Segmentation(Coding.GSM7, 160, 1)
    assert segment("€" * 81) == Segmentation(Coding.GSM7, 162, 2)


def test_extension_char_not_split_across_parts() -> None:
    # 152 + 2 = 154 > 153: the € must move whole to part 2.
    text = "a" * 152 + "€" + "a" * 152
    seg = segment(text)
    assert seg.units == 306
    # Naive 306 / 153 would say 2; part 1 holds only 152 septets.
    assert seg.parts == 3


def test_extension_char_exactly_filling_a_part() -> None:
    text = "a" * 151 + "€" + "a" * 153
    assert segment(text) == Segmentation(Coding.GSM7, 306, 2)


def test_emoji_counts_two_units() -> None:
    assert segment(EMOJI) == Segmentation(Coding.UCS2, 2, 1)
    assert segment(EMOJI * 35) == Segmentation(Coding.UCS2, 70, 1)
    assert segment(EMOJI * 36) == Segmentation(Coding.UCS2, 72, 2)


def test_surrogate_pair_not_split_across_parts() -> None:
    text = "ж" * 66 + EMOJI + "ж" * 66
    seg = segment(text)
    assert seg.units == 134
    assert seg.parts == 3
    assert segment("ж" * 65 + EMOJI + "ж" * 67) == Segmentation(Coding.UCS2, 134, 2)


def test_invalid_coding_rejected() -> None:
    with pytest.raises(ValueError):
        segment("abc", 3)  # type: ignore[arg-type]


@given(st.text())
def test_parts_consistent_with_units(text: str) -> None:
    seg = segment(text)
    single = 160 if seg.coding is Coding.GSM7 else 70
    assert seg.parts >= 1
    assert (seg.parts == 1) == (seg.units <= single)


@given(st.text(alphabet=GSM_BASIC_CHARS + GSM_EXTENSION_CHARS))
def test_gsm_text_property(text: str) -> None:
    seg = segment(text)
    assert seg.coding is Coding.GSM7
    assert seg.units == len(text) + sum(ch in GSM_EXTENSION_CHARS for ch in text)
    assert seg.parts >= 1
    assert (seg.parts == 1) == (seg.units <= 160)
