"""Send counters shared by several workers (wgebpf/wireguard/counters.py).

Schedules of W workers taking batches in random interleavings (some idling
for long stretches) must never hand out a counter twice, must keep every
counter less than `bound` behind the highest one taken before it, and with
one worker must be exactly 0, 1, 2, ...; then the same with real processes
sharing one memfd region.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from wgebpf.wireguard.counters import (CounterHints, DEFAULT_BOUND, SendCounter,
                                       block_size)
from wgebpf.wireguard.messages import REJECT_AFTER_MESSAGES


def run_schedule(workers: int, block: int, bound: int, steps) -> list[tuple[int, int]]:
    """Run (worker, batch, repeat) steps; each counter with the highest
    counter taken before it, in the order they were taken."""
    hints = CounterHints.in_process(rows=2, workers=workers)
    senders = [SendCounter(hints, 1, w, block=block, bound=bound) for w in range(workers)]
    out, top = [], -1
    for worker, batch, repeat in steps:
        for _ in range(repeat):
            left = batch
            while left:
                first, count = senders[worker].take(left)
                assert count > 0
                for c in range(first, first + count):
                    out.append((c, top))
                    top = max(top, c)
                left -= count
    return out


def steps_for(workers: int):
    """Steps (worker, batch, repeat): one worker takes `repeat` batches in a
    row while the others idle, sometimes for hundreds of batches."""
    return st.lists(st.tuples(st.integers(0, workers - 1), st.integers(1, 64),
                              st.sampled_from([1, 1, 1, 3, 40, 300])),
                    max_size=60)


@st.composite
def schedules(draw):
    workers = draw(st.integers(1, 8))
    block = draw(st.sampled_from([1, 7, 128, 256, 1024]))
    bound = draw(st.sampled_from([block, 2 * block, DEFAULT_BOUND, max(block, 4064)]))
    bound = max(bound, block)
    return workers, block, bound, draw(steps_for(workers))


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_no_counter_twice_and_reordering_below_the_bound(case):
    workers, block, bound, steps = case
    sent = run_schedule(workers, block, bound, steps)
    counters = [c for c, _ in sent]
    assert len(counters) == len(set(counters))
    worst = max((top - c for c, top in sent), default=0)
    assert worst < bound, (worst, bound)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([1, 128, 1000]), st.lists(st.integers(1, 200), max_size=50))
def test_one_worker_is_the_plain_sequence(block, batches):
    sent = run_schedule(1, block, max(block, DEFAULT_BOUND),
                        [(0, b, 1) for b in batches])
    assert [c for c, _ in sent] == list(range(sum(batches)))


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), st.lists(st.tuples(st.integers(0, 5), st.integers(1, 64),
                                             st.integers(0, 1 << 40)), max_size=80))
def test_uniqueness_does_not_depend_on_the_hints(workers, steps):
    """Garbage in other workers' cells (a torn read, a bug, a hostile
    co-tenant) only makes workers skip ahead: never a counter twice."""
    hints = CounterHints.in_process(rows=1, workers=workers)
    senders = [SendCounter(hints, 0, w, block=128, bound=128) for w in range(workers)]
    seen = set()
    for worker, n, garbage in steps:
        worker %= workers
        other = (worker + 1) % workers
        if other != worker and garbage % 3 == 0:
            hints.publish(0, other, garbage)
        first, count = senders[worker].take(n)
        batch = set(range(first, first + count))
        assert not batch & seen
        seen |= batch


def test_every_worker_draws_only_its_own_blocks():
    hints = CounterHints.in_process(1, 3)
    for w in range(3):
        s = SendCounter(hints, 0, w, block=128, bound=512)
        for _ in range(40):
            first, count = s.take(33)
            assert (first // 128) % 3 == w and ((first + count - 1) // 128) % 3 == w


def test_an_idle_worker_jumps_ahead_instead_of_resuming_far_behind():
    hints = CounterHints.in_process(1, 2)
    a, b = SendCounter(hints, 0, 0, block=128, bound=512), SendCounter(hints, 0, 1, block=128, bound=512)
    assert a.take(10) == (0, 10)
    for _ in range(100):
        b.take(64)                  # b runs on alone to ~ 12800
    first, count = a.take(10)
    assert first >= hints.highest(0) - 128 - 10 and (first // 128) % 2 == 0
    assert a.abandoned == 118       # the rest of block 0


def test_take_stops_at_the_block_end_and_the_caller_loops():
    hints = CounterHints.in_process(1, 2)
    s = SendCounter(hints, 0, 1, block=128, bound=4064)
    assert s.take(100) == (128, 100)
    assert s.take(100) == (228, 28)          # the rest of block 1
    assert s.take(100) == (384, 100)         # block 3: the next of ours
    assert s.next == 484 == hints.cell(0, 1)


def test_the_limit_is_never_crossed():
    hints = CounterHints.in_process(1, 2)
    limit = 1000
    s = SendCounter(hints, 0, 0, block=128, bound=512, limit=limit)
    got = []
    while True:
        first, count = s.take(50)
        if not count:
            break
        got.extend(range(first, first + count))
    assert max(got) < limit and s.exhausted()
    assert all((c // 128) % 2 == 0 for c in got)
    assert SendCounter(hints, 0, 0).take(1)[1] >= 0     # default limit is REJECT_AFTER_MESSAGES
    assert REJECT_AFTER_MESSAGES % 128 == 127           # the last block is a partial one


def test_a_restarted_worker_resumes_after_its_own_cell():
    hints = CounterHints.in_process(1, 2)
    s = SendCounter(hints, 0, 0, block=128, bound=512)
    s.take(5)
    again = SendCounter(hints, 0, 0, block=128, bound=512)
    first, _ = again.take(5)
    assert first == 256                      # block 0 is spent, block 2 is next


def test_reset_row_and_bad_arguments():
    hints = CounterHints.in_process(3, 2)
    hints.publish(2, 1, 999)
    assert hints.highest(2) == 999 and hints.highest(1) == 0
    hints.reset_row(2)
    assert hints.highest(2) == 0
    with pytest.raises(IndexError):
        hints.cell(3, 0)
    with pytest.raises(ValueError):
        SendCounter(hints, 0, 0, block=256, bound=128)
    with pytest.raises(ValueError):
        SendCounter(hints, 0, 0).take(0)


def test_block_size_keeps_workers_in_step_within_the_bound():
    for w in range(1, 17):
        b = block_size(w)
        assert b % 128 == 0 and (w * b <= DEFAULT_BOUND or b == 128)


# -- real processes sharing a memfd ----------------------------------------------------

CHILD = r"""
import json, os, random, sys, time
from wgebpf.wireguard.counters import CounterHints, SendCounter
fd, row, worker, takes, seed = map(int, sys.argv[1:6])
hints = CounterHints.from_fd(fd)
os.close(fd)
s = SendCounter(hints, row, worker, block=128, bound=1024)
rng = random.Random(seed)
out = []
for i in range(takes):
    if rng.random() < 0.002:
        time.sleep(rng.random() * 0.01)           # idle a while
    first, count = s.take(rng.randint(1, 64))
    out.append((first, count, s.seen))
json.dump(out, sys.stdout)
"""


@pytest.mark.parametrize("workers", [2, 4])
def test_processes_sharing_a_memfd_never_reuse_a_counter(workers):
    hints = CounterHints.create(rows=4, workers=workers)
    row, bound = 3, 1024
    hints.reset_row(row)
    procs = []
    try:
        for w in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", CHILD, str(hints.fd), str(row), str(w), "20000",
                 str(random.randrange(1 << 30))],
                stdout=subprocess.PIPE, pass_fds=[hints.fd], cwd=os.getcwd()))
        results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        counters = []
        for takes in results:
            mine = []
            for first, count, seen in takes:
                assert count > 0
                # What the bound promises across processes: each batch starts
                # less than `bound` behind the highest counter taken anywhere
                # that the worker could see when it took the batch.
                assert seen - first < bound, (seen, first)
                mine.extend(range(first, first + count))
            assert mine == sorted(mine)      # a worker only moves forward
            counters.extend(mine)
        assert len(counters) == len(set(counters))
        assert hints.highest(row) == max(counters) + 1
        print(f"{workers} processes: {len(counters)} counters, highest {max(counters)}, "
              f"{max(counters) + 1 - len(counters)} skipped")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        hints.close()
