"""TAI64N timestamps, as the handshake initiation carries them.

12 bytes, big-endian: 8 bytes of seconds offset by 2**62 + 10 (the TAI64
label plus TAI's lead over UTC in 1972, the constant wireguard-go and the
kernel both use; leap seconds since then are ignored, harmlessly, because
only the ordering matters), then 4 bytes of nanoseconds.

The responder only checks that each initiation's timestamp is strictly
newer than the last one it accepted from that peer (replay protection for
initiations), so big-endian byte order makes byte comparison the right
comparison. The nanoseconds are rounded down to a multiple of 2**24 ns
(about 16.8 ms), as WireGuard does, so the timestamp leaks no fine-grained
clock reading to an observer who can decrypt it (e.g. a compromised peer
fingerprinting a host's clock).
"""

import math
import time
from typing import Callable

__all__ = ["now", "after", "from_unix", "TIMESTAMP_LEN"]

TIMESTAMP_LEN = 12
TAI64_BASE = (1 << 62) + 10
WHITENER_MASK = (1 << 24) - 1
NSEC_PER_SEC = 1_000_000_000


def from_unix(seconds: float) -> bytes:
    """The whitened TAI64N label of a Unix time in seconds."""
    whole = math.floor(seconds)
    # min(): float rounding can turn .9999999999 into a full second.
    nanos = min(round((seconds - whole) * NSEC_PER_SEC), NSEC_PER_SEC - 1)
    nanos &= ~WHITENER_MASK
    return (TAI64_BASE + whole).to_bytes(8, "big") + nanos.to_bytes(4, "big")


def now(clock: Callable[[], float] = time.time) -> bytes:
    """The current time as a whitened TAI64N timestamp."""
    return from_unix(clock())


def after(a: bytes, b: bytes) -> bool:
    """Whether timestamp `a` is strictly newer than `b`."""
    return bytes(a) > bytes(b)
