"""The sliding replay window for data-message counters (RFC 6479 style).

The same scheme as kernel WireGuard's noise_replay_counter: a ring of
COUNTER_BITS_TOTAL bits kept in 64-bit blocks. When a newer counter arrives
the ring slides forward by clearing whole blocks, never by shifting bits, so
each packet costs O(1) no matter how far the window jumps. One block is
"redundant" (it may hold bits about to be recycled), which is why the usable
window is COUNTER_BITS_TOTAL - 64 = 8128 counters, well above the 2048 the
whitepaper asks for.

Internally a counter c is stored at bit position c + 1, and the top is the
highest accepted counter plus one, so 0 means "nothing received yet". That
keeps the initial state all zeros, as in the kernel (and lets a zeroed row of
shared memory be a fresh window: SharedReplayWindows).
"""

import fcntl
import mmap
import os

from wgebpf.wireguard.messages import REJECT_AFTER_MESSAGES

__all__ = ["ReplayWindow", "SharedReplayWindow", "SharedReplayWindows", "COUNTER_BITS_TOTAL",
           "COUNTER_REDUNDANT_BITS", "COUNTER_WINDOW_SIZE"]

BITS_PER_BLOCK = 64
COUNTER_BITS_TOTAL = 8192
COUNTER_REDUNDANT_BITS = BITS_PER_BLOCK
COUNTER_WINDOW_SIZE = COUNTER_BITS_TOTAL - COUNTER_REDUNDANT_BITS   # 8128

_BLOCKS = COUNTER_BITS_TOTAL // BITS_PER_BLOCK   # 128, a power of two
_BLOCK_MASK = _BLOCKS - 1
_BLOCK_SHIFT = 6                                 # log2(BITS_PER_BLOCK)
_BIT_MASK = BITS_PER_BLOCK - 1


class ReplayWindow:
    """Accepts each counter at most once, and none older than the window.

    The state is one sequence of 1 + _BLOCKS integers, `_cells`: the top,
    then the ring of blocks. A list here; a row of shared memory in
    SharedReplayWindow, which runs the same code.
    """

    __slots__ = ("_cells",)
    shared = False

    def __init__(self) -> None:
        self._cells = [0] * (1 + _BLOCKS)

    def reset(self) -> None:
        cells = self._cells
        for i in range(len(cells)):
            cells[i] = 0

    def would_accept(self, counter: int) -> bool:
        """Whether accept() would succeed; changes nothing.

        Called before decryption so that replays and stale packets cost no
        AEAD work. It is only a hint: the packet is recorded by accept(),
        after the tag verified, so a forged packet cannot burn a counter.
        """
        if counter < 0 or counter >= REJECT_AFTER_MESSAGES:
            return False
        cells = self._cells
        position = counter + 1
        top = cells[0]
        if position > top:
            return True
        if position + COUNTER_WINDOW_SIZE < top:
            return False
        block = cells[1 + ((position >> _BLOCK_SHIFT) & _BLOCK_MASK)]
        return not (block >> (position & _BIT_MASK)) & 1

    def accept(self, counter: int) -> bool:
        """Validate and record; call only once the packet has authenticated."""
        if counter < 0 or counter >= REJECT_AFTER_MESSAGES:
            return False
        cells = self._cells
        position = counter + 1
        top = cells[0]
        if position + COUNTER_WINDOW_SIZE < top:
            return False
        index = position >> _BLOCK_SHIFT
        if position > top:
            self._slide(top >> _BLOCK_SHIFT, index)
            cells[0] = position
        index = 1 + (index & _BLOCK_MASK)
        bit = 1 << (position & _BIT_MASK)
        block = cells[index]
        if block & bit:
            return False
        cells[index] = block | bit
        return True

    def _slide(self, current: int, new: int) -> None:
        # Clear the blocks between the old top's block and the new one; they
        # hold bits of counters that fell out of the window a lap ago. A jump
        # of a whole ring or more clears everything, hence the cap.
        cells = self._cells
        steps = min(new - current, _BLOCKS)
        for i in range(1, steps + 1):
            cells[1 + ((current + i) & _BLOCK_MASK)] = 0

    def locked(self):
        """Exclusive use of the window while it is held (a no-op here)."""
        return _NOT_LOCKED


class _NotLocked:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


_NOT_LOCKED = _NotLocked()


# --- windows shared by processes -------------------------------------------------------

ROW_CELLS = 1 + _BLOCKS + 1              # top, the ring, one pad word: 1040 bytes a row


class SharedReplayWindows:
    """Replay windows in shared memory (a memfd), one row per session, for a
    session whose data messages several worker processes receive.

    Why shared: receive steering cannot promise that every copy of a counter
    reaches the same worker. UDP GRO merges a burst of datagrams of one
    4-tuple before the socket is chosen, and the reuseport program sees only
    the first of them, so the copies of one counter can land in different
    bursts on different workers. One window per session that every worker
    checks is the only place where "each counter at most once" can hold.

    Why a lock: accept() is a read-modify-write. Two workers accepting the
    same counter at the same time must not both see its bit clear. Each row
    has a POSIX record lock on its own byte of the memfd (fcntl), taken once
    per burst for all its accepts (receive.py, batch.ReceiveBatch), about
    3 us for lock and unlock. would_accept() reads without it: it is a hint
    before decryption, and a stale read only costs a decryption.

    The control plane creates the region and gives each session a row it
    has zeroed; a row is reused only once no worker can still accept a
    packet of the session that had it (pool.py).
    """

    def __init__(self, fd: int, rows: int):
        self.fd = fd
        self.rows = rows
        self._map = mmap.mmap(fd, rows * ROW_CELLS * 8, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._cells = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, rows: int, name: str = "wgebpf-replay") -> "SharedReplayWindows":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, rows * ROW_CELLS * 8)   # sparse: pages appear as rows are used
            return cls(fd, rows)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int) -> "SharedReplayWindows":
        """Map a region another process created; takes a duplicate of fd."""
        return cls(os.dup(fd), os.fstat(fd).st_size // (ROW_CELLS * 8))

    def window(self, row: int) -> "SharedReplayWindow":
        if not 0 <= row < self.rows:
            raise ValueError(f"replay row {row} is not in 0..{self.rows - 1}")
        return SharedReplayWindow(self, row)

    def reset_row(self, row: int) -> None:
        start = row * ROW_CELLS
        self._cells[start:start + ROW_CELLS] = _ZERO_ROW

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self.fd)


_ZERO_ROW = memoryview(bytes(ROW_CELLS * 8)).cast("Q")


class SharedReplayWindow(ReplayWindow):
    """One session's window in a SharedReplayWindows row: the same rules,
    checked by every worker that receives the session's data."""

    __slots__ = ("row", "_fd")
    shared = True

    def __init__(self, windows: SharedReplayWindows, row: int):
        start = row * ROW_CELLS
        self._cells = windows._cells[start:start + ROW_CELLS]
        self.row = row
        self._fd = windows.fd

    def locked(self):
        return _RowLock(self._fd, self.row)

    def __reduce__(self):
        raise TypeError("a shared replay window stays in its process; send its row")


class _RowLock:
    """The row's record lock: byte `row` of the memfd, exclusive."""

    __slots__ = ("fd", "row")

    def __init__(self, fd: int, row: int):
        self.fd, self.row = fd, row

    def __enter__(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, self.row)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, self.row)
