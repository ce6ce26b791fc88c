"""Replay windows shared by worker processes (wireguard/replay.py,
SharedReplayWindows) and the receive batch's deferred, locked accept
(dataplane/batch.py): every counter of a session is accepted at most once,
whichever worker its copies reach.

The kernel's counter cases run against a shared row as they do against the
in-process window; real processes race over one row; and two ReceiveBatch
objects standing for two workers get the same data messages."""

import multiprocessing
import pickle
import random

import pytest
from hypothesis import given, settings, strategies as st

from test_replay import CASES
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE, ReplayWindow, SharedReplayWindows


@pytest.fixture
def windows():
    region = SharedReplayWindows.create(16)
    yield region
    region.close()


@pytest.mark.parametrize("steps", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_a_shared_row_passes_the_kernel_counter_cases(windows, steps):
    window = windows.window(3)
    for number, (counter, expected) in enumerate(steps, 1):
        assert window.would_accept(counter) == expected, (number, counter)
        with window.locked():
            assert window.accept(counter) == expected, (number, counter)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3 * COUNTER_WINDOW_SIZE), max_size=300))
def test_a_shared_row_agrees_with_the_in_process_window(counters):
    region = SharedReplayWindows.create(4)
    try:
        shared, local = region.window(1), ReplayWindow()
        for counter in counters:
            assert shared.would_accept(counter) == local.would_accept(counter)
            assert shared.accept(counter) == local.accept(counter)
        del shared                          # it holds a view of the mapping
    finally:
        region.close()


def test_rows_are_separate_and_reset_makes_a_fresh_window(windows):
    a, b = windows.window(0), windows.window(1)
    assert a.accept(5) and not a.accept(5)
    assert b.accept(5)                      # another session's row
    windows.reset_row(0)
    assert a.accept(5)
    with pytest.raises(ValueError):
        windows.window(16)


def test_a_second_mapping_sees_the_same_window(windows):
    other = SharedReplayWindows.from_fd(windows.fd)
    try:
        assert windows.window(2).accept(77)
        assert not other.window(2).accept(77)
        assert other.window(2).accept(78) and not windows.window(2).accept(78)
    finally:
        other.close()


def test_a_shared_window_refuses_to_travel(windows):
    with pytest.raises(TypeError):
        pickle.dumps(windows.window(0))


def _race(fd: int, row: int, counters: list[int], results) -> None:
    region = SharedReplayWindows.from_fd(fd)
    window = region.window(row)
    won = []
    for start in range(0, len(counters), 16):            # bursts, as a worker takes them
        with window.locked():
            won += [c for c in counters[start:start + 16] if window.accept(c)]
    results.put(won)
    region.close()


def test_racing_processes_accept_every_counter_exactly_once(windows):
    """Four processes get the same 20,000 counters (every counter four
    times, shuffled differently): together they accept each exactly once."""
    counters = list(range(20_000))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    procs = []
    for seed in range(4):
        mine = counters[:]
        random.Random(seed).shuffle(mine)
        # mostly ascending, as a real stream: sort within windows of 512
        mine = [c for i in range(0, len(mine), 512) for c in sorted(mine[i:i + 512])]
        procs.append(context.Process(target=_race, args=(windows.fd, 5, mine, results)))
    for proc in procs:
        proc.start()
    won = [c for _ in procs for c in results.get(timeout=60)]
    for proc in procs:
        proc.join(timeout=10)
    assert len(won) == len(set(won)), "a counter was accepted twice"
    assert set(won) <= set(counters)
