"""The underlay guard (bpf/xdp_guard.c), in the real kernel.

Two tiers. First the program alone: BPF_PROG_TEST_RUN runs it on crafted
Ethernet frames, for the edge cases of parsing (fragments, extension
headers, lying lengths) without a network. Then on a veth pair, in native
and in generic mode:

    netns <run>-g (guarded)                   netns <run>-p (peer)
    vg  192.0.2.1/24  2001:db8:1::1/64  ----  vp  192.0.2.2/24  2001:db8:1::2/64
    XDP guard on vg, port PORT                raw IP sockets: crafted packets,
    UDP sinks on PORT and OTHER_PORT          spoofed sources

Each crafted packet is followed by a marker (a valid data message, same
family, same sink): when the marker arrives, the guard has judged the
packet before it, so the sink shows whether it passed and the counters
show why.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import socket
import struct
import time
from contextlib import contextmanager

import pytest
from pyroute2 import IPRoute

import bpflayout
from wgebpf.kernel import bpfmaps
from wgebpf.lab import netns
from wgebpf.lab import flood as F
from wgebpf.kernel import xdp_guard as X
from wgebpf.wireguard.cookie import CookieChecker, CookieGenerator, MacState, mac1_key
from wgebpf.wireguard.scheduler import FakeClock
from wgebpf.wireguard.crypto import MAC
from wgebpf.wireguard import messages

PORT, OTHER_PORT = 51820, 51999
KNOWN, UNKNOWN, MARKER = 0x1A2B3C4D, 0x00000007, 0x0BADCAFE
PUBLIC_KEY = bytes(range(32))
G4, P4, G6, P6 = "192.0.2.1", "192.0.2.2", "2001:db8:1::1", "2001:db8:1::2"
ETH4 = bytes(12) + b"\x08\x00"
ETH6 = bytes(12) + b"\x86\xdd"


# -- messages -------------------------------------------------------------------

def data(index: int = KNOWN, length: int = 64, reserved: bytes = b"\0\0\0") -> bytes:
    head = F.wg_header(4, index, reserved) + struct.pack("<Q", 1)
    return (head + random.randbytes(length))[:length]


def initiation(good_mac: bool = True) -> bytes:
    return F.initiation(random.Random(), PUBLIC_KEY if good_mac else None)


def response(receiver: int = KNOWN, good_mac: bool = True) -> bytes:
    body = F.wg_header(2, 0x55) + struct.pack("<I", receiver) + random.randbytes(48)
    mac = MAC(mac1_key(PUBLIC_KEY), body) if good_mac else random.randbytes(16)
    return body + mac + bytes(16)


def cookie(receiver: int = KNOWN, length: int = 64) -> bytes:
    return (F.wg_header(3, receiver) + random.randbytes(56 + 8))[:length]


# (what, UDP payload, verdict counter)
MESSAGE_CASES = [
    ("data, known index", data(), "passed"),
    ("keepalive (32 bytes)", data(length=32), "passed"),
    ("data, unknown index", data(UNKNOWN), "unknown_index"),
    ("data, 31 bytes", data(length=31), "bad_length"),
    ("data, reserved byte set", data(reserved=b"\0\1\0"), "bad_type"),
    ("initiation, right mac1", initiation(), "passed"),
    ("initiation, wrong mac1", initiation(good_mac=False), "bad_mac1"),
    ("initiation, 147 bytes", initiation()[:147], "bad_length"),
    ("initiation, 149 bytes", initiation() + b"\0", "bad_length"),
    ("response to our index", response(), "passed"),
    ("response, unknown receiver", response(UNKNOWN), "unknown_index"),
    ("response, wrong mac1", response(good_mac=False), "bad_mac1"),
    ("response, 93 bytes", response() + b"\0", "bad_length"),
    ("cookie reply to our index", cookie(), "passed"),
    ("cookie reply, unknown receiver", cookie(UNKNOWN), "unknown_index"),
    ("cookie reply, 65 bytes", cookie() + b"\0", "bad_length"),
    ("type 0", F.wg_header(0, KNOWN) + bytes(40), "bad_type"),
    ("type 5", F.wg_header(5, KNOWN) + bytes(40), "bad_type"),
    ("text", b"GET / HTTP/1.0\r\n\r\n", "bad_type"),
    ("7 bytes", data()[:7], "short"),
    ("empty", b"", "short"),
]


# -- the program alone (BPF_PROG_TEST_RUN) -------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def inside(ns: netns.Namespace):
    """Run the calling thread in `ns` (sockets made there stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if _libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(own, 0x40000000)
    finally:
        os.close(own)
        os.close(target)



@pytest.fixture(scope="module")
def guard(root):
    """Module scope; needs root. A loaded, unattached guard on PORT with
    KNOWN and MARKER as live indexes and the mac1 check on; rate limit off.
    Its test runs happen in a namespace of its own (g.test_ns), whose FIB
    the local-only check asks (forwarding off there: all judged)."""
    with netns.Namespace("t") as ns, X.XdpGuard("lo", PORT, public_key=PUBLIC_KEY, rate=0) as g:
        g.add_index(KNOWN)
        g.add_index(MARKER)
        g.test_ns = ns
        yield g


def verdicts(guard: X.XdpGuard, frame: bytes) -> tuple[int, dict[str, int]]:
    before = guard.counters()
    with inside(guard.test_ns):     # BPF_PROG_TEST_RUN uses the caller's namespace
        ret, _ = guard.run(frame)
    after = guard.counters()
    return ret, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def v4(payload: bytes, dport: int = PORT, src: str = P4) -> bytes:
    return ETH4 + F.udp_packet(src, G4, 40000, dport, payload)


def v6(payload: bytes, dport: int = PORT, src: str = P6) -> bytes:
    return ETH6 + F.udp_packet(src, G6, 40000, dport, payload)


EXPECTED_RET = {r: X.XDP_PASS for r in X.PASS_REASONS}


@pytest.mark.netns
@pytest.mark.parametrize("family", [v4, v6], ids=["v4", "v6"])
@pytest.mark.parametrize("what,payload,reason", MESSAGE_CASES, ids=[c[0] for c in MESSAGE_CASES])
def test_message_verdicts(guard, family, what, payload, reason):
    ret, delta = verdicts(guard, family(payload))
    verdict = {k: v for k, v in delta.items() if k in X.PASS_REASONS + X.DROP_REASONS}
    assert verdict == {reason: 1}, delta
    assert ret == EXPECTED_RET.get(reason, X.XDP_DROP)


def _udp_len_lie(frame: bytes, ip_header_len: int, delta: int) -> bytes:
    at = 14 + ip_header_len + 4
    (n,) = struct.unpack_from("!H", frame, at)
    return frame[:at] + struct.pack("!H", n + delta) + frame[at + 2:]


def _ipv4_frag(payload: bytes, frag: int, dport: int = PORT) -> bytes:
    """An IPv4 packet whose payload is `payload` (UDP header included or
    not), with flags/offset `frag`."""
    ip = F.ipv4_header(bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1]), socket.IPPROTO_UDP,
                       len(payload), ident=7, frag=frag)
    return ETH4 + ip + payload


