"""TAI64N timestamps: encoding, whitening, ordering."""

import struct

import pytest

from wgebpf.wireguard import tai64n

# The label of Unix time 0 is 2**62 + 10 = 0x400000000000000a (TAI64 base
# plus TAI-UTC in 1972, the constant wireguard-go's tai64n package uses).
# 2**24 ns = 16.777216 ms is the whitening granule.
GRANULE = (1 << 24) / 1e9

ENCODINGS = [
    # (unix seconds, expected 12 bytes as hex)
    (0, "400000000000000a" "00000000"),
    (1, "400000000000000b" "00000000"),
    # 500_000_000 ns = 0x1dcd6500, rounded down to a multiple of 2**24
    (1.5, "400000000000000b" "1d000000"),
    # 2020-01-01T00:00:00Z = 1577836800 = 0x5e0be100
    (1577836800, "400000005e0be10a" "00000000"),
    # 0.999999999 s: 999_999_999 ns = 0x3b9ac9ff -> 0x3b000000
    (0.999999999, "400000000000000a" "3b000000"),
    # one granule exactly, and one nanosecond short of two granules
    (16_777_216e-9, "400000000000000a" "01000000"),
    (33_554_431e-9, "400000000000000a" "01000000"),
    # before 1970 still orders correctly: floor, not truncation
    (-0.5, "4000000000000009" "1d000000"),
]


@pytest.mark.parametrize("seconds,expected", ENCODINGS)
def test_known_encodings(seconds, expected):
    assert tai64n.from_unix(seconds).hex() == expected


def test_layout_matches_struct():
    # An independent statement of the layout: big-endian u64 then u32.
    seconds, nanos = 1_700_000_000, 123_456_789
    stamp = tai64n.from_unix(seconds + nanos / 1e9)
    label, frac = struct.unpack(">QI", stamp)
    assert len(stamp) == tai64n.TIMESTAMP_LEN == 12
    assert label == (1 << 62) + 10 + seconds
    assert frac == nanos & ~((1 << 24) - 1)
    assert frac % (1 << 24) == 0


def test_now_uses_the_clock():
    assert tai64n.now(lambda: 1577836800.0) == tai64n.from_unix(1577836800)


def test_now_default_clock_is_recent():
    label = struct.unpack(">Q", tai64n.now()[:8])[0] - ((1 << 62) + 10)
    assert 1_600_000_000 < label < 4_000_000_000


WHITENING = [
    # (first, second, second strictly after first?)
    (100.0, 100.0, False),
    (100.0, 100.0 + GRANULE * 0.9, False),    # same granule: equal stamps
    (100.0, 100.0 + GRANULE * 1.01, True),
    (100.0, 101.0, True),
    (101.0, 100.0, False),
    (100.999, 101.0, True),                   # across a second boundary
    (99.5, 100.25, True),
]


@pytest.mark.parametrize("first,second,newer", WHITENING)
def test_ordering_and_whitening(first, second, newer):
    a, b = tai64n.from_unix(first), tai64n.from_unix(second)
    assert tai64n.after(b, a) is newer
    assert not tai64n.after(a, a)
    if newer:
        assert not tai64n.after(a, b)


def test_monotonic_over_a_sweep():
    # Stamps never go backwards, and advance at least once per granule.
    stamps = [tai64n.from_unix(1000 + i * 0.001) for i in range(3000)]
    assert all(not tai64n.after(x, y) for x, y in zip(stamps, stamps[1:]))
    assert len(set(stamps)) >= int(3.0 / GRANULE)


def test_after_accepts_byte_like():
    a, b = tai64n.from_unix(1), tai64n.from_unix(2)
    assert tai64n.after(memoryview(b), bytearray(a))
