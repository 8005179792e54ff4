"""The wait before a supervisor starts a dead process again (gateway.restarts)."""

from __future__ import annotations

from gateway.restarts import RestartDelay


def test_quick_deaths_double_the_wait_up_to_the_cap() -> None:
    delay = RestartDelay(1.0, longest=30.0, healthy=60.0)
    assert [delay.after(0.5) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_process_that_ran_long_enough_starts_again_at_the_first_wait() -> None:
    delay = RestartDelay(1.0, longest=30.0, healthy=60.0)
    for _ in range(4):
        delay.after(1.0)
    assert delay.after(61.0) == 1.0
    assert delay.after(1.0) == 2.0


def test_a_first_wait_longer_than_the_cap_is_kept() -> None:
    delay = RestartDelay(45.0, longest=30.0)
    assert [delay.after(0.0) for _ in range(2)] == [45.0, 45.0]