def _ipv6_ext(payload_with_udp: bytes, exts: list[tuple[int, bytes]]) -> bytes:
    """IPv6 with extension headers [(type, body)] before the UDP datagram;
    each body is padded to its 8-byte unit."""
    chain, types = b"", [t for t, _ in exts] + [socket.IPPROTO_UDP]
    for i, (t, body) in enumerate(exts):
        if t == 44:
            chain += bytes([types[i + 1], 0]) + body
        else:
            full = (2 + len(body) + 7) // 8 * 8
            chain += bytes([types[i + 1], full // 8 - 1]) + body.ljust(full - 2, b"\0")
    ip = F.ipv6_header(socket.inet_pton(socket.AF_INET6, P6), socket.inet_pton(socket.AF_INET6, G6),
                       types[0], len(chain) + len(payload_with_udp))
    return ETH6 + ip + chain + payload_with_udp


def _udp(payload: bytes, dport: int = PORT, length: int | None = None) -> bytes:
    return struct.pack("!HHHH", 40000, dport, length or 8 + len(payload), 0) + payload


PARSE_CASES = [
    # (what, frame, verdict)
    ("another UDP port", v4(b"junk", OTHER_PORT), "other"),
    ("IPv6, another UDP port", v6(b"junk", OTHER_PORT), "other"),
    ("TCP", ETH4 + F.ipv4_header(bytes(4), bytes(4), socket.IPPROTO_TCP, 20) + bytes(20), "other"),
    ("ARP", bytes(12) + b"\x08\x06" + bytes(28), "other"),
    ("VLAN-tagged", bytes(12) + b"\x81\x00\x00\x05\x08\x00" + v4(b"junk")[14:], "other"),
    ("UDP header cut off", v4(b"")[:14 + 20 + 4], "other"),
    ("UDP length > IP payload", _udp_len_lie(v4(data()), 20, +1), "bad_length"),
    ("UDP length < IP payload", _udp_len_lie(v4(data()), 20, -1), "bad_length"),
    ("UDP length < 8", _udp_len_lie(v4(b""), 20, -1), "bad_length"),
    ("IPv6 UDP length lie", _udp_len_lie(v6(data()), 40, +4), "bad_length"),
    ("frame shorter than IP says", v4(data())[:-4], "bad_length"),
    ("Ethernet padding after the packet", v4(data()) + bytes(20), "passed"),
    ("IPv4 first fragment, data to us", _ipv4_frag(_udp(data()[:48], length=8 + 96), 0x2000), "passed"),
    ("IPv4 first fragment, junk type", _ipv4_frag(_udp(b"\x09" * 48, length=8 + 96), 0x2000), "bad_type"),
    ("IPv4 first fragment, UDP length too short", _ipv4_frag(_udp(data()[:48], length=8 + 40), 0x2000),
     "bad_length"),
    ("IPv4 fragmented initiation", _ipv4_frag(_udp(initiation()[:48], length=8 + 148), 0x2000),
     "bad_length"),
    ("IPv4 later fragment", _ipv4_frag(b"\x09" * 48, 0x2000 | 7), "fragment"),
    ("IPv4 last fragment", _ipv4_frag(b"\x09" * 48, 13), "fragment"),
    ("IPv6 destination options, junk", _ipv6_ext(_udp(b"\x09" * 16), [(60, b"")]), "bad_type"),
    ("IPv6 hop-by-hop + routing, data to us", _ipv6_ext(_udp(data()), [(0, b""), (43, b"\0" * 6)]),
     "passed"),
    ("IPv6 first fragment, junk", _ipv6_ext(_udp(b"\x09" * 40, length=200), [(44, b"\x00\x01" + bytes(4))]),
     "bad_type"),
    ("IPv6 later fragment", _ipv6_ext(b"\x09" * 40, [(44, b"\x00\x21" + bytes(4))]), "fragment"),
    (f"IPv6 {X.IPV6_EXT_MAX + 1} extension headers, junk",
     _ipv6_ext(_udp(b"\x09" * 16), [(60, b"")] * (X.IPV6_EXT_MAX + 1)), "ext_chain"),
    (f"IPv6 {X.IPV6_EXT_MAX + 1} extension headers, TCP",
     _ipv6_ext(bytes(20), [(60, b"")] * X.IPV6_EXT_MAX + [(6, b"")]), "ext_chain"),
    (f"IPv6 {X.IPV6_EXT_MAX} extension headers, junk",
     _ipv6_ext(_udp(b"\x09" * 16), [(60, b"")] * X.IPV6_EXT_MAX), "bad_type"),
    ("IPv6 ICMPv6", ETH6 + F.ipv6_header(bytes(16), bytes(16), 58, 8) + bytes(8), "other"),
]


@pytest.mark.netns
@pytest.mark.parametrize("what,frame,reason", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parsing(guard, what, frame, reason):
    ret, delta = verdicts(guard, frame)
    verdict = {k: v for k, v in delta.items() if k in X.PASS_REASONS + X.DROP_REASONS}
    assert verdict == {reason: 1}, delta
    assert ret == EXPECTED_RET.get(reason, X.XDP_DROP)


@pytest.mark.netns
def test_port_zero_turns_the_guard_off(guard):
    try:
        guard.set_port(0)
        assert verdicts(guard, v4(b"junk"))[1] == {"other": 1}
    finally:
        guard.set_port(PORT)
    assert verdicts(guard, v4(b"junk"))[1] == {"short": 1}


@pytest.mark.netns
def test_without_a_public_key_mac1_is_not_checked(guard):
    try:
        guard.set_public_key(None)
        assert verdicts(guard, v4(initiation(good_mac=False)))[1] == {"passed": 1, "initiations": 1}
    finally:
        guard.set_public_key(PUBLIC_KEY)
    assert verdicts(guard, v4(initiation(good_mac=False)))[1] == {"bad_mac1": 1, "initiations": 1}


@pytest.mark.netns
def test_indexes_follow_the_control_plane(guard):
    extra = 0xFEEDF00D
    assert verdicts(guard, v4(data(extra)))[1] == {"unknown_index": 1}
    guard.add_index(extra)
    assert extra in guard.indices()
    assert verdicts(guard, v4(data(extra)))[1] == {"passed": 1}
    assert verdicts(guard, v4(cookie(extra)))[1] == {"passed": 1}
    guard.remove_index(extra)
    guard.remove_index(extra)       # absent: no error
    assert verdicts(guard, v4(data(extra)))[1] == {"unknown_index": 1}
    with pytest.raises(ValueError):
        guard.add_index(1 << 32)


# -- rate limit and load (program alone; the clock is the kernel's) ---------------------

@pytest.fixture
def fresh(root):
    """Function scope; needs root. A guard of its own (empty buckets and
    load window), unattached."""
    with netns.Namespace("t") as ns, X.XdpGuard("lo", PORT, public_key=PUBLIC_KEY, rate=1,
                                                 burst=3, load_threshold=1_000_000) as g:
        g.add_index(KNOWN)
        g.test_ns = ns
        yield g


def _reasons(guard: X.XdpGuard, frames: list[bytes]) -> list[str]:
    out = []
    for frame in frames:
        _, delta = verdicts(guard, frame)
        out += [k for k in delta if k in X.PASS_REASONS + X.DROP_REASONS]
    return out


def load_up(guard: X.XdpGuard) -> None:
    """Put the guard under load for a minute: any handshake message trips
    it (threshold 0), here one from a source no test uses."""
    guard.set_load_threshold(0, hold=60)
    assert _reasons(guard, [v4(initiation(), src="192.0.2.250")]) == ["passed"]
    assert guard.under_load()


@pytest.mark.netns
@pytest.mark.parametrize("family", [v4, v6], ids=["v4", "v6"])
def test_no_rate_limit_without_load(fresh, family):
    """As in the kernel and wireguard-go: a source is rate limited only
    under load, so someone forging a real peer's address with valid-mac1
    initiations below the load threshold costs that peer nothing."""
    assert _reasons(fresh, [family(initiation())] * 20) == ["passed"] * 20
    assert _reasons(fresh, [family(response())] * 5) == ["passed"] * 5
    assert not fresh.under_load()


@pytest.mark.netns
@pytest.mark.parametrize("family,same_prefix,other_prefix", [
    (v4, None, "192.0.2.3"),
    (v6, "2001:db8:1::99", "2001:db8:5::2"),          # one /64 is one source
], ids=["v4", "v6"])
def test_under_load_handshakes_beyond_the_burst_are_dropped_per_source(fresh, family, same_prefix,
                                                                       other_prefix):
    load_up(fresh)
    first = [family(initiation())] * 5
    assert _reasons(fresh, first) == ["passed"] * 3 + ["rate_limited"] * 2
    # responses spend the same bucket
    assert _reasons(fresh, [family(response())]) == ["rate_limited"]
    if same_prefix:
        assert _reasons(fresh, [family(initiation(), src=same_prefix)]) == ["rate_limited"]
    assert _reasons(fresh, [family(initiation(), src=other_prefix)]) == ["passed"]
    # data and cookie replies are not rate limited
    assert _reasons(fresh, [family(data()), family(cookie())]) == ["passed", "passed"]
    # and junk never spends tokens
    fresh.set_rate(1, 1)
    assert _reasons(fresh, [family(initiation(good_mac=False), src=other_prefix)] * 10
                    + [family(initiation(), src=other_prefix)]) == ["bad_mac1"] * 10 + ["passed"]
    c = fresh.counters()
    assert c["mac2_missing"] >= 8 and c["mac2_valid"] == 0, c


@pytest.mark.netns
def test_bucket_refills_with_time(fresh):
    load_up(fresh)
    fresh.set_rate(20, 1)                      # a token every 50 ms
    frame = v4(initiation())
    assert _reasons(fresh, [frame, frame]) == ["passed", "rate_limited"]
    time.sleep(0.06)
    assert _reasons(fresh, [frame, frame]) == ["passed", "rate_limited"]
    fresh.set_rate(0, 1)                       # off
    assert _reasons(fresh, [frame] * 5) == ["passed"] * 5


# -- mac2: the bucket a spoofer cannot spend -------------------------------------------

SPORT = 40000       # the source port v4() and v6() write


def with_mac2(message: bytes, cookie_of: bytes, clock) -> bytes:
    """`message` with mac1 and mac2 as a peer holding cookie `cookie_of`
    writes them (cookie.CookieGenerator, the initiator's side)."""
    gen = CookieGenerator(PUBLIC_KEY, clock)
    gen.cookie, gen.cookie_birthdate = cookie_of, clock.monotonic()
    return bytes(gen.add_macs(bytearray(message)))


@pytest.fixture
def cookies(fresh):
    """The control plane's cookie side (cookie.CookieChecker) wired to the
    guard as attach does it: each new secret goes to the guard."""
    clock = FakeClock()
    checker = CookieChecker(PUBLIC_KEY, clock)
    checker.on_new_secret = fresh.set_cookie_secret
    return checker, clock


@pytest.mark.netns
@pytest.mark.parametrize("family,src", [(v4, P4), (v6, P6)], ids=["v4", "v6"])
@pytest.mark.parametrize("kind", [initiation, response], ids=["initiation", "response"])
def test_a_spoofer_cannot_spend_the_bucket_of_a_right_mac2(fresh, cookies, family, src, kind):
    checker, clock = cookies
    cookie_of_src = checker.make_cookie((src, SPORT))       # the secret reaches the guard
    load_up(fresh)
    # Someone forging src: right mac1, no cookie. They empty the bucket of
    # messages without mac2 (burst 3)...
    assert _reasons(fresh, [family(kind())] * 6) == ["passed"] * 3 + ["rate_limited"] * 3
    # ...but the real sender, which got its cookie at src, has its own.
    real = with_mac2(kind(), cookie_of_src, clock)
    assert checker.validate(real, (src, SPORT), under_load=True) is MacState.VALID_MAC_WITH_COOKIE
    assert _reasons(fresh, [family(real)]) == ["passed"]
    c = fresh.counters()
    assert c["mac2_valid"] == 1 and c["mac2_missing"] == 6, c
    # A cookie for another port proves nothing about this one.
    wrong = with_mac2(kind(), checker.make_cookie((src, SPORT + 1)), clock)
    assert _reasons(fresh, [family(wrong)]) == ["rate_limited"]
    # The proven bucket is a bucket too (burst 3 in all).
    assert _reasons(fresh, [family(real)] * 3) == ["passed"] * 2 + ["rate_limited"]


@pytest.mark.netns
def test_mac2_is_not_trusted_after_the_secret_expires(fresh):
    clock = FakeClock()
    checker = CookieChecker(PUBLIC_KEY, clock)
    checker.on_new_secret = lambda secret, lifetime: fresh.set_cookie_secret(secret, 0.2)
    real = with_mac2(initiation(), checker.make_cookie((P4, SPORT)), clock)
    load_up(fresh)
    assert _reasons(fresh, [v4(real)]) == ["passed"]
    assert fresh.counters()["mac2_valid"] == 1
    time.sleep(0.3)
    _reasons(fresh, [v4(real)])
    c = fresh.counters()
    assert c["mac2_valid"] == 1 and c["mac2_missing"] == 1, c


@pytest.mark.netns
def test_without_load_mac2_is_not_computed(fresh, cookies):
    checker, clock = cookies
    real = with_mac2(initiation(), checker.make_cookie((P4, SPORT)), clock)
    assert _reasons(fresh, [v4(real)] * 5) == ["passed"] * 5
    c = fresh.counters()
    assert c["mac2_valid"] == 0 and c["mac2_missing"] == 0, c


@pytest.mark.netns
def test_under_load_after_threshold_and_for_the_hold_time(fresh):
    fresh.set_rate(0, 1)
    fresh.set_load_threshold(3, hold=0.4)
    assert not fresh.under_load()
    _reasons(fresh, [v4(initiation(), src=f"192.0.2.{i}") for i in range(10, 13)])
    assert not fresh.under_load()              # 3 is not more than 3
    # junk does not count, responses do
    _reasons(fresh, [v4(initiation(good_mac=False))] * 5)
    assert not fresh.under_load()
    _reasons(fresh, [v4(response())])
    assert fresh.under_load()
    c = fresh.counters()
    assert c["load_onsets"] == 1 and c["initiations"] == 8 and c["responses"] == 1
    time.sleep(0.5)
    assert not fresh.under_load()


# -- header and mirror -----------------------------------------------------------------

@pytest.mark.netns
def test_xdp_guard_h_and_the_python_mirror_agree(root):
    """Every constant, struct size and field offset of xdp_guard.h equals
    xdp_guard.py's, as bcc's clang computes them."""
    bpflayout.assert_mirror(X, X.HEADER, "WGX", '#include "xdp_guard.h"\n')
    assert all(0 <= i < X.CNT_MAX for i in X.COUNTER_NAMES)
    assert set(X.PASS_REASONS + X.DROP_REASONS) == {X.COUNTER_NAMES[i] for i in range(X.CNT_EXT_CHAIN + 1)}


@pytest.mark.netns
def test_maps_of_the_program_have_the_mirrored_layouts(guard):
    expect = {
        X.MAP_CONFIG: (ctypes.c_uint32, X.Config, 1),
        X.MAP_INDEX: (ctypes.c_uint32, ctypes.c_uint32, X.INDEX_MAX),
        X.MAP_SOURCES: (X.SourceKey, X.Bucket, X.SOURCES_MAX),
        X.MAP_LOAD: (ctypes.c_uint32, X.Load, 1),
        X.MAP_COUNTERS: (ctypes.c_uint32, ctypes.c_uint64, X.CNT_MAX),
    }
    for name, (key, leaf, size) in expect.items():
        table = guard.bpf[name.encode()]
        assert ctypes.sizeof(table.Key) == ctypes.sizeof(key), name
        assert ctypes.sizeof(getattr(table, "sLeaf", table.Leaf)) == ctypes.sizeof(leaf), name
        assert table.max_entries == size, name
    assert bpfmaps.prog_info(guard.prog_fd).name == X.PROG


def test_mirrors_of_messages_py():
    for name in ("MESSAGE_HANDSHAKE_INITIATION", "MESSAGE_HANDSHAKE_RESPONSE",
                 "MESSAGE_HANDSHAKE_COOKIE", "MESSAGE_DATA", "MESSAGE_HANDSHAKE_INITIATION_LEN",
                 "MESSAGE_HANDSHAKE_RESPONSE_LEN", "MESSAGE_HANDSHAKE_COOKIE_LEN",
                 "MESSAGE_DATA_MIN_LEN", "MAC_LEN"):
        assert getattr(X, name) == getattr(messages, name), name


@pytest.mark.parametrize("length", [60, 116])
def test_blake2s_midstate_gives_wireguards_mac1(length):
    """The key-block state the loader hands the program, finished in Python
    the way the program finishes it, equals crypto.MAC with mac1's key."""
    msg = random.randbytes(length)
    h = X.mac1_state(PUBLIC_KEY)
    padded = msg.ljust(128 if length > 64 else 64, b"\0")
    if length > 64:
        h = X.blake2s_compress(h, padded[:64], 128, False)
        h = X.blake2s_compress(h, padded[64:], 64 + length, True)
    else:
        h = X.blake2s_compress(h, padded, 64 + length, True)
    got = b"".join(w.to_bytes(4, "little") for w in h)[:16]
    assert got == MAC(mac1_key(PUBLIC_KEY), msg)


# -- on a veth pair ------------------------------------------------------------------------

class Wire:
    """Namespaces g (guarded) and p (peer) joined by a veth (see the top)."""

    def __init__(self):
        self.g = netns.Namespace("g")
        try:
            self.p = netns.Namespace("p")
            self.vg, self.vp = netns.veth(self.g, self.p, [f"{G4}/24", f"{G6}/64"],
                                          [f"{P4}/24", f"{P6}/64"], prefix_a="vg", prefix_b="vp")
            self.socks: list[socket.socket] = []
            with inside(self.g):
                self.sink4 = self._udp(socket.AF_INET, "0.0.0.0", PORT)
                self.sink6 = self._udp(socket.AF_INET6, "::", PORT)
                self.other4 = self._udp(socket.AF_INET, "0.0.0.0", OTHER_PORT)
            with inside(self.p):
                self.raw4 = self._keep(socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                     socket.IPPROTO_RAW))
                self.raw6 = self._keep(socket.socket(socket.AF_INET6, socket.SOCK_RAW,
                                                     socket.IPPROTO_RAW))
        except BaseException:
            self.close()
            raise

    def _keep(self, s: socket.socket) -> socket.socket:
        self.socks.append(s)
        return s

    def _udp(self, family: int, addr: str, port: int) -> socket.socket:
        s = self._keep(socket.socket(family, socket.SOCK_DGRAM))
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((addr, port))
        s.settimeout(2.0)
        return s

    def send(self, packet: bytes) -> None:
        """An IP packet from p, as it is (raw socket: any source)."""
        if packet[0] >> 4 == 4:
            self.raw4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
        else:
            self.raw6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))

    def judged(self, packet: bytes, sink: socket.socket) -> list[bytes]:
        """Send `packet`, then a marker to the same sink; what the sink got
        before the marker."""
        v6 = packet[0] >> 4 == 6
        tag = os.urandom(8)
        marker = F.udp_packet(P6 if v6 else P4, G6 if v6 else G4, 40001,
                              sink.getsockname()[1], data(MARKER, 48)[:40] + tag)
        self.send(packet)
        self.send(marker)
        got = []
        while True:
            msg = sink.recv(65536)
            if msg.endswith(tag):
                return got
            got.append(msg)

    def xdp_shown(self) -> str:
        """The xdp part of `ip -d link show` for vg ('' if none)."""
        out = self.g.ip("-d", "link", "show", "dev", self.vg).stdout
        return " ".join(re.findall(r"\b(xdp\w*|prog/xdp id \d+)", out))

    def close(self) -> None:
        for s in getattr(self, "socks", []):
            s.close()
        for ns in ("p", "g"):
            if hasattr(self, ns):
                getattr(self, ns).close()


