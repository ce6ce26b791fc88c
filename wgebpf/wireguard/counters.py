"""Send counters of one keypair shared by several worker processes.

WireGuard's one hard rule on the sending side: a keypair never uses a
counter (the AEAD nonce) twice. With W workers sealing for the same peer the
counter space is cut into blocks of B counters, block k = [kB, (k+1)B), and
worker w (0..W-1) only ever takes counters from blocks with k % W == w, in
increasing order. Uniqueness therefore follows from arithmetic alone: no
two workers share a block and a worker never goes back. Nothing any other
process writes or reads can break it.

The softer rule is the receiver's replay window: a counter more than its
width (8128 in kernel WireGuard, wireguard-go and wgebpf/wireguard/replay.py)
behind the highest one the receiver has accepted is dropped. Workers that
run at different speeds, or idle, would drift apart without bound, so they
publish how far they got in shared memory (the hints) and:
  - a new block starts at or after max(hints) / B (a lagging worker jumps
    ahead instead of resuming far behind);
  - before each take, a block whose next counter is more than `bound` behind
    max(hints) is abandoned (stale()), and a new one drawn.
Hence every counter handed out is at most `bound` - 1 behind the highest
counter any worker had taken (and published) when take() looked: the
reordering a receiver sees is below `bound` plus whatever happens between
take() and the wire (a worker descheduled after taking a batch sends it late;
no scheme without a shared send queue can prevent that). Abandoned counters
are simply never used; at 2**60 counters before a rekey, waste is no concern.

Shared memory layout (CounterHints): a 64-byte header, then one region per
worker, each rows x u64 (a cell per keypair row), padded to 64 bytes so
that workers write different cache lines. Cell (row, w) holds worker w's
high-water mark for the keypair in that row: its last counter taken + 1,
0 before its first. Each cell has exactly one writer (worker w), so no
atomic read-modify-write is needed. The control plane creates the region
(CounterHints.create: a memfd), hands its fd to every worker, gives each
keypair a free row and zeroes that row (reset_row) before any worker uses it.
"""

from __future__ import annotations

import mmap
import os
import struct

from .messages import REJECT_AFTER_MESSAGES
from .replay import COUNTER_WINDOW_SIZE

__all__ = ["CounterHints", "SendCounter", "DEFAULT_BOUND",
           "RANGE_SHIFT", "block_size"]

# Receive steering (bpf/reuseport.c) sends 2**RANGE_SHIFT consecutive counters
# to one worker. Blocks are whole multiples of that range, so one sender
# block never splits a range.
RANGE_SHIFT = 7
# A quarter of the receiver's window. The rest is for what comes on top of
# our reordering: a fresh block starts up to W*B counters above the highest
# (the next block of ours may be W-1 blocks on), so the network swapping two
# messages across such a jump reorders them by up to W*B; with the default
# block (block_size: W*B <= bound) a receiver sees at most about 2 * bound
# plus one jump per reordered span of the network.
DEFAULT_BOUND = COUNTER_WINDOW_SIZE // 4          # 2032

_MAGIC = 0x57474354524E5431                       # "WGCTRNT1"
_HEADER = struct.Struct("=QII")                   # magic, rows, workers
_HEADER_SIZE = 64
_LINE = 64
_CELL = 8


