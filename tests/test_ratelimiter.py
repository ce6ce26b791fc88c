"""The handshake rate limiter, driven by a fake clock (no sleeping)."""

import ipaddress

import pytest

from wgebpf.wireguard.ratelimiter import RateLimiter, source_key

A = "192.0.2.1"
B = "192.0.2.2"


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def limiter(clock):
    return RateLimiter(clock=clock)   # 20 packets/s, burst 5


def run(limiter, clock, steps):
    """Apply (advance_seconds, source, expected) steps in order."""
    for number, (advance, source, expected) in enumerate(steps, 1):
        clock.advance(advance)
        assert limiter.allow(source) is expected, (number, advance, source)


# Each table is (advance before the packet, source, expected verdict).
TABLES = {
    "burst of five then refusal": [
        (0, A, True), (0, A, True), (0, A, True), (0, A, True), (0, A, True),
        (0, A, False), (0, A, False),
    ],
    "one packet per 1/20 s after the burst": [
        *[(0, A, True)] * 5,
        (0, A, False),
        (0.025, A, False),   # half a token: not yet
        (0.025, A, True),    # refused attempts do not waste the refill
        (0, A, False),
        (0.05, A, True),
        (0.05, A, True),
        (0, A, False),
    ],
    "a long pause refills to the burst, no more": [
        *[(0, A, True)] * 5,
        (10.0, A, True), (0, A, True), (0, A, True), (0, A, True), (0, A, True),
        (0, A, False),
    ],
    "sources are independent": [
        *[(0, A, True)] * 5,
        (0, A, False),
        *[(0, B, True)] * 5,
        (0, B, False),
        (0, A, False),
    ],
    "a steady 20 per second is always allowed": [
        (0.05, A, True) for _ in range(100)
    ],
    "40 per second gets about half through": [
        *[(0, A, True)] * 5,
        *[(0.025, A, expected) for _ in range(10) for expected in (False, True)],
    ],
}


@pytest.mark.parametrize("steps", TABLES.values(), ids=TABLES.keys())
def test_token_bucket(limiter, clock, steps):
    run(limiter, clock, steps)


IPV6_GROUPS = [
    # (first source, second source, same bucket?)
    ("2001:db8::1", "2001:db8::2", True),
    ("2001:db8::1", "2001:db8::ffff:ffff:ffff:ffff", True),
    ("2001:db8::1", "2001:db8:0:1::1", False),
    ("2001:db8:aaaa:bbbb::1", "2001:db8:aaaa:bbbb:cccc::9", True),
    ("fe80::1%lo", "fe80::2", True),
    ("192.0.2.1", "192.0.2.2", False),
    ("192.0.2.1", "::ffff:192.0.2.1", True),    # v4-mapped is the IPv4 host
    ("192.0.2.1", "::ffff:192.0.2.2", False),   # ... not one bucket for all IPv4
    ("0.0.0.1", "::1", False),                  # v4 and v6 keys never collide
]


@pytest.mark.parametrize("first,second,same", IPV6_GROUPS)
def test_grouping(limiter, first, second, same):
    for _ in range(5):
        assert limiter.allow(first)
    assert limiter.allow(second) is not same
    assert len(limiter) == (1 if same else 2)


ADDRESS_FORMS = [
    ("198.51.100.7", bytes([198, 51, 100, 7])),
    ("198.51.100.7", ipaddress.IPv4Address("198.51.100.7")),
    ("2001:db8::7", ipaddress.IPv6Address("2001:db8::7").packed),
    ("2001:db8::7", ipaddress.IPv6Address("2001:db8::7")),
    ("2001:db8::7", bytearray(ipaddress.IPv6Address("2001:db8::7").packed)),
]


@pytest.mark.parametrize("text,other", ADDRESS_FORMS)
def test_address_forms_share_a_key(text, other):
    assert source_key(text) == source_key(other)


@pytest.mark.parametrize("bad,error", [(b"\x01\x02\x03", ValueError),
                                       ("not-an-ip", ValueError),
                                       (12345, TypeError)])
def test_bad_sources_raise(limiter, bad, error):
    with pytest.raises(error):
        limiter.allow(bad)


def test_gc_drops_idle_entries(limiter, clock):
    limiter.allow(A)
    clock.advance(0.5)
    limiter.allow(B)
    assert len(limiter) == 2
    clock.advance(0.5)        # A idle exactly 1 s: kept (the kernel drops > 1 s)
    limiter.gc()
    assert len(limiter) == 2
    clock.advance(0.001)
    limiter.gc()
    assert len(limiter) == 1  # A gone, B idle 0.501 s
    clock.advance(1.0)
    limiter.gc()
    assert len(limiter) == 0


def test_gc_runs_lazily_from_allow(limiter, clock):
    for i in range(10):
        limiter.allow(f"203.0.113.{i}")
    assert len(limiter) == 10
    clock.advance(0.9)
    limiter.allow(A)          # less than a second since the last gc: no sweep
    assert len(limiter) == 11
    clock.advance(0.2)        # > 1 s since start: this allow sweeps first
    limiter.allow(B)
    assert len(limiter) == 2  # A and B; the 203.0.113.x were idle 1.1 s


def test_a_forgotten_source_starts_with_a_full_bucket(limiter, clock):
    for _ in range(5):
        assert limiter.allow(A)
    assert not limiter.allow(A)
    clock.advance(2.0)
    limiter.gc()
    assert len(limiter) == 0
    run(limiter, clock, [(0, A, True)] * 5 + [(0, A, False)])


def test_table_is_bounded(clock):
    limiter = RateLimiter(clock=clock, max_entries=3)
    assert all(limiter.allow(f"192.0.2.{i}") for i in range(3))
    assert not limiter.allow("192.0.2.99")     # full: new sources refused
    assert limiter.allow("192.0.2.0")          # known sources still served
    assert len(limiter) == 3
    clock.advance(1.5)
    assert limiter.allow("192.0.2.99")         # idle entries expired
    assert len(limiter) == 1


def test_clock_stepping_back_does_not_drain(limiter, clock):
    for _ in range(5):
        assert limiter.allow(A)
    clock.advance(0.05)
    clock.advance(-5.0)
    assert not limiter.allow(A)
    clock.advance(5.05)
    assert limiter.allow(A)


def test_custom_rate_and_burst(clock):
    limiter = RateLimiter(clock=clock, packets_per_second=2, burst=1)
    run(limiter, clock, [(0, A, True), (0, A, False), (0.4, A, False), (0.1, A, True)])
