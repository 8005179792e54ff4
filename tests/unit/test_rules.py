"""Pure rules of the send path: parameters, numbers, bodies, passwords."""

from __future__ import annotations

import asyncio
from zoneinfo import ZoneInfo

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import passwords, phones
from gateway.send import params, responses
from gateway.send import request as rules
from gateway.send.request import SendRefused, parse


def test_params_case_aliases_encodings() -> None:
    got = params.parse(b"&ACCOUNT=a&SmsAccount=b&Login=x+y&message=caf%E9&to=%2B33&e=%C3%A9")
    assert got == {"account": "b", "login": "x y", "message": "café", "to": "+33", "e": "é"}
    assert params.parse(b"a&=1&b=") == {"a": "", "b": ""}
    assert params.parse(b"m=%ZZ%4") == {"m": "%ZZ%4"}  # broken escapes stay as written
    assert params.normalize_newlines("a\r\nb\rc\nd") == "a\nb\nc\nd"


@pytest.mark.parametrize(("raw", "e164"), [("+33612345678", "+33612345678"),
                                           ("0033612345678", "+33612345678"),
                                           (" +447911123456 ", "+447911123456")])
def test_numbers(raw: str, e164: str) -> None:
    assert phones.normalize(raw) == e164


@pytest.mark.parametrize("raw", ["0612345678", "+33", "+3361234567890123", "33612345678",
                                 "+33 6 12 34 56 78", "++33612345678", "+336123a5678", ""])
def test_invalid_numbers(raw: str) -> None:
    with pytest.raises(phones.InvalidNumber):
        phones.normalize(raw)


def _parsed_the_long_way(raw: str) -> str | None:
    """`phones.normalize` as it was before its shortcut: every number through `parse`."""
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _normalized(raw: str) -> str | None:
    try:
        return phones.normalize.__wrapped__(raw)
    except phones.InvalidNumber:
        return None


def _example_numbers() -> list[str]:
    found = set()
    for region in phonenumbers.SUPPORTED_REGIONS:
        for kind in phonenumbers.PhoneNumberType.values():
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                found.add(phonenumbers.format_number(number, 0))
    for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS:
        number = phonenumbers.example_number_for_non_geo_entity(code)
        if number is not None:
            found.add(phonenumbers.format_number(number, 0))
    return sorted(found)


def test_every_countrys_example_numbers_normalize_as_parse_has_them() -> None:
    examples = _example_numbers()
    assert len(examples) > 1000
    shortcut = 0
    for e164 in examples:
        assert phones.normalize(e164) == e164 == _parsed_the_long_way(e164), e164
        direct = phones._split(e164[1:])
        if direct is not None:
            assert direct == phonenumbers.parse(e164, None), e164
            shortcut += 1
    # Most numbers take the shortcut; Italy's leading zeros and the like go the long way.
    assert shortcut > 0.9 * len(examples)


@settings(max_examples=3000, deadline=None)
@given(code=st.sampled_from(sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)).map(str)
       | st.sampled_from(["0", "00", "01", "0033"]),
       national=st.text(alphabet="0123456789", min_size=0, max_size=16))
def test_the_shortcut_agrees_with_parse_on_any_digits(code: str, national: str) -> None:
    raw = f"+{code}{national}"
    assert _normalized(raw) == _parsed_the_long_way(raw)
    direct = phones._split(raw[1:])
    if direct is not None:
        assert direct == phonenumbers.parse(raw, None)


def test_a_national_prefix_or_leading_zero_goes_the_long_way() -> None:
    assert phones._split("390612345678") is None   # Rome: the 0 is part of the number
    assert phones._split("3306123456789") is None  # +33 then France's trunk prefix 0
    assert phones._split("0033612345678") is None
    assert phones._split("012025550123") is None    # not +1: no country code starts with 0
    with pytest.raises(phones.InvalidNumber):
        phones.normalize("+012025550123")
    assert phones._split("33612345678") == phonenumbers.parse("+33612345678", None)
    assert phones.normalize("+390612345678") == "+390612345678"


