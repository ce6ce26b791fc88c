"""Timers over an injectable clock.

Everything time-dependent in wgebpf reads time through a Clock and arms
Timers on a Scheduler, so unit tests drive hours of protocol time with a
FakeClock and no sleeping. The real event loop asks the scheduler how long it
may sleep (`next_deadline`) and calls `run_due` when it wakes.
"""

import heapq
import itertools
import time
from typing import Callable


class Clock:
    """Monotonic time for protocol timers, wall time for `last handshake`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock(Clock):
    def __init__(self, start: float = 1000.0, wall_offset: float = 1.7e9):
        self.now = start
        self.wall_offset = wall_offset

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self.wall_offset

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Timer:
    """A one-shot timer that can be re-armed (`mod`) or cancelled, like the
    kernel's timer_list: arming a pending timer moves its deadline."""

    __slots__ = ("scheduler", "callback", "deadline", "_token")

    def __init__(self, scheduler: "Scheduler", callback: Callable[[], None]):
        self.scheduler = scheduler
        self.callback = callback
        self.deadline: float | None = None
        self._token = 0

    @property
    def pending(self) -> bool:
        return self.deadline is not None

    def mod(self, delay: float) -> None:
        self.deadline = self.scheduler.clock.monotonic() + delay
        self._token = self.scheduler._push(self)

    def cancel(self) -> None:
        self.deadline = None
        self._token = 0


class Scheduler:
    def __init__(self, clock: Clock | None = None):
        self.clock = clock or Clock()
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count(1)

    def timer(self, callback: Callable[[], None]) -> Timer:
        return Timer(self, callback)

    def _push(self, timer: Timer) -> int:
        token = next(self._seq)
        heapq.heappush(self._heap, (timer.deadline, token, timer))
        return token

    def next_deadline(self) -> float | None:
        """Seconds until the next live timer fires (None: no timer armed)."""
        while self._heap:
            deadline, token, timer = self._heap[0]
            if timer._token == token and timer.deadline is not None:
                return max(0.0, deadline - self.clock.monotonic())
            heapq.heappop(self._heap)      # stale entry of a re-armed/cancelled timer
        return None

    def run_due(self) -> int:
        """Fire every timer whose deadline has passed; returns how many fired."""
        fired = 0
        now = self.clock.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, token, timer = heapq.heappop(self._heap)
            if timer._token != token or timer.deadline is None:
                continue
            timer.deadline = None
            timer._token = 0
            timer.callback()
            fired += 1
        return fired
