"""The replay window, table-driven.

The step tables are the cases of kernel WireGuard's counter self-test
(drivers/net/wireguard/selftest/counter.c), rewritten as Python data: each
step is (counter, expected verdict) against one window that lives for the
whole table.
"""

import random

import pytest

from wgebpf.wireguard.messages import REJECT_AFTER_MESSAGES
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE, ReplayWindow

W = COUNTER_WINDOW_SIZE
T_LIM = W + 1
R = REJECT_AFTER_MESSAGES

# The kernel's 34 numbered steps, in order, one window throughout.
KERNEL_STEPS = [
    (0, True),                       # 1
    (1, True),                       # 2
    (1, False),                      # 3  replay
    (9, True),                       # 4  skip ahead
    (8, True),                       # 5  fill in behind
    (7, True),                       # 6
    (7, False),                      # 7
    (T_LIM, True),                   # 8  0 now just leaves the window
    (T_LIM - 1, True),               # 9
    (T_LIM - 1, False),              # 10
    (T_LIM - 2, True),               # 11
    (2, True),                       # 12 exactly at the window's far edge
    (2, False),                      # 13
    (T_LIM + 16, True),              # 14
    (3, False),                      # 15 fell out of the window
    (T_LIM + 16, False),             # 16
    (T_LIM * 4, True),               # 17 a big jump
    (T_LIM * 4 - (T_LIM - 1), True), # 18 = top - W: still inside
    (10, False),                     # 19
    (T_LIM * 4 - T_LIM, False),      # 20 = top - W - 1: outside
    (T_LIM * 4 - (T_LIM + 1), False),  # 21
    (T_LIM * 4 - (T_LIM - 2), True), # 22
    (T_LIM * 4 + 1 - T_LIM, False),  # 23 replay of step 18
    (0, False),                      # 24
    (R, False),                      # 25 the REJECT limit itself
    (R - 1, True),                   # 26 the last usable counter
    (R, False),                      # 27
    (R - 1, False),                  # 28
    (R - 2, True),                   # 29
    (R + 1, False),                  # 30
    (R + 2, False),                  # 31
    (R - 2, False),                  # 32
    (R - 3, True),                   # 33
    (0, False),                      # 34
]


def _kernel_loops():
    """The kernel's loop cases, each a fresh window and a list of steps."""
    yield "ascending then 0 at the edge", (
        [(i, True) for i in range(1, W + 1)] + [(0, True), (0, False)])
    yield "ascending from 2 then 1 at the edge", (
        [(i, True) for i in range(2, W + 2)] + [(1, True), (0, False)])
    yield "descending to 0", [(i, True) for i in range(W, -1, -1)]
    yield "descending to 1 then 0 is one too far", (
        [(i, True) for i in range(W + 1, 0, -1)] + [(0, False)])
    yield "descending then new top then 0", (
        [(i, True) for i in range(W, 0, -1)] + [(W + 1, True), (0, False)])
    yield "descending then 0 then new top", (
        [(i, True) for i in range(W, 0, -1)] + [(0, True), (W + 1, True)])


CASES = [("kernel steps 1-34", KERNEL_STEPS), *_kernel_loops()]


@pytest.mark.parametrize("steps", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_kernel_counter_cases(steps):
    window = ReplayWindow()
    for number, (counter, expected) in enumerate(steps, 1):
        # would_accept must predict accept exactly, and not change anything.
        assert window.would_accept(counter) is expected, (number, counter)
        assert window.accept(counter) is expected, (number, counter)


def test_would_accept_has_no_side_effect():
    window = ReplayWindow()
    assert window.would_accept(5)
    assert window.would_accept(5)
    assert window.accept(5)
    assert not window.would_accept(5)
    assert window.would_accept(4)


@pytest.mark.parametrize("counter", [-1, R, R + 1, 2**64 - 1, 2**64])
def test_out_of_range_counters_are_rejected(counter):
    window = ReplayWindow()
    assert not window.would_accept(counter)
    assert not window.accept(counter)


def test_reset_forgets_everything():
    window = ReplayWindow()
    assert window.accept(100_000)
    assert not window.accept(0)
    window.reset()
    assert window.accept(0)
    assert window.accept(100_000)


def test_random_order_within_the_window():
    # Reordering by up to the window size (e.g. across parallel workers or a
    # multipath underlay) must lose nothing, and replaying must win nothing.
    rng = random.Random(6479)
    counters = list(range(W + 1))
    rng.shuffle(counters)
    window = ReplayWindow()
    assert all(window.accept(c) for c in counters)
    rng.shuffle(counters)
    assert not any(window.accept(c) for c in counters)


def _naive_verdict(seen: set[int], top: int, counter: int) -> bool:
    """The window's contract, stated directly: new, recent enough, in range.

    `top` is the highest counter in `seen` (ignored while `seen` is empty).
    """
    if counter >= R or counter in seen:
        return False
    return not seen or counter >= top - W


@pytest.mark.parametrize("seed", range(5))
def test_differential_against_naive_model(seed):
    rng = random.Random(seed)
    window = ReplayWindow()
    seen: set[int] = set()
    accepted: list[int] = []
    top = 0
    for _ in range(20_000):
        roll = rng.random()
        if roll < 0.6:      # near the top, either side of it
            counter = max(0, top + rng.randint(-W - 200, 300))
        elif roll < 0.7:    # a replay of something accepted
            counter = rng.choice(accepted) if accepted else 0
        elif roll < 0.75:   # a jump past a whole ring of blocks
            counter = top + rng.randint(8192, 3 * 8192)
        else:               # anywhere below the top
            counter = rng.randint(0, top + 1)
        expected = _naive_verdict(seen, top, counter)
        assert window.would_accept(counter) is expected, counter
        assert window.accept(counter) is expected, counter
        if expected:
            seen.add(counter)
            accepted.append(counter)
            top = max(top, counter)
