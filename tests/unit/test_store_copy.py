"""The pure decisions of `http2sms store copy` (gateway/store/copy.py)."""

from __future__ import annotations

from gateway.store.copy import TableCount, check, schema_differences, table_order

GOOD = {"purchased": 1000, "spent": 300, "balances": 600, "quotas": 100,
        "ledger_balances": 600, "ledger_quotas": 100}


def test_tables_go_in_the_order_of_their_references_then_by_name() -> None:
    assert table_order(["ledger", "zeta", "messages", "accounts", "alpha"]) == [
        "accounts", "messages", "ledger", "alpha", "zeta"]


def test_schemas_must_have_the_same_tables_and_columns_in_any_order() -> None:
    assert schema_differences({"a": ("x", "y")}, {"a": ("y", "x")}) == []
    assert schema_differences({"a": ("x",), "b": ("z",)}, {"a": ("x", "y"), "c": ("z",)}) == [
        "table a differs in columns: y", "table b is missing on the target",
        "table c is missing on the source"]


def test_a_faithful_copy_passes_the_check() -> None:
    assert check([TableCount("messages", 5, 5, 5)], GOOD, dict(GOOD)) == []


def test_rows_lost_on_the_way_are_named() -> None:
    (problem,) = check([TableCount("messages", 5, 5, 4)], GOOD, GOOD)
    assert problem == "messages: 5 rows in the source, 5 copied, 4 in the target"


def test_a_broken_ledger_on_either_side_is_named() -> None:
    broken = {**GOOD, "balances": 601, "ledger_balances": 601}
    problems = check([], GOOD, broken)
    assert problems[0] == "target: purchased 1000 <> balances 601 + quotas 100 + spent 300"
    assert problems[-1].startswith("the ledger totals differ")
