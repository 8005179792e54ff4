"""The outgoing list's filter (`service.outgoing_filter`), read alike by the admin API and
the console: the same values, the same errors."""

from __future__ import annotations

import pytest

from gateway.service import PTT_LIMIT, ValidationError, outgoing_filter


def stamp(name: str, raw: str, end: bool) -> float:
    """A stand-in for an edge's own reading of the period's bounds."""
    if raw == "bad":
        raise ValidationError(name, "a date")
    return float(raw) + (0.5 if end else 0.0)


def read(query: dict[str, str]) -> object:
    return outgoing_filter(7, query, login="shop", period=("since", "until"), moment=stamp)


def test_absent_values_filter_on_nothing_and_given_ones_are_read() -> None:
    empty = outgoing_filter(7, {}, login=None, period=("since", "until"), moment=stamp)
    assert (empty.account_id, empty.login, empty.tag, empty.ptt, empty.receiver, empty.sender,
            empty.created_from, empty.created_to) == (7, None, None, None, None, None, None,
                                                      None)
    where = outgoing_filter(7, {"tag": "a b", "ptt": " -4 ", "receiver": "0033612345678",
                                "sender": "ACME", "since": "10", "until": "20"},
                            login="shop", period=("since", "until"), moment=stamp)
    assert (where.login, where.tag, where.ptt, where.receiver, where.sender) == (
        "shop", "a b", -4, "+33612345678", "ACME")
    assert (where.created_from, where.created_to) == (10.0, 20.5)


def test_a_plus_turned_into_a_space_by_the_query_is_given_back() -> None:
    where = outgoing_filter(7, {"receiver": " 33612345678"}, login=None,
                            period=("since", "until"), moment=stamp)
    assert where.receiver == "+33612345678"


@pytest.mark.parametrize("query,message", [
    ({"ptt": "x"}, "ptt: an integer"),
    ({"ptt": "²"}, "ptt: an integer"),
    ({"ptt": ""}, "ptt: an integer"),
    ({"ptt": str(PTT_LIMIT + 1)}, f"ptt: between {-PTT_LIMIT} and {PTT_LIMIT}"),
    ({"receiver": "0612345678"}, "receiver: an international number such as +33612345678"),
    ({"until": "bad"}, "until: a date"),
    # The first parameter at fault is named, in the list's order.
    ({"ptt": "x", "receiver": "12", "since": "bad"}, "ptt: an integer"),
    ({"receiver": "12", "since": "bad"}, "receiver: an international number such as "
                                         "+33612345678"),
])
def test_a_bad_value_is_refused_with_its_parameter_named(query: dict[str, str],
                                                        message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        read(query)
    assert str(caught.value) == message
