"""Per-source rate limiting of handshake messages (kernel ratelimiter.c).

Each source owns a token bucket counted in nanoseconds: time itself is the
token, a packet costs 1/packets_per_second of a second, and the bucket holds
at most `burst` packets' worth. A new source starts with a full bucket minus
the packet that created it. The burst is part of the bucket's size, not of
the rate, as in the kernel (and unlike nft's limit).

Sources are keyed the way the kernel keys them: an IPv4 address by its /32,
an IPv6 address by its /64, because one IPv6 host can trivially use every
address of its /64 and would otherwise get 2**64 buckets. IPv4-mapped IPv6
addresses (what a dual-stack socket reports for IPv4 senders) are keyed as
the IPv4 address; their /64 is ::ffff:0:0/96's and would lump every IPv4
sender into one bucket.
"""

import ipaddress
import time
from typing import Callable

__all__ = ["RateLimiter", "PACKETS_PER_SECOND", "PACKETS_BURSTABLE", "MAX_ENTRIES"]

NSEC_PER_SEC = 1_000_000_000
PACKETS_PER_SECOND = 20
PACKETS_BURSTABLE = 5
# The kernel sizes its table from RAM (8 entries per hash bucket); a fixed
# cap is simpler and 8192 sources at once is already a flood.
MAX_ENTRIES = 8192
# IPv6 keys are the top 64 bits with this bit set above them, so they can
# never collide with an IPv4 key (< 2**32) in the one dict.
_V6_TAG = 1 << 64
_V4_MAPPED = 0xFFFF

Source = str | bytes | bytearray | memoryview | ipaddress.IPv4Address | ipaddress.IPv6Address


def _v6_key(value: int) -> int:
    if value >> 32 == _V4_MAPPED:
        return value & 0xFFFFFFFF
    return (value >> 64) | _V6_TAG


def source_key(source: Source) -> int:
    """The bucket key: IPv4 /32, IPv6 /64 (v4-mapped counts as IPv4)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        value = int.from_bytes(source, "big")
        if len(source) == 4:
            return value
        if len(source) == 16:
            return _v6_key(value)
        raise ValueError(f"an address is 4 or 16 bytes, not {len(source)}")
    if isinstance(source, str):
        source = ipaddress.ip_address(source)
    if isinstance(source, ipaddress.IPv4Address):
        return int(source)
    if isinstance(source, ipaddress.IPv6Address):
        return _v6_key(int(source))
    raise TypeError(f"not an IP address: {source!r}")


class RateLimiter:
    """Token buckets per source, bounded, garbage-collected after 1 s idle."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 packets_per_second: int = PACKETS_PER_SECOND,
                 burst: int = PACKETS_BURSTABLE,
                 max_entries: int = MAX_ENTRIES) -> None:
        self._clock = clock
        self._cost = NSEC_PER_SEC // packets_per_second
        self._token_max = self._cost * burst
        self._max_entries = max_entries
        # key -> [tokens_ns, last_time_ns]; a list so allow() updates in place.
        self._entries: dict[int, list[int]] = {}
        self._last_gc = self._now()

    def _now(self) -> int:
        # round, not int: a float clock like 1000.05 is 1000.0499999... s.
        return round(self._clock() * NSEC_PER_SEC)

    def allow(self, source_ip: Source) -> bool:
        """Whether one more handshake message from this source may be processed."""
        key = source_key(source_ip)
        now = self._now()
        if now - self._last_gc >= NSEC_PER_SEC:
            self._collect(now)
        entry = self._entries.get(key)
        if entry is not None:
            # A clock that steps back must not drain the bucket.
            elapsed = max(0, now - entry[1])
            tokens = min(self._token_max, entry[0] + elapsed)
            entry[1] = now
            if tokens >= self._cost:
                entry[0] = tokens - self._cost
                return True
            entry[0] = tokens
            return False
        # Bounded on purpose: a flood of spoofed sources must not grow memory
        # without limit. While the table is full, new sources are refused
        # (fail closed, as the kernel does when it hits max_entries): that
        # only happens during such a flood, sources already known keep their
        # buckets, and idle entries expire within a second or two once the
        # flood stops, so the table drains by itself.
        if len(self._entries) >= self._max_entries:
            return False
        self._entries[key] = [self._token_max - self._cost, now]
        return True

    def gc(self) -> None:
        """Drop the entries idle for more than a second."""
        self._collect(self._now())

    def _collect(self, now: int) -> None:
        self._last_gc = now
        stale = [key for key, (_, last) in self._entries.items()
                 if now - last > NSEC_PER_SEC]
        for key in stale:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