@pytest.mark.parametrize(("raw", "restored"), [
    (" 33612345678", "+33612345678"),     # to=+33612345678 typed unencoded
    (" 33612345678 ", "+33612345678"),
    ("+33612345678", "+33612345678"),
    (" 0033612345678", "0033612345678"),  # `to=a,+0033...`: a space, not a lost `+`
    ("33612345678", "33612345678"),        # no space: nothing was lost, still refused
    (" ACME", "ACME"),
    ("", ""),
])
def test_a_plus_the_query_made_a_space_is_given_back(raw: str, restored: str) -> None:
    assert phones.restore_plus(raw) == restored


@pytest.mark.parametrize(("typed", "declared", "used"), [
    ("+33700000001", {"33700000001"}, "33700000001"),   # declared without its +
    ("33700000001", {"+33700000001"}, "+33700000001"),  # declared with it
    ("+33700000001", {"+33700000001"}, "+33700000001"),
    ("ACME", {"ACME"}, "ACME"),
    ("+ACME", {"ACME"}, None),                          # the + is a number's only
    ("ACME", {"+ACME"}, None),
    ("33700000002", {"33700000001", "+33700000001"}, None),
])
def test_a_numeric_sender_matches_with_or_without_its_plus(typed: str, declared: set[str],
                                                           used: str | None) -> None:
    assert rules.declared_sender(typed, frozenset(declared)) == used


@pytest.mark.parametrize(("raw", "sender"), [
    (" 33700000001", "+33700000001"),  # from=+33700000001 typed unencoded
    (" 1AND1", "1AND1"),               # a space before letters is no lost +
    ("1AND1", "1AND1"),
])
def test_the_from_parameter_gets_its_plus_back_only_for_a_number(raw: str,
                                                                 sender: str) -> None:
    base = {"account": "a", "login": "l", "password": "p", "to": "+33612345678",
            "message": "hi"}
    parsed = parse({**base, "from": raw}, tz=ZoneInfo("UTC"), max_recipients=10)
    assert parsed.sender == sender


def test_bodies_escape_text() -> None:
    xml = responses.failure(responses.ContentType.XML, 202, "Invalid <to> & 'x'")
    assert "<message>Invalid &lt;to&gt; &amp; 'x'</message>" in xml
    html = responses.failure(responses.ContentType.HTML, 202, "a<b")
    assert "KO<br>a&lt;b<br>" in html
    assert responses.failure(responses.ContentType.JSON, 202, "é") == \
        '{"status":202,"message":"é"}'


def test_deferred_in_the_configured_zone() -> None:
    base = {"account": "a", "login": "l", "password": "p", "from": "F", "to": "+33612345678",
            "message": "m", "deferred": "183019072020"}
    paris = parse(base, tz=ZoneInfo("Europe/Paris"), max_recipients=5)
    utc = parse(base, tz=ZoneInfo("UTC"), max_recipients=5)
    assert utc.deferred_until is not None and paris.deferred_until is not None
    assert utc.deferred_until - paris.deferred_until == 7200
    for bad in ("183019132020", "12345", "2530190720201"):
        with pytest.raises(SendRefused) as err:
            parse({**base, "deferred": bad}, tz=ZoneInfo("UTC"), max_recipients=5)
        assert err.value.status == 202


def test_password_rule_and_hash() -> None:
    for bad in ("short1", "with space1", "accentué1", "dash-dash1", "x" * 129):
        with pytest.raises(passwords.InvalidPassword):
            passwords.validate(bad)
    assert passwords.validate("Abcd1234") == "Abcd1234"
    stored = passwords.hash_password("Abcd1234")
    assert "Abcd1234" not in stored and stored.startswith("scrypt$")
    assert passwords.verify("Abcd1234", stored)
    assert not passwords.verify("Abcd1235", stored)
    assert not passwords.verify("Abcd1234", "garbage")