@pytest.fixture
def wire(root):
    """Function scope; needs root. A fresh Wire, closed after."""
    w = Wire()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(params=["native", "generic"])
def guarded(request, wire):
    """Function scope; needs `wire`. The guard attached to vg in the
    parametrized mode, KNOWN and MARKER live, mac1 checked, rate 1/s burst
    3. The test thread stays in g. Detached and closed after."""
    with inside(wire.g):
        g = X.XdpGuard(wire.vg, PORT, mode=request.param, public_key=PUBLIC_KEY, rate=1, burst=3)
        try:
            g.add_index(KNOWN)
            g.add_index(MARKER)
            g.attach()
            assert g.mode == request.param
            yield wire, g
        finally:
            g.close()


def _ip(src: str, dst: str, payload: bytes, dport: int = PORT) -> bytes:
    return F.udp_packet(src, dst, 40000, dport, payload)


@pytest.mark.netns
def test_only_what_passes_reaches_the_socket(guarded):
    wire, g = guarded
    for what, payload, reason in MESSAGE_CASES:
        if what.startswith(("initiation, right", "response to")):
            continue        # tested in test_rate_limit_on_the_wire
        for src, dst, sink in ((P4, G4, wire.sink4), (P6, G6, wire.sink6)):
            before = g.counters()
            got = wire.judged(_ip(src, dst, payload), sink)
            after = g.counters()
            assert got == ([payload] if reason == "passed" else []), (what, dst)
            # the marker passed too
            delta = {k: after[k] - before[k] for k in X.PASS_REASONS + X.DROP_REASONS
                     if after[k] != before[k]}
            expect = {"passed": 2} if reason == "passed" else {reason: 1, "passed": 1}
            assert {k: v for k, v in delta.items() if k != "other"} == expect, (what, dst)


