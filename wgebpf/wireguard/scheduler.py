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
    kernel's timer_list: arming a pending timer moves its deadline.

    A timer has at most one live entry in the scheduler's heap. Re-arming it
    later (the common case: every packet pushes persistent_keepalive back)
    only moves `deadline`; the old entry stays, fires early, and is put back
    at the real deadline. Only moving a deadline earlier needs a new entry,
    and the stale one it leaves is swept by Scheduler._compact."""

    __slots__ = ("scheduler", "callback", "deadline", "_token", "_queued_for")

    def __init__(self, scheduler: "Scheduler", callback: Callable[[], None]):
        self.scheduler = scheduler
        self.callback = callback
        self.deadline: float | None = None
        self._token = 0                 # sequence number of the live heap entry, 0: none
        self._queued_for = 0.0          # the live entry's deadline

    @property
    def pending(self) -> bool:
        return self.deadline is not None

    def mod(self, delay: float) -> None:
        self.deadline = self.scheduler.clock.monotonic() + delay
        if self._token and self._queued_for <= self.deadline:
            return                      # the entry comes up first and is re-queued then
        self.scheduler._queue(self)

    def cancel(self) -> None:
        # The heap entry stays (one per timer at most): it is dropped when it
        # comes up, or reused if the timer is re-armed for later.
        self.deadline = None


class Scheduler:
    # Rebuild the heap when stale entries are this many and outnumber the live ones.
    COMPACT_AFTER = 64

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or Clock()
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count(1)
        self._stale = 0

    def timer(self, callback: Callable[[], None]) -> Timer:
        return Timer(self, callback)

    def _queue(self, timer: Timer) -> None:
        """Give the timer a heap entry at its deadline (any older one goes stale)."""
        if timer._token:
            self._stale += 1
        token = next(self._seq)
        timer._token, timer._queued_for = token, timer.deadline
        heapq.heappush(self._heap, (timer.deadline, token, timer))
        if self._stale > self.COMPACT_AFTER and 2 * self._stale > len(self._heap):
            self._compact()

    def discard(self, timers) -> None:
        """Cancel these timers for good and take their entries out of the heap
        now, so the heap keeps no callback (nor the peer behind it) alive."""
        gone = set(map(id, timers))
        for timer in timers:
            timer.deadline, timer._token = None, 0
        self._heap = [entry for entry in self._heap if id(entry[2]) not in gone]
        self._compact()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2]._token == entry[1]]
        heapq.heapify(self._heap)
        self._stale = 0

    def _pop_live(self, now: float | None) -> Timer | None:
        """Pop the head entry; return its timer if it is due to fire at `now`
        (None: only tidy up). A timer re-armed for later goes back in the heap."""
        _, token, timer = heapq.heappop(self._heap)
        if timer._token != token:
            self._stale -= 1
            return None
        timer._token = 0
        if timer.deadline is None:
            return None                 # cancelled
        if now is None or timer.deadline > now:
            self._queue(timer)          # moved later since it was queued
            return None
        return timer

    def next_deadline(self) -> float | None:
        """Seconds until the next live timer fires (None: no timer armed)."""
        while self._heap:
            deadline, token, timer = self._heap[0]
            if timer._token == token and timer.deadline == deadline:
                return max(0.0, deadline - self.clock.monotonic())
            self._pop_live(None)
        return None

    def run_due(self) -> int:
        """Fire every timer whose deadline has passed; returns how many fired."""
        fired = 0
        now = self.clock.monotonic()
        while self._heap and self._heap[0][0] <= now:
            timer = self._pop_live(now)
            if timer is None:
                continue
            timer.deadline = None
            timer.callback()
            fired += 1
        return fired