def block_size(workers: int, bound: int = DEFAULT_BOUND) -> int:
    """The largest block (a multiple of the steering range) with which W
    workers running in step stay within the bound without abandoning
    blocks: W blocks in flight span W*B counters, so W*B <= bound."""
    unit = 1 << RANGE_SHIFT
    return max(unit, bound // max(workers, 1) // unit * unit)


def _region_size(rows: int) -> int:
    return -(-rows * _CELL // _LINE) * _LINE


class CounterHints:
    """The shared hint cells: rows (keypairs) x workers, u64 each.

    Reads and writes go through a memoryview cast to 'Q': CPython copies the
    8 aligned bytes with one fixed-size memcpy, a single load or store on
    x86-64 and arm64, so a reader sees a whole old or a whole new value.
    Why a stale or even a torn read would still be safe: uniqueness never
    depends on the hints (blocks are owned by arithmetic). A hint read too
    high makes a worker jump further ahead, skipping counters; one read too
    low (stale) lets it keep a block a little longer, and the cells only
    grow, so a stale value is an older true value: the reordering bound is
    then relative to that slightly older state, by the few packets other
    workers sealed in the meantime.
    """

    def __init__(self, buffer, rows: int, workers: int, owner=None):
        if rows < 1 or workers < 1:
            raise ValueError("rows and workers must be positive")
        self.rows, self.workers = rows, workers
        self._stride = _region_size(rows) // _CELL
        self._buffer = buffer
        self._owner = owner                 # (mmap, fd) kept open while mapped
        self._cells = memoryview(buffer)[_HEADER_SIZE:].cast("Q")
        if len(self._cells) < workers * self._stride:
            raise ValueError("shared region too small for its header's rows x workers")

    # -- creating and mapping ------------------------------------------------

    @staticmethod
    def size(rows: int, workers: int) -> int:
        return _HEADER_SIZE + workers * _region_size(rows)

    @classmethod
    def create(cls, rows: int, workers: int, name: str = "wgebpf-counters") -> "CounterHints":
        """A new zeroed region in a memfd (the control plane's side). Pass
        `fd` to the workers (pass_fds, SCM_RIGHTS); it is not inherited
        across exec unless passed (MFD_CLOEXEC)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, cls.size(rows, workers))
            hints = cls._map(fd, rows, workers)
        except BaseException:
            os.close(fd)
            raise
        _HEADER.pack_into(hints._buffer, 0, _MAGIC, rows, workers)
        return hints

    @classmethod
    def from_fd(cls, fd: int) -> "CounterHints":
        """Map a region another process created (the worker's side); the
        dimensions come from its header. Takes a duplicate of `fd`."""
        head = os.pread(fd, _HEADER.size, 0)
        magic, rows, workers = _HEADER.unpack(head)
        if magic != _MAGIC:
            raise ValueError("not a counter hints region")
        return cls._map(os.dup(fd), rows, workers)

    @classmethod
    def _map(cls, fd: int, rows: int, workers: int) -> "CounterHints":
        region = mmap.mmap(fd, cls.size(rows, workers), mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(region, rows, workers, owner=(region, fd))

    @classmethod
    def in_process(cls, rows: int, workers: int) -> "CounterHints":
        """The same layout in ordinary memory: tests and simulations."""
        buffer = bytearray(cls.size(rows, workers))
        _HEADER.pack_into(buffer, 0, _MAGIC, rows, workers)
        return cls(buffer, rows, workers)

    @property
    def fd(self) -> int:
        if self._owner is None:
            raise ValueError("an in-process region has no fd")
        return self._owner[1]

    def close(self) -> None:
        self._cells.release()
        if self._owner is not None:
            region, fd = self._owner
            region.close()
            os.close(fd)
            self._owner = None

    # -- cells -------------------------------------------------------------------

    def _at(self, row: int, worker: int) -> int:
        if not (0 <= row < self.rows and 0 <= worker < self.workers):
            raise IndexError(f"cell ({row}, {worker}) outside {self.rows} x {self.workers}")
        return worker * self._stride + row

    def cell(self, row: int, worker: int) -> int:
        return self._cells[self._at(row, worker)]

    def publish(self, row: int, worker: int, value: int) -> None:
        """Worker `worker` (the cell's only writer) has taken counters below `value`."""
        self._cells[self._at(row, worker)] = value

    def highest(self, row: int) -> int:
        """max over the row's cells: above every counter taken so far."""
        cells, at = self._cells, row
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} outside {self.rows}")
        return max(cells[at + w * self._stride] for w in range(self.workers))

    def reset_row(self, row: int) -> None:
        """Zero a row for a new keypair: the control plane, before any
        worker seals with it (a row's old values would only make workers
        skip counters, but a fresh keypair should start at 0)."""
        for w in range(self.workers):
            self.publish(row, w, 0)


class SendCounter:
    """One worker's counter allocator for one keypair (one hint row)."""

    __slots__ = ("_hints", "_row", "_worker", "_workers", "_block", "_bound", "_limit",
                 "_last", "_next", "_end", "seen", "abandoned")

    def __init__(self, hints: CounterHints, row: int, worker: int,
                 block: int | None = None, bound: int = DEFAULT_BOUND,
                 limit: int = REJECT_AFTER_MESSAGES):
        if block is None:
            block = block_size(hints.workers, bound)
        if block < 1 or bound < block:
            # A fresh block may start up to block - 1 behind max(hints); a
            # bound below that would call it stale at once.
            raise ValueError(f"need 1 <= block ({block}) <= bound ({bound})")
        self._hints, self._row, self._worker = hints, row, worker
        self._workers, self._block, self._bound, self._limit = hints.workers, block, bound, limit
        # Resume from our own cell (a restarted worker, or a keypair moved
        # to us): its block and everything before it are spent.
        own = hints.cell(row, worker)
        self._last = (own - 1) // block if own else -1
        self._next = self._end = own
        self.seen = 0           # max(hints) at the last look, for tests and stats
        self.abandoned = 0      # counters skipped in blocks left stale or unfinished

    @property
    def next(self) -> int:
        """One above the highest counter this worker has taken (its hint);
        the value to compare with REKEY_AFTER_MESSAGES."""
        return self._hints.cell(self._row, self._worker)

    def exhausted(self) -> bool:
        """No counter is left below the limit for this worker: rekey."""
        return self._next >= self._end and self._next_start() >= self._limit

    def stale(self) -> bool:
        """The current block's next counter is more than `bound` behind the
        highest counter taken by anyone: abandon it before the next batch."""
        self.seen = self._hints.highest(self._row)
        return self._next < self._end and self.seen - self._next > self._bound

    def next_block(self) -> None:
        """Move to our smallest block at or after max(hints) / B and after
        the last one we used."""
        self.seen = self._hints.highest(self._row)
        start = self._next_start()
        self.abandoned += self._end - self._next
        if start >= self._limit:
            self._next = self._end = self._limit
            return
        self._last = start // self._block
        self._next, self._end = start, min(start + self._block, self._limit)

    def _next_start(self) -> int:
        k = max(self.seen // self._block, self._last + 1)
        k += (self._worker - k) % self._workers
        return k * self._block

    def take(self, n: int) -> tuple[int, int]:
        """Up to n consecutive counters: (first, count). count < n at the end
        of a block (call again for the rest); count == 0 only when the
        keypair has no counters left below REJECT_AFTER_MESSAGES (rekey).
        The hint is published here, before the caller seals and sends."""
        if n < 1:
            raise ValueError("take at least one counter")
        if self.stale() or self._next >= self._end:
            self.next_block()
        first = self._next
        count = min(n, self._end - first)
        if count <= 0:
            return first, 0
        self._next = first + count
        self._hints.publish(self._row, self._worker, self._next)
        return first, count
