"""How long a supervisor waits before it starts a dead process again.

A process that dies soon after each start (a bug met by every request, a store that keeps
refusing it) would otherwise be started every second for ever, each start logging its
error and taking a core for its imports. The wait doubles with each quick death, up to a
cap, and starts over once a process has run long enough to count as healthy.
"""

from __future__ import annotations

# A process that ran this long died of something new: the next start waits the least.
HEALTHY_SECONDS = 60.0
LONGEST_SECONDS = 30.0


class RestartDelay:
    def __init__(self, first: float, *, longest: float = LONGEST_SECONDS,
                 healthy: float = HEALTHY_SECONDS) -> None:
        self._first = first
        self._longest = max(first, longest)
        self._healthy = healthy
        self._next = first

    def after(self, ran_for: float) -> float:
        """The wait before the next start of a process that ran `ran_for` seconds."""
        if ran_for >= self._healthy:
            self._next = self._first
        delay = self._next
        self._next = min(self._next * 2, self._longest)
        return delay