@pytest.mark.netns
def test_rate_limit_on_the_wire(guarded):
    wire, g = guarded
    g.set_load_threshold(0, hold=60)           # the next handshake message trips it
    assert len(wire.judged(_ip("192.0.2.250", G4, initiation()), wire.sink4)) == 1
    assert g.under_load()
    ours = [_ip(P4, G4, initiation()) for _ in range(5)]
    got = [len(wire.judged(p, wire.sink4)) for p in ours]
    assert got == [1, 1, 1, 0, 0]
    assert g.counters()["rate_limited"] == 2
    # another source (spoofed, on-link) still gets through
    assert len(wire.judged(_ip("192.0.2.3", G4, initiation()), wire.sink4)) == 1
    got6 = [len(wire.judged(_ip(P6, G6, response()), wire.sink6)) for _ in range(4)]
    assert got6 == [1, 1, 1, 0]


@pytest.mark.netns
def test_fragments_of_a_good_datagram_reassemble(guarded):
    wire, g = guarded
    msg = data(KNOWN, 2000)
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(msg), 0) + msg      # no checksum (IPv4)
    src, dst = socket.inet_aton(P4), socket.inet_aton(G4)
    first = F.ipv4_header(src, dst, socket.IPPROTO_UDP, 1208, ident=99, frag=0x2000) + udp[:1208]
    rest = F.ipv4_header(src, dst, socket.IPPROTO_UDP, len(udp) - 1208, ident=99,
                         frag=1208 // 8) + udp[1208:]
    wire.send(first)
    assert wire.judged(rest, wire.sink4) == [msg]
    # a junk first fragment is dropped, so its later fragments never reassemble
    junk = b"\x09" * len(msg)
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(junk), 0) + junk
    wire.send(F.ipv4_header(src, dst, socket.IPPROTO_UDP, 1208, ident=100, frag=0x2000) + udp[:1208])
    assert wire.judged(F.ipv4_header(src, dst, socket.IPPROTO_UDP, len(udp) - 1208, ident=100,
                                     frag=1208 // 8) + udp[1208:], wire.sink4) == []
    c = g.counters()
    assert c["fragment"] == 2 and c["bad_type"] == 1


@pytest.mark.netns
def test_other_ports_and_protocols_are_untouched(guarded):
    wire, g = guarded
    junk = b"\x09 not wireguard"
    assert wire.judged(_ip(P4, G4, junk, OTHER_PORT), wire.other4) == [junk]
    wire.p.run(["ping", "-c", "1", "-W", "2", G4])
    wire.p.run(["ping", "-c", "1", "-W", "2", G6])
    # a TCP connection (refused: nobody listens; the RST came back)
    with inside(wire.p), socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((G4, PORT)) == errno.ECONNREFUSED
    assert g.counters()["other"] >= 5


@pytest.mark.netns
def test_datagrams_routed_through_the_host_are_not_judged(guarded):
    """With forwarding on, a datagram to the port for another host passes
    (a router must not filter its neighbours' WireGuard); ours is judged."""
    wire, g = guarded
    wire.g.sysctl("net.ipv4.conf.all.forwarding", 1)
    wire.g.sysctl("net.ipv6.conf.all.forwarding", 1)
    wire.g.ip("route", "add", "203.0.113.0/24", "via", P4)
    wire.g.ip("-6", "route", "add", "2001:db8:7::/64", "via", P6)
    wire.p.ip("route", "add", "203.0.113.0/24", "via", G4)
    wire.p.ip("-6", "route", "add", "2001:db8:7::/64", "via", G6)
    junk = b"\x09 not wireguard"
    for src, dst, beyond in ((P4, G4, "203.0.113.9"), (P6, G6, "2001:db8:7::9")):
        before = g.counters()
        wire.send(_ip(src, beyond, junk))
        assert wire.judged(_ip(src, dst, junk), wire.sink6 if ":" in dst else wire.sink4) == []
        after = g.counters()
        assert after["forwarded"] - before["forwarded"] == 1
        assert after["bad_type"] - before["bad_type"] == 1       # ours, still judged
    g.set_local_only(False)
    before = g.counters()["bad_type"]
    wire.send(_ip(P4, "203.0.113.9", junk))
    wire.judged(_ip(P4, G4, data()), wire.sink4)
    assert g.counters()["bad_type"] - before == 1


@pytest.mark.netns
def test_port_changes_live(guarded):
    wire, g = guarded
    junk = b"\x09 junk"
    assert wire.judged(_ip(P4, G4, junk), wire.sink4) == []
    g.set_port(OTHER_PORT)
    assert wire.judged(_ip(P4, G4, junk), wire.sink4) == [junk]
    assert wire.judged(_ip(P4, G4, junk, OTHER_PORT), wire.other4) == []
    assert g.port == OTHER_PORT


# -- attaching, refusing, detaching ----------------------------------------------------

def _foreign_program():
    """An XDP program wgebpf did not write (a plain XDP_PASS)."""
    from bcc import BPF
    b = BPF(text=b"int foreign(struct xdp_md *ctx) { return XDP_PASS; }")
    return b, b.load_func(b"foreign", BPF.XDP)


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_attach_shows_the_mode_and_detach_leaves_nothing(wire, mode):
    with inside(wire.g), X.XdpGuard(wire.vg, PORT, mode=mode) as g:
        assert wire.xdp_shown() == ""
        rec = g.attach()
        assert rec == {"ifindex": rec["ifindex"], "ifname": wire.vg, "prog_id": g.prog_id,
                       "mode": mode}
        shown = wire.xdp_shown()
        assert f"prog/xdp id {g.prog_id}" in shown
        assert ("xdpgeneric" in shown) == (mode == "generic")
        assert g.attach() == rec        # already attached: the same record
        g.detach()
        assert wire.xdp_shown() == "" and g.mode is None
        g.detach()                      # twice: nothing to do
        # crash cleanup (wgebpf detach) removes it through the record alone
        rec = g.attach()
        assert X.remove_xdp(rec)[0].startswith("removed XDP program")
        assert wire.xdp_shown() == ""


@pytest.mark.netns
def test_auto_prefers_native_and_falls_back_to_generic(wire):
    with inside(wire.g), X.XdpGuard(wire.vg, PORT) as g:
        g.attach()
        assert g.mode == "native"       # veth has native XDP
        g.detach()
        # A peer MTU beyond one page makes native XDP on veth refuse
        # (ERANGE, "Peer MTU is too large to set XDP"); auto goes generic.
        wire.p.ip("link", "set", "dev", wire.vp, "mtu", "9000")
        g.attach()
        assert g.mode == "generic"
        with pytest.raises(X.XdpError, match="native"):
            with X.XdpGuard(wire.vg, PORT, mode="native", force=True) as g2:
                g2.attach()


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_a_foreign_program_is_never_replaced_silently(wire, mode):
    with inside(wire.g):
        b, fn = _foreign_program()
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=wire.vg)[0]
                X._set_xdp(ipr, idx, fn.fd, X.MODE_FLAGS[mode])
            foreign_id = bpfmaps.prog_info(fn.fd).id
            for ours in ("auto", "native", "generic"):
                with X.XdpGuard(wire.vg, PORT, mode=ours) as g:
                    with pytest.raises(X.XdpBusyError) as e:
                        g.attach()
                    assert f"program {foreign_id} (foreign, {mode})" in str(e.value)
                    assert "--force" in str(e.value)
            assert f"prog/xdp id {foreign_id}" in wire.xdp_shown()
            with X.XdpGuard(wire.vg, PORT, force=True) as g:
                g.attach()
                assert g.replaced == {mode: foreign_id}
                shown = wire.xdp_shown()
                assert f"prog/xdp id {g.prog_id}" in shown and str(foreign_id) not in shown
                # ours in place: a detach that finds a foreign one leaves it
            assert wire.xdp_shown() == ""
        finally:
            b.cleanup()


@pytest.mark.netns
def test_detach_leaves_a_program_that_replaced_ours(wire):
    with inside(wire.g):
        b, fn = _foreign_program()
        try:
            g = X.XdpGuard(wire.vg, PORT, mode="generic")
            try:
                g.attach()
                with IPRoute() as ipr:      # someone swaps in theirs
                    X._set_xdp(ipr, g.record["ifindex"], fn.fd, X.MODE_FLAGS["generic"])
                g.detach()
                assert f"prog/xdp id {bpfmaps.prog_info(fn.fd).id}" in wire.xdp_shown()
            finally:
                g.close()
        finally:
            b.cleanup()


def test_modes_are_checked():
    with pytest.raises(ValueError):
        X.XdpGuard("lo", PORT, mode="offload")
