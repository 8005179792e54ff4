"""The retention rules (gateway.retention) and the purge's plans (gateway.store.rules)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway import export, retention
from gateway.retention import DAY, AccountRetention, Retention
from gateway.store import rules

DEFAULTS = Retention(personal_data_days=90, messages_days=400)


def test_a_french_mobile_number_keeps_its_prefix_and_last_two_digits() -> None:
    assert retention.mask_number("+33612345678") == "+33612****78"


@given(st.text(alphabet="+0123456789", max_size=20))
def test_a_masked_number_hides_its_middle_and_masking_twice_changes_nothing(
        number: str) -> None:
    masked = retention.mask_number(number)
    assert len(masked) == len(number)
    assert masked.count(retention.MASK) >= min(len(number), 4)
    assert retention.mask_number(masked) == masked
    shown = [(a, b) for a, b in zip(number, masked, strict=True) if b != retention.MASK]
    assert all(a == b for a, b in shown)


def test_an_account_s_days_override_the_server_s_and_texts_never_outlive_messages() -> None:
    assert retention.effective(DEFAULTS, AccountRetention(1, "a")) == DEFAULTS
    assert retention.effective(DEFAULTS, AccountRetention(1, "a", messages_days=30)) == \
        Retention(30, 30)
    assert retention.effective(DEFAULTS, AccountRetention(1, "a", 3650, 7)) == \
        Retention(7, 3650)
    # 0: kept. Personal data kept as long as its message, messages forever.
    assert retention.effective(DEFAULTS, AccountRetention(1, "a", 0, 0)) == Retention(0, 0)
    assert retention.effective(DEFAULTS, AccountRetention(1, "a", 100, 0)) == \
        Retention(100, 100)


def test_data_is_due_the_instant_its_days_are_over() -> None:
    now = 1_800_000_000.0
    cut = retention.cutoffs(now, DEFAULTS)
    assert cut.erase_before == now - 90 * DAY and cut.delete_before == now - 400 * DAY
    assert not retention.due(now - 90 * DAY, cut.erase_before)
    assert retention.due(now - 90 * DAY - 0.001, cut.erase_before)
    assert retention.cutoffs(now, Retention(0, 0)) == retention.Cutoffs(None, None)
    assert not retention.due(0.0, None)


def test_an_erasure_stops_at_the_first_row_not_due_and_holds_unsent_ones() -> None:
    rows = [(1, 10.0, "final", "+33612345678"), (2, 11.0, "queued", "+33612345679"),
            (3, 12.0, "final", "+33612345670"), (4, 50.0, "final", "+33600000000")]
    plan = rules.erasure(rows, 20.0, limit=10)
    assert plan.erase == [(1, "+33612****78"), (3, "+33612****70")]
    assert (plan.hold, plan.last_id, plan.done) == ([2], 3, True)
    full = rules.erasure(rows[:3], 20.0, limit=3)
    assert (full.last_id, full.done) == (3, False)  # a full batch: maybe more after it


def test_a_deletion_takes_final_rows_due_and_passes_over_the_others() -> None:
    plan = rules.deletion([(1, 1.0, "final"), (2, 2.0, "sent"), (3, 3.0, "final"),
                           (4, 9.0, "final")], 5.0, limit=4)
    assert (plan.delete, plan.held, plan.last_id, plan.done) == ([1, 3], 1, 3, True)


def test_finished_outbox_items_go_by_their_account_s_days() -> None:
    rows = [(1, 7, 1.0, "done"), (2, 8, 1.0, "done"), (3, 7, 2.0, "pending"),
            (4, 9, 3.0, "dead"), (5, 7, 50.0, "done")]
    plan = rules.outbox_deletion(rows, {7: 10.0, 8: None}, 5.0, limit=10)
    assert (plan.delete, plan.last_id, plan.done) == ([1, 4], 4, True)


def test_the_ledger_identity_names_what_breaks_it() -> None:
    sound = {"purchased": 10, "spent": 3, "balances": 5, "quotas": 2, "ledger_balances": 5,
             "ledger_quotas": 2}
    assert rules.ledger_problems(sound) == []
    assert len(rules.ledger_problems({**sound, "balances": 6})) == 2


def test_export_bounds_take_days_or_times() -> None:
    start = export.parse_bound("2026-11-23")
    assert export.parse_bound("2026-11-23", end=True) == start + DAY - 0.000001
    assert export.parse_bound("2026-11-23T10:00:00Z", end=True) == start + 36000.999999
    try:
        export.parse_bound("23/11/2026")
    except ValueError:
        pass
    else:
        raise AssertionError("a day in another format is refused")


def test_a_csv_export_starts_with_ovh_s_names_and_defuses_formulas() -> None:
    assert export.header("csv").startswith("id,creationDatetime,login,sender,receiver,tag,"
                                           "numberOfSms,credits,ptt,deliveryReceipt,")
    assert export._csv_line(["=1+1", "+33612****78", "-x"]) == "'=1+1,+33612****78,'-x\r\n"


def test_a_csv_export_defuses_a_formula_behind_a_tab_or_a_carriage_return() -> None:
    # OWASP's list: a cell starting with a tab or a carriage return is a formula too in
    # some spreadsheets once they trim it.
    assert export._csv_line(["\t=cmd", "\r=cmd"]) == "'\t=cmd,\"'\r=cmd\"\r\n"