def test_hash_cost_is_the_real_one_unless_pytest_lowers_it() -> None:
    variable = passwords.TEST_N_VARIABLE
    under_pytest = {"PYTEST_CURRENT_TEST": "tests/unit/test_rules.py::t (call)"}
    assert passwords.n_from_environment({}) == passwords.REAL_N == 2**14
    assert passwords.n_from_environment({**under_pytest, variable: ""}) == passwords.REAL_N
    assert passwords.n_from_environment({**under_pytest, variable: "2"}) == 2
    # A production host given a test's environment: the variable itself is the mistake.
    for value in ("2", "16384"):
        with pytest.raises(passwords.UnsafeHashCost, match="test suite only"):
            passwords.n_from_environment({variable: value})
    for bad in ("0", "1", "3", "-2", "32768", "2.0", "cheap"):
        with pytest.raises(passwords.UnsafeHashCost, match="power of two"):
            passwords.n_from_environment({**under_pytest, variable: bad})


def test_a_hash_carries_its_cost_and_verifies_at_any_other(real_hash_cost: int) -> None:
    real = passwords.hash_password("Abcd1234")
    cheap = passwords.hash_password("Abcd1234", n=2)
    assert real.startswith("scrypt$16384$8$1$") and cheap.startswith("scrypt$2$8$1$")
    assert passwords.verify("Abcd1234", real) and passwords.verify("Abcd1234", cheap)
    assert not passwords.verify("Abcd1235", cheap)


def test_the_decoy_is_hashed_once_per_process(monkeypatch: pytest.MonkeyPatch,
                                              real_hash_cost: int) -> None:
    monkeypatch.setattr(passwords, "_decoys", {})
    made: list[int | None] = []
    hash_password = passwords.hash_password

    def counting(password: str, *, n: int | None = None) -> str:
        made.append(n)
        return hash_password(password, n=n)

    monkeypatch.setattr(passwords, "hash_password", counting)
    decoys = {passwords.decoy_hash() for _ in range(3)}
    assert made == [passwords.REAL_N] and len(decoys) == 1
    assert decoys.pop().startswith("scrypt$16384$")


async def test_verification_cache_is_keyed_by_hash_and_password() -> None:
    cache = passwords.VerificationCache(size=2)
    old = passwords.hash_password("Abcd1234")
    new = passwords.hash_password("Efgh5678")
    results = await asyncio.gather(*(cache.verify("Abcd1234", old) for _ in range(5)))
    assert results == [True] * 5
    assert not await cache.verify("Abcd1234", new)  # password changed: no stale verdict
    assert await cache.verify("Efgh5678", new)
    assert not await cache.verify("Wrong999", old)


async def test_verification_cache_never_remembers_a_refusal() -> None:
    # Unknown logins share one decoy hash: a remembered refusal would answer them faster
    # than a real login, and tell which logins exist.
    cache = passwords.VerificationCache()
    stored = passwords.hash_password("Abcd1234")
    assert not await cache.verify("Wrong999", stored)
    assert not await cache.verify("Wrong999", stored)
    assert len(cache._verdicts) == 0
    assert await cache.verify("Abcd1234", stored)
    assert len(cache._verdicts) == 1


def test_deferred_at_most_the_given_days_ahead() -> None:
    paris = ZoneInfo("Europe/Paris")
    base = {"account": "a", "login": "l", "password": "p", "from": "ACME",
            "to": "+33612345678", "message": "hi"}
    now = 1_700_000_000.0  # 2023-11-14 23:13:20 in Paris
    day = 86400.0
    inside = parse({**base, "deferred": "231314112024"}, tz=paris, max_recipients=5,
                   now=now, max_deferral=366 * day)
    assert inside.deferred_until is not None and inside.deferred_until <= now + 366 * day
    for far in ("000016112024", "000001019999"):
        with pytest.raises(SendRefused) as refused:
            parse({**base, "deferred": far}, tz=paris, max_recipients=5, now=now,
                  max_deferral=366 * day)
        assert refused.value.status == 202
        assert refused.value.message == "Invalid deferred: at most 366 days ahead"
