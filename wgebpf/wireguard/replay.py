"""The sliding replay window for data-message counters (RFC 6479 style).

The same scheme as kernel WireGuard's noise_replay_counter: a ring of
COUNTER_BITS_TOTAL bits kept in 64-bit blocks. When a newer counter arrives
the ring slides forward by clearing whole blocks, never by shifting bits, so
each packet costs O(1) no matter how far the window jumps. One block is
"redundant" (it may hold bits about to be recycled), which is why the usable
window is COUNTER_BITS_TOTAL - 64 = 8128 counters, well above the 2048 the
whitepaper asks for.

Internally a counter c is stored at bit position c + 1, and `_top` is the
highest accepted counter plus one, so 0 means "nothing received yet". That
keeps the initial state all zeros, as in the kernel.
"""

from wgebpf.wireguard.messages import REJECT_AFTER_MESSAGES

__all__ = ["ReplayWindow", "COUNTER_BITS_TOTAL", "COUNTER_REDUNDANT_BITS",
           "COUNTER_WINDOW_SIZE"]

BITS_PER_BLOCK = 64
COUNTER_BITS_TOTAL = 8192
COUNTER_REDUNDANT_BITS = BITS_PER_BLOCK
COUNTER_WINDOW_SIZE = COUNTER_BITS_TOTAL - COUNTER_REDUNDANT_BITS   # 8128

_BLOCKS = COUNTER_BITS_TOTAL // BITS_PER_BLOCK   # 128, a power of two
_BLOCK_MASK = _BLOCKS - 1
_BLOCK_SHIFT = 6                                 # log2(BITS_PER_BLOCK)
_BIT_MASK = BITS_PER_BLOCK - 1


class ReplayWindow:
    """Accepts each counter at most once, and none older than the window."""

    __slots__ = ("_top", "_blocks")

    def __init__(self) -> None:
        self._top = 0
        self._blocks = [0] * _BLOCKS

    def reset(self) -> None:
        self._top = 0
        self._blocks = [0] * _BLOCKS

    def would_accept(self, counter: int) -> bool:
        """Whether accept() would succeed; changes nothing.

        Called before decryption so that replays and stale packets cost no
        AEAD work. It is only a hint: the packet is recorded by accept(),
        after the tag verified, so a forged packet cannot burn a counter.
        """
        if counter < 0 or counter >= REJECT_AFTER_MESSAGES:
            return False
        position = counter + 1
        if position > self._top:
            return True
        if position + COUNTER_WINDOW_SIZE < self._top:
            return False
        block = self._blocks[(position >> _BLOCK_SHIFT) & _BLOCK_MASK]
        return not (block >> (position & _BIT_MASK)) & 1

    def accept(self, counter: int) -> bool:
        """Validate and record; call only once the packet has authenticated."""
        if counter < 0 or counter >= REJECT_AFTER_MESSAGES:
            return False
        position = counter + 1
        top = self._top
        if position + COUNTER_WINDOW_SIZE < top:
            return False
        blocks = self._blocks
        index = position >> _BLOCK_SHIFT
        if position > top:
            self._slide(top >> _BLOCK_SHIFT, index)
            self._top = position
        index &= _BLOCK_MASK
        bit = 1 << (position & _BIT_MASK)
        block = blocks[index]
        if block & bit:
            return False
        blocks[index] = block | bit
        return True

    def _slide(self, current: int, new: int) -> None:
        # Clear the blocks between the old top's block and the new one; they
        # hold bits of counters that fell out of the window a lap ago. A jump
        # of a whole ring or more clears everything, hence the cap.
        blocks = self._blocks
        steps = min(new - current, _BLOCKS)
        for i in range(1, steps + 1):
            blocks[(current + i) & _BLOCK_MASK] = 0
