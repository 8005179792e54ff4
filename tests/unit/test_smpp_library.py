"""Canaries: what the SMPP session relies on in smpplib, which has no annotations and
documents little of it. A new smpplib that changes any of this fails here first."""

from __future__ import annotations

import smpplib.smpp

from gateway.operators.smpp.session import _Sequence


def test_new_pdus_take_their_sequence_from_the_client() -> None:
    seq = _Sequence()
    first = smpplib.smpp.make_pdu("enquire_link", client=seq)
    second = smpplib.smpp.make_pdu("submit_sm", client=seq, source_addr="A",
                                   destination_addr="1", short_message=b"x")
    assert (first.sequence, second.sequence) == (1, 2)


def test_a_response_keeps_the_sequence_and_status_set_after_it_is_made() -> None:
    # The constructor ignores sequence= and status= (it keeps its own): the session sets
    # them afterwards (Session.respond).
    resp = smpplib.smpp.make_pdu("deliver_sm_resp", client=_Sequence())
    resp.sequence, resp.status = 77, 0x64
    data = resp.generate()
    assert data[8:16] == bytes.fromhex("00000064 0000004d")


def test_parsed_strings_are_bytes_and_tlvs_are_named() -> None:
    pdu = smpplib.smpp.make_pdu("deliver_sm", client=_Sequence(), source_addr="336",
                                destination_addr="SHOP", short_message=b"id:1",
                                esm_class=4, receipted_message_id="ab", message_state=2)
    parsed = smpplib.smpp.parse_pdu(pdu.generate(), client=_Sequence(),
                                    allow_unknown_opt_params=True)
    assert parsed.command == "deliver_sm" and parsed.source_addr == b"336"
    assert (parsed.receipted_message_id, parsed.message_state) == (b"ab", 2)
    assert parsed.short_message == b"id:1" and parsed.is_response() is False
