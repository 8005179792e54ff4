from __future__ import annotations

import dataclasses

import pytest

from gateway.ptt import (
    DLR_TEXT,
    FINAL_FAILURE_CODES,
    INTERMEDIATE_CODES,
    PTTS,
    Dlr,
    Duration,
    Ptt,
    as_api_dict,
    lookup,
)

# The product spec's list, restated independently so a table edit that drops
# or reclassifies a code fails here rather than in a downstream callback.
SPEC_CODES = {
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    20,
    21,
    23,
    24,
    25,
    26,
    27,
    28,
    29,
    33,
    39,
    73,
    74,
    76,
    202,
}
NON_FINAL = {1, 2, 3, 24, 25, 26, 74}
RETRYING = {1, 2, 24, 25, 26, 74}
NOT_BILLED = {20, 23, 28, 29, 76, 202}
PERMANENT = {4, 20, 23, 27, 28, 29, 33, 73, 76, 202}
INDETERMINATED = {5, 6, 39}


def test_every_spec_code_is_present_and_nothing_else() -> None:
    assert set(PTTS) == SPEC_CODES
    for code, p in PTTS.items():
        assert p.code == code
        assert p.description.strip()
        assert p.comment.strip()


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_finality(code: int) -> None:
    assert PTTS[code].final is (code not in NON_FINAL)


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_duration_class(code: int) -> None:
    p = PTTS[code]
    if code in PERMANENT:
        assert p.duration is Duration.PERMANENT
    elif code in INDETERMINATED:
        assert p.duration is Duration.INDETERMINATED
    else:
        assert p.duration is Duration.TEMPORARY


def test_non_final_states_are_all_temporary() -> None:
    for code in NON_FINAL:
        assert PTTS[code].duration is Duration.TEMPORARY


def test_dlr_of_intermediate_states() -> None:
    assert PTTS[3].dlr is Dlr.WAITING
    for code in RETRYING:
        assert PTTS[code].dlr is Dlr.BUFFERED


def test_delivered_is_success_and_billed() -> None:
    p = PTTS[4]
    assert p.final
    assert p.dlr is Dlr.SUCCESS
    assert p.billed
    assert p.duration is Duration.PERMANENT


def test_not_billed_set_is_exactly_not_billed_dlr() -> None:
    assert {c for c, p in PTTS.items() if not p.billed} == NOT_BILLED
    assert {c for c, p in PTTS.items() if p.dlr is Dlr.NOT_BILLED} == NOT_BILLED
    for p in PTTS.values():
        assert p.billed is (p.dlr is not Dlr.NOT_BILLED)


def test_other_final_failures_are_failed() -> None:
    for code in set(FINAL_FAILURE_CODES) - NOT_BILLED:
        assert PTTS[code].dlr is Dlr.FAILED


def test_code_groups() -> None:
    assert set(INTERMEDIATE_CODES) == RETRYING
    assert len(INTERMEDIATE_CODES) == len(set(INTERMEDIATE_CODES))
    assert set(FINAL_FAILURE_CODES) == SPEC_CODES - NON_FINAL - {4}
    assert len(FINAL_FAILURE_CODES) == len(set(FINAL_FAILURE_CODES))
    assert all(PTTS[c].final for c in FINAL_FAILURE_CODES)
    assert not any(PTTS[c].final for c in INTERMEDIATE_CODES)


def test_lookup() -> None:
    assert lookup(4) is PTTS[4]
    assert lookup(202) is PTTS[202]
    for unknown in (0, 7, 22, 75, 201, 999, -1):
        assert lookup(unknown) is None


@pytest.mark.parametrize("code", sorted(SPEC_CODES))
def test_as_api_dict_shape(code: int) -> None:
    p = PTTS[code]
    d = as_api_dict(p)
    assert set(d) == {"description", "comment", "duration"}
    assert all(type(v) is str for v in d.values())
    assert d["duration"] in {"permanent", "temporary", "indeterminated"}
    assert d == {
        "description": p.description,
        "comment": p.comment,
        "duration": p.duration.value,
    }


def test_as_api_dict_returns_a_fresh_dict() -> None:
    d = as_api_dict(PTTS[4])
    d["description"] = "changed"
    assert as_api_dict(PTTS[4])["description"] != "changed"


def test_duration_values_match_ovh_enum() -> None:
    assert {d.value for d in Duration} == {"permanent", "temporary", "indeterminated"}


def test_dlr_ids() -> None:
    assert {d.name: int(d) for d in Dlr} == {
        "PENDING": 0,
        "SUCCESS": 1,
        "FAILED": 2,
        "WAITING": 4,
        "BUFFERED": 8,
        "NOT_BILLED": 16,
    }


def test_dlr_text_covers_every_member() -> None:
    assert set(DLR_TEXT) == set(Dlr)
    assert all(text.strip() for text in DLR_TEXT.values())


def test_ptts_is_immutable() -> None:
    with pytest.raises(TypeError):
        PTTS[4] = PTTS[5]  # type: ignore[index]
    with pytest.raises(TypeError):
        del PTTS[4]  # type: ignore[attr-defined]
    assert not hasattr(PTTS, "pop")
    with pytest.raises(dataclasses.FrozenInstanceError):
        PTTS[4].billed = False  # type: ignore[misc]


def test_dlr_text_is_immutable() -> None:
    with pytest.raises(TypeError):
        DLR_TEXT[Dlr.SUCCESS] = "x"  # type: ignore[index]


def test_ptt_rejects_inconsistent_billing() -> None:
    with pytest.raises(ValueError):
        Ptt(999, "d", "c", Duration.PERMANENT, True, Dlr.NOT_BILLED, True)
    with pytest.raises(ValueError):
        Ptt(999, "d", "c", Duration.PERMANENT, True, Dlr.FAILED, False)


def test_ptt_rejects_inconsistent_finality() -> None:
    with pytest.raises(ValueError):
        Ptt(999, "d", "c", Duration.TEMPORARY, True, Dlr.BUFFERED, True)
    with pytest.raises(ValueError):
        Ptt(999, "d", "c", Duration.PERMANENT, False, Dlr.SUCCESS, True)
