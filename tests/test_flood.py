"""Floods against the underlay guard alone (no tunnel yet), and the flood tool.

The Wire of test_bpf_xdp_guard.py: the guard on vg in namespace g (native
or generic), UDP sinks behind it; wgebpf.lab.flood sends from namespace p as
fast as one process can for a few seconds. While it runs, the test sends
probes at a steady pace: valid data messages (a live index) to the guarded
port and datagrams to another port. Afterwards:
  - the guarded sink got the probes and nothing else (no junk got through);
  - the guard's drop counters add up to exactly what the flood sent;
  - every probe to the other port arrived.
pytest -s prints drops per second and the program's ns per packet.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from test_bpf_xdp_guard import (G4, G6, KNOWN, MARKER, OTHER_PORT, PORT, PUBLIC_KEY, Wire,
                                data, inside)
from wgebpf.kernel import bpfmaps
from wgebpf.lab import flood as F
from wgebpf.kernel import xdp_guard as X

SECONDS = 2.0               # per flood: CI time, not a benchmark
MAX_PACKETS = 3_000_000
PROBE_INTERVAL = 0.01


class Probes:
    """From p: every PROBE_INTERVAL, one valid data message (index KNOWN) to
    the guarded port and one datagram to OTHER_PORT, until stopped."""

    def __init__(self, wire: Wire, target: str):
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        with inside(wire.p):
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.target, self.sent = target, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(PROBE_INTERVAL):
            n = self.sent.to_bytes(4, "big")
            self.sock.sendto(data(KNOWN, 40) + b"probe" + n, (self.target, PORT))
            self.sock.sendto(b"other" + n, (self.target, OTHER_PORT))
            self.sent += 1

    def __enter__(self) -> "Probes":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class Sink:
    """Reads a UDP socket in a thread until stopped; keeps what came."""

    def __init__(self, sock: socket.socket):
        self.sock, self.got = sock, []
        sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.got.append(self.sock.recv(65536))
            except socket.timeout:
                if self._stop.is_set():
                    return

    def stop(self) -> list[bytes]:
        time.sleep(0.3)     # the last probes in flight
        self._stop.set()
        self._thread.join()
        return self.got


@pytest.fixture(params=["native", "generic"])
def guarded(request, root):
    """Function scope; needs root. A Wire with the guard attached to vg
    (parametrized mode), KNOWN live, mac1 checked; closed after."""
    wire = Wire()
    try:
        with inside(wire.g):
            g = X.XdpGuard(wire.vg, PORT, mode=request.param, public_key=PUBLIC_KEY)
            try:
                g.add_index(KNOWN)
                g.add_index(MARKER)
                g.attach()
                yield wire, g
            finally:
                g.close()
    finally:
        wire.close()


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _flood_measured(wire: Wire, g: X.XdpGuard, target: str, kind: str, **kwargs):
    """Flood under BPF run-time statistics: (FloodResult, counter delta, ns/packet)."""
    before = g.counters()
    with bpfmaps.enable_stats():
        p0 = bpfmaps.prog_info(g.prog_fd)
        result = F.start_flood(wire.p, target, PORT, kind, SECONDS, MAX_PACKETS, **kwargs).wait()
        after = _settled_counters(g)
        p1 = bpfmaps.prog_info(g.prog_fd)
    runs = max(p1.run_cnt - p0.run_cnt, 1)
    return result, _delta(before, after), (p1.run_time_ns - p0.run_time_ns) / runs


def _settled_counters(g: X.XdpGuard, quiet: float = 0.1, limit: float = 3.0) -> dict[str, int]:
    """The guard's counters once the flood's last packets have been judged.

    Native XDP on a veth runs in the receiver's NAPI poll, after the sender's
    sendmsg has returned, so the last few hundred packets of a flood can still
    be queued when the flooder exits. Wait until every counter but "passed"
    (the probes keep passing) stays still for `quiet` seconds."""
    def flood_part(c):
        return {k: v for k, v in c.items() if k != "passed"}
    last, still_since, deadline = g.counters(), time.monotonic(), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(quiet / 4)
        now = g.counters()
        if flood_part(now) != flood_part(last):
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return last


@pytest.mark.netns
@pytest.mark.parametrize("target", [G4, G6], ids=["v4", "v6"])
def test_junk_flood_dies_in_xdp(guarded, target):
    wire, g = guarded
    sink = Sink(wire.sink6 if ":" in target else wire.sink4)
    other = Sink(wire.other4) if ":" not in target else None
    start = g.counters()
    with Probes(wire, target) as probes:
        result, delta, ns = _flood_measured(wire, g, target, "junk")
    got, got_other = sink.stop(), (other.stop() if other else None)
    whole = _delta(start, g.counters())     # the probes outlast the flood a little

    assert result.sent > 10_000, result
    # nothing of the junk got through; every probe did
    assert all(m[:1] == b"\x04" and b"probe" in m for m in got), [m[:16] for m in got[:5]]
    assert len(got) == probes.sent
    if got_other is not None:
        assert len(got_other) == probes.sent
    # the drop counters account for every junk packet, exactly
    drops = sum(delta.get(r, 0) for r in X.DROP_REASONS)
    assert drops == result.sent, delta
    assert sum(whole.get(r, 0) for r in X.DROP_REASONS) == drops, whole
    assert whole.get("passed", 0) == probes.sent
    print(f"\n{g.mode} {'v6' if ':' in target else 'v4'} junk: {result.sent} sent in "
          f"{result.seconds:.2f} s, {drops / result.seconds:,.0f} XDP drops/s, "
          f"{ns:.0f} ns/packet, {probes.sent} probes all through; {delta}")


@pytest.mark.netns
def test_handshake_floods(guarded):
    wire, g = guarded
    # Wrong mac1 from 254 sources: all dropped, none counts toward load.
    result, delta, ns = _flood_measured(wire, g, G4, "initiation", source="203.0.113.0/24")
    assert delta.get("bad_mac1") == result.sent == delta.get("initiations")
    assert not g.under_load() and "load_onsets" not in delta
    print(f"\n{g.mode} initiations, wrong mac1: {result.rate:,.0f}/s sent, "
          f"{delta['bad_mac1'] / result.seconds:,.0f} XDP drops/s, {ns:.0f} ns/packet")

    # Right mac1 from 1024 IPv6 /64s: each gets its burst and then its
    # rate; the rest is rate limited; the control plane is told it is
    # under load.
    sink = Sink(wire.sink6)
    result, delta, ns = _flood_measured(wire, g, G6, "initiation-mac1",
                                        source="2001:db8:f000::/36", public_key=PUBLIC_KEY)
    under_load = g.under_load()
    got = sink.stop()
    sources = min(F.POOL_SIZE, 1 << 28)
    assert delta["passed"] + delta["rate_limited"] == result.sent == delta["initiations"]
    bound = sources * (g._config.burst + g._config.rate * (result.seconds + 0.5))
    assert 0 < delta["passed"] <= bound, (delta, bound)
    assert len(got) == delta["passed"]            # what passed is what the socket got
    assert under_load and delta["load_onsets"] == 1
    print(f"{g.mode} initiations, right mac1, {sources} sources: {result.rate:,.0f}/s sent, "
          f"{delta['passed'] / result.seconds:,.0f}/s passed, "
          f"{delta['rate_limited'] / result.seconds:,.0f} XDP drops/s, {ns:.0f} ns/packet")


# -- the tool itself ---------------------------------------------------------------------

def test_pool_packets_are_well_formed():
    for kind in F.KINDS:
        pool = F.build_pool(kind, "192.0.2.1", PORT, source="203.0.113.0/24",
                            public_key=PUBLIC_KEY, seed=1, size=64)
        assert len(pool) == 64
        for p in pool:
            assert F.checksum(p[:20]) == 0                       # IPv4 header checksum
            assert p[9] == socket.IPPROTO_UDP and p[16:20] == bytes([192, 0, 2, 1])
            assert int.from_bytes(p[22:24], "big") == PORT
    v6 = F.build_pool("data", "2001:db8:1::1", PORT, source="2001:db8:f000::/36", size=4)
    assert len({p[8:16] for p in v6}) == 4                        # four /64s


@pytest.mark.parametrize("kind,lengths", [
    ("badlength", lambda t, n: n < 32 if t == 4 else n != {1: 148, 2: 92, 3: 64}[t]),
    ("data", lambda t, n: t == 4 and n >= 32),
    ("initiation", lambda t, n: t == 1 and n == 148),
])
def test_kinds_are_what_they_say(kind, lengths):
    rng = random.Random(3)
    for _ in range(200):
        p = F.payload(kind, rng, PUBLIC_KEY)
        assert lengths(int.from_bytes(p[:4], "little"), len(p)), (kind, p[:8], len(p))


@pytest.mark.parametrize("target,source", [("8.8.8.8", None), ("192.0.2.1", "10.0.0.0/8"),
                                           ("2001:4860::8888", None)])
def test_refuses_addresses_outside_the_documentation_prefixes(target, source):
    with pytest.raises(ValueError, match="documentation"):
        F.start_flood(None, target, PORT, "junk", 1, 10, source=source)


@pytest.mark.parametrize("seconds,packets", [(0, 10), (F.MAX_SECONDS + 1, 10), (1, 0),
                                             (1, F.MAX_PACKETS + 1)])
def test_bounds_are_enforced(seconds, packets):
    with pytest.raises(ValueError):
        F.start_flood(None, "192.0.2.1", PORT, "junk", seconds, packets)


@pytest.mark.netns
def test_packet_cap_stops_the_flood(guarded):
    wire, g = guarded
    assert F.flood(wire.p, G4, PORT, "data", 5, 1000) == 1000
    time.sleep(0.1)
    assert g.counters()["unknown_index"] == 1000
