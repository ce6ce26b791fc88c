"""The next-hop classifier and TAP steering programs, in the real kernel.

Topology (one namespace per test, the test's thread inside it):

    UDP sockets of the test
          |  kernel routing: routes/rules the test adds
          v
    TAP wgt... (NOARP)  198.51.100.1/24  2001:db8:100::1/64  fe80::1/64
      clsact egress: wg_nexthop (next hop -> allowed-ips -> slot: tag in the
                     destination MAC, worker queue by flow hash)
      steering:      wg_tun_steer (queue = skb->queue_mapping)
      queue 0: control plane   queues 1..3: workers

Peer slot s owns 198.51.100.(s+1)/32 and 2001:db8:100::(s+1)/128 (its
tunnel addresses) unless a case says otherwise. Each case sends UDP packets
with a unique payload and reads the frame that carries it: the peer is the
tag in its destination MAC, and a tagged frame must come out of a worker
queue, an untagged one out of queue 0.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import secrets
import select
import socket
import struct
import time

import pytest

from wgebpf.kernel import bpfmaps, nexthop
from wgebpf.kernel import tc
from wgebpf.kernel.nexthop import NextHopClassifier
from wgebpf.kernel.tun_steer import TunSteering

pytestmark = pytest.mark.netns

QUEUES = 4                      # queue 0 and three workers
PEER_ADDRS = {1: ("198.51.100.2", "2001:db8:100::2"),
              2: ("198.51.100.3", "2001:db8:100::3"),
              3: ("198.51.100.4", "2001:db8:100::4")}
SLOT_OF = {a: s for s, addrs in PEER_ADDRS.items() for a in addrs}
SO_MARK = 36
UDP_SEGMENT = 103               # setsockopt(SOL_UDP, ...): the kernel's UDP GSO

# -- namespace plumbing ----------------------------------------------------------

import bpflayout
from nsutil import fresh_netns, sh  # noqa: F401  (the netns fixture)
from taputil import Tap, slot_of


class Datapath:
    """TAP + classifier + steering, peers 1..3 on their tunnel addresses."""

    def __init__(self, read_route: bool = True, vnet_hdr: bool = False):
        self.name = f"wgt{secrets.token_hex(4)}"
        self.tun = Tap(self.name, QUEUES, vnet_hdr=vnet_hdr)
        self.classifier = self.steering = None
        try:
            dev = self.name
            sh(f"ip link set {dev} up"
               f" && ip addr add 198.51.100.1/24 dev {dev}"
               f" && ip addr add 2001:db8:100::1/64 dev {dev} nodad"
               f" && ip addr add fe80::1/64 dev {dev} nodad"
               # bpf_fib_lookup refuses (FWD_DISABLED) without forwarding on the device
               f" && sysctl -qw net.ipv4.conf.{dev}.forwarding=1"
               f" && sysctl -qw net.ipv6.conf.{dev}.forwarding=1")
            self.classifier = NextHopClassifier(dev, queues=QUEUES, read_route=read_route)
            self.classifier.attach()
            self.steering = TunSteering(self.tun, self.classifier)
            self.steering.attach()
            for slot, addrs in PEER_ADDRS.items():
                self.classifier.set_peer(slot, [f"{addrs[0]}/32", f"{addrs[1]}/128"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for part in (self.steering, self.classifier):
            if part is not None:
                part.close()
        self.tun.close()

    def send(self, dst: str, *, sport: int = 0, mark: int = 0, bind_dev: str = "",
             payload: bytes | None = None) -> bytes:
        """One UDP datagram to dst:9; returns its (unique) payload."""
        payload = payload or b"wgebpf-" + secrets.token_hex(8).encode()
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            if mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            if bind_dev:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bind_dev.encode())
            if sport:
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
            s.sendto(payload, (dst, 9))
        return payload

    def frames(self, until, timeout: float = 2.0) -> list[tuple[int, bytes]]:
        """(queue, frame) read until until(frames) holds; raises on timeout."""
        poller = select.poll()
        for fd in self.tun.fds:
            poller.register(fd, select.POLLIN)
        got: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                q = self.tun.fds.index(fd)
                while (frame := self.tun.read(q)) is not None:
                    got.append((q, frame))
            if until(got):
                return got
        raise AssertionError(f"frames wanted did not come out of any queue: {got!r}")

    def where(self, payload: bytes, timeout: float = 2.0) -> tuple[int, int]:
        """(queue, slot of its tag) of the frame carrying `payload`. A tagged
        frame must be on a worker's queue, an untagged one on queue 0."""
        def found(got):
            return [(q, f) for q, f in got if f.endswith(payload)]
        q, frame = found(self.frames(found, timeout))[0]
        slot = slot_of(frame)
        if slot:
            assert 1 <= q < len(self.tun.fds), (q, slot)
        else:
            assert q == bpfmaps.QUEUE_CONTROL and frame[:6] == self.tun.mac, (q, frame[:6])
        return q, slot

    def queue_of(self, payload: bytes, timeout: float = 2.0) -> int:
        return self.where(payload, timeout)[0]

    def route(self, dst: str, **kw) -> int:
        """Send one datagram to dst and return the peer slot its frame names (0: none)."""
        return self.where(self.send(dst, **kw))[1]

    def drain(self) -> int:
        n = 0
        for q in range(len(self.tun.fds)):
            while self.tun.read(q) is not None:
                n += 1
        return n

    def inject(self, ethertype: int, payload: bytes) -> None:
        """A frame sent on the device with a packet socket: no route attached."""
        frame = self.tun.mac + bytes.fromhex("020000000001") + struct.pack("!H", ethertype)
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((self.name, 0))
            s.send(frame + payload)


@pytest.fixture
def dp(netns):
    """Function scope; needs `netns`. The Datapath of the module docstring,
    its classifier reading the kernel's route (route mode)."""
    d = Datapath()
    try:
        assert d.classifier.route_mode == "route", d.classifier.route_mode_reason
        yield d
    finally:
        d.close()


@pytest.fixture
def dp_lookup(netns):
    """The same, its classifier built without the route read (lookup mode)."""
    d = Datapath(read_route=False)
    try:
        assert d.classifier.route_mode == "lookup"
        yield d
    finally:
        d.close()


# -- routing decisions -------------------------------------------------------


def test_route_via_a_peer_and_replace_moves_it(dp):
    sh(f"ip route add 203.0.113.0/24 via 198.51.100.3 dev {dp.name}")
    assert dp.route("203.0.113.9") == SLOT_OF["198.51.100.3"]
    sh(f"ip route replace 203.0.113.0/24 via 198.51.100.4 dev {dp.name}")
    assert dp.route("203.0.113.9") == SLOT_OF["198.51.100.4"]
    nh = dp.classifier.nexthop_counters()
    assert nh[ipaddress.ip_address("198.51.100.3")].packets >= 1
    assert nh[ipaddress.ip_address("198.51.100.4")].packets >= 1


@pytest.mark.parametrize("dst", ["198.51.100.2", "198.51.100.4", "2001:db8:100::3"])
def test_on_link_destination_goes_to_its_own_peer(dp, dst):
    assert dp.route(dst) == SLOT_OF[dst]


def test_ecmp_spreads_flows_over_both_peers(dp):
    # Hash on L4 ports too (policy 1; the default 0 hashes addresses only).
    sh("sysctl -qw net.ipv4.fib_multipath_hash_policy=1")
    sh(f"ip route add 203.0.113.0/24 nexthop via 198.51.100.2 dev {dp.name}"
       f" nexthop via 198.51.100.3 dev {dp.name}")
    ports = range(40000, 40064)
    first = {p: dp.route("203.0.113.9", sport=p) for p in ports}
    assert set(first.values()) == {1, 2}
    # The same flow keeps its peer.
    again = {p: dp.route("203.0.113.9", sport=p) for p in list(ports)[:16]}
    assert again == {p: first[p] for p in again}


def test_nexthop_object_group_follows_the_kernels_member(dp):
    """A route via a nexthop-object group: each flow reaches the member
    `ip route get` names for it (unconnected sockets: the kernel hashes a
    source of 0.0.0.0)."""
    sh("sysctl -qw net.ipv4.fib_multipath_hash_policy=1"
       f" && ip nexthop add id 1 via 198.51.100.3 dev {dp.name}"
       f" && ip nexthop add id 2 via 198.51.100.4 dev {dp.name}"
       f" && ip nexthop add id 10 group 1/2"
       f" && ip route add 203.0.113.0/24 nhid 10")
    got = {}
    for port in range(40000, 40032):
        kernel = json.loads(sh(f"ip -j route get 203.0.113.9 ipproto udp sport {port}"
                               f" dport 9"))[0]["gateway"]
        got[port] = (SLOT_OF[kernel], dp.route("203.0.113.9", sport=port))
    assert all(k == w for k, w in got.values()), got
    assert {k for k, _ in got.values()} == {2, 3}


def test_fwmark_rule_picks_another_peer(dp):
    sh(f"ip route add 203.0.113.0/24 via 198.51.100.3 dev {dp.name}"
       f" && ip route add 203.0.113.0/24 via 198.51.100.4 dev {dp.name} table 100"
       f" && ip rule add fwmark 7 table 100")
    assert dp.route("203.0.113.9") == SLOT_OF["198.51.100.3"]
    assert dp.route("203.0.113.9", mark=7) == SLOT_OF["198.51.100.4"]
    assert dp.route("203.0.113.9", mark=8) == SLOT_OF["198.51.100.3"]


def test_ipv6_link_local_next_hop(dp):
    dp.classifier.set_peer(2, ["198.51.100.3/32", "2001:db8:100::3/128", "fe80::3/128"])
    sh(f"ip -6 route add 2001:db8:300::/64 via fe80::3 dev {dp.name}")
    assert dp.route("2001:db8:300::9") == 2
    assert dp.classifier.nexthop_counters()[ipaddress.ip_address("fe80::3")].packets >= 1


def test_ipv4_route_via_ipv6_link_local_gateway(dp):
    # RFC 5549 style: the lookup answers with an IPv6 next hop for IPv4.
    dp.classifier.set_peer(3, ["198.51.100.4/32", "2001:db8:100::4/128", "fe80::4/128"])
    sh(f"ip route add 203.0.113.0/24 via inet6 fe80::4 dev {dp.name}")
    assert dp.route("203.0.113.9") == 3


def test_next_hop_no_peer_owns_goes_to_queue_0_and_is_counted(dp):
    sh(f"ip route add 203.0.113.0/24 via 198.51.100.77 dev {dp.name}")
    before = dp.classifier.counters()
    assert dp.route("203.0.113.9") == bpfmaps.QUEUE_CONTROL
    after = dp.classifier.counters()
    assert after["no_peer"] - before["no_peer"] >= 1
    assert after["peer"] == before["peer"]
    assert dp.classifier.nexthop_counters()[ipaddress.ip_address("198.51.100.77")].packets >= 1


def _more_specific_routes_by_a_veth(dp) -> None:
    """203.0.113.0/24 and 2001:db8:300::/48 via peer slot 2 on the TUN, and
    more specific halves of them via a veth (slot 3 holds the IPv6 one)."""
    other = f"wgv{secrets.token_hex(4)}"
    sh(f"ip link add {other} type veth peer name {other}p"
       f" && ip link set {other} up && ip link set {other}p up"
       f" && ip addr add 192.0.2.1/24 dev {other}"
       f" && ip addr add 2001:db8:1::1/64 dev {other} nodad"
       f" && ip route add 203.0.113.0/24 via 198.51.100.3 dev {dp.name}"
       f" && ip route add 203.0.113.0/25 via 192.0.2.2 dev {other}"
       f" && ip -6 route add 2001:db8:300::/48 via fe80::3 dev {dp.name}"
       f" && ip -6 route add 2001:db8:300::/64 via 2001:db8:1::2 dev {other}")
    dp.classifier.set_peer(2, ["198.51.100.3/32", "fe80::3/128"])
    dp.classifier.set_peer(3, ["198.51.100.4/32", "2001:db8:300::/64"])


def test_bound_socket_takes_the_kernels_route_on_ours(dp):
    """A socket bound to the TUN sends where a more specific route leaves by
    another device (a veth here). The kernel keeps to the TUN's own route,
    and the classifier reads that route: IPv4 and IPv6 both reach the
    gateway's peer, with no lookup."""
    _more_specific_routes_by_a_veth(dp)
    before, routed = dp.classifier.counters(), dp.classifier.route_counters()["dst"]
    assert dp.route("203.0.113.9", bind_dev=dp.name) == 2
    assert dp.route("2001:db8:300::9", bind_dev=dp.name) == 2
    after = dp.classifier.route_counters()
    assert after["dst"] == routed + 2
    assert dp.classifier.counters()["fib_other_device"] == before["fib_other_device"]
    assert set(after["fallbacks"]) == set(bpfmaps.FALLBACK_REASONS)


def test_route_through_another_device_is_looked_up_again_on_ours(dp_lookup):
    """A socket bound to the TUN sends where a more specific route leaves by
    another device (a veth here). The kernel keeps to the TUN's own route;
    the classifier's flow-hashed lookup sees the other route first, so it
    asks again pinned to the TUN (IPv4: exactly the kernel's answer). IPv6's
    pinned lookup only prefers the device, so there the destination decides."""
    dp = dp_lookup
    _more_specific_routes_by_a_veth(dp)
    before = dp.classifier.counters()
    assert dp.route("203.0.113.9", bind_dev=dp.name) == 2
    mid = dp.classifier.counters()
    assert mid["fib_other_device"] == before["fib_other_device"] + 1
    assert mid["fib_destination_fallback"] == before["fib_destination_fallback"]
    assert dp.route("2001:db8:300::9", bind_dev=dp.name) == 3
    after = dp.classifier.counters()
    assert after["fib_other_device"] == mid["fib_other_device"] + 1
    assert after["fib_destination_fallback"] == mid["fib_destination_fallback"] + 1


def test_allowedips_mode_lets_the_destination_decide(dp):
    sh(f"ip route add 203.0.113.0/24 via 198.51.100.3 dev {dp.name}")
    dp.classifier.set_peer(1, ["198.51.100.2/32", "2001:db8:100::2/128", "203.0.113.0/24"])
    assert dp.route("203.0.113.9") == 2            # nexthop mode: the gateway's peer
    dp.classifier.set_mode("allowedips")
    assert dp.route("203.0.113.9") == 1            # classic: the destination's peer
    assert dp.route("198.51.100.4") == 3
    assert dp.route("198.51.100.99") == 0


def test_peer_changes_follow_immediately(dp):
    sh(f"ip route add 203.0.113.0/24 via 198.51.100.3 dev {dp.name}")
    assert dp.route("203.0.113.9") == 2
    dp.classifier.set_peer(3, ["198.51.100.4/32", "198.51.100.3/32"])   # .3 moves to peer 3
    assert dp.route("203.0.113.9") == 3
    assert dp.classifier.peers()[2] == {ipaddress.ip_network("2001:db8:100::3/128")}
    dp.classifier.remove_peer(3)
    assert dp.route("203.0.113.9") == 0


def test_no_worker_queue_goes_to_queue_0(dp):
    """queues == 1: no worker to take a peer's packet. Queue 0, untagged,
    counted no_queue; back to the workers once they are there."""
    dp.classifier.set_queue_count(1)
    before = dp.classifier.counters()
    assert dp.where(dp.send("198.51.100.4")) == (0, 0)
    after = dp.classifier.counters()
    assert after["no_queue"] == before["no_queue"] + 1 and after["peer"] == before["peer"]
    dp.classifier.set_queue_count(QUEUES)
    assert dp.route("198.51.100.3") == 2


def test_forwarding_off_does_not_matter_to_the_route_read(dp):
    sh(f"sysctl -qw net.ipv4.conf.{dp.name}.forwarding=0")
    assert dp.route("198.51.100.2") == 1


def test_forwarding_off_is_counted(dp_lookup):
    dp = dp_lookup
    sh(f"sysctl -qw net.ipv4.conf.{dp.name}.forwarding=0")
    before = dp.classifier.counters()["fib_forwarding_disabled"]
    assert dp.route("198.51.100.2") == 0
    assert dp.classifier.counters()["fib_forwarding_disabled"] == before + 1


@pytest.mark.parametrize("protocol, head, reason", [
    (0x88B5, b"\x00" * 30, "not_ip"),          # IEEE local experimental ethertype
    (0x0800, b"\x45\x00\x00", "truncated"),    # IPv4 header cut short
    (0x86DD, b"\x60\x00\x00", "truncated"),    # IPv6 header cut short
])
def test_non_ip_and_truncated_frames(dp, protocol, head, reason):
    """Frames sent on the device with a packet socket still pass tc egress."""
    payload = head + secrets.token_bytes(8)
    before = dp.classifier.counters()[reason]
    dp.inject(protocol, payload)
    assert dp.where(payload) == (0, 0)
    assert dp.classifier.counters()[reason] == before + 1


@pytest.mark.parametrize("dst, slot", [("198.51.100.3", 2), ("2001:db8:100::4", 3)])
def test_packet_socket_injection_falls_back_to_the_lookup(dp, dst, slot):
    """A packet sent on the device with a packet socket has no route attached:
    the classifier looks it up instead and counts the fallback as no_dst."""
    payload = b"wgebpf-" + secrets.token_hex(8).encode()
    packet = _udp_packet("198.51.100.1" if slot == 2 else "2001:db8:100::1", dst, payload)
    protocol = 0x0800 if ":" not in dst else 0x86DD
    before = dp.classifier.route_counters()
    dp.inject(protocol, packet)
    assert dp.where(payload)[1] == slot
    after = dp.classifier.route_counters()
    # (no check of "dst": the device's own IPv6 chatter, MLD and router
    # solicitations, may be routed meanwhile)
    assert after["fallbacks"]["no_dst"] == before["fallbacks"]["no_dst"] + 1


def test_test_run_has_no_dst_and_is_looked_up(dp):
    """BPF_PROG_TEST_RUN builds an skb without a route from an Ethernet
    frame: counted as no_dst, classified by the lookup, and the frame that
    comes back carries the peer's tag."""
    frame = _frame(_udp_packet("2001:db8:100::1", "2001:db8:100::3", b"test-run"))
    before_peer = dp.classifier.counters()["peer"]
    before = dp.classifier.route_counters()
    before_nh = dp.classifier.nexthop_counters().get(ipaddress.ip_address("2001:db8:100::3"))
    retval, out, _ = _test_run_cls(dp.classifier.prog_fd, frame, socket.if_nametoindex(dp.name))
    assert retval == 0                      # TC_ACT_OK
    assert out[:6] == bpfmaps.tag(2) and out[6:] == frame[6:]
    # the lookup named the (on-link) destination as next hop
    nh = dp.classifier.nexthop_counters()[ipaddress.ip_address("2001:db8:100::3")]
    assert nh.packets == (before_nh.packets if before_nh else 0) + 1
    assert nh.bytes - (before_nh.bytes if before_nh else 0) == len(frame) - 14   # IP only
    after = dp.classifier.route_counters()
    # (no check of "dst": the device's own IPv6 chatter, MLD and router
    # solicitations, may be routed meanwhile)
    assert after["fallbacks"]["no_dst"] == before["fallbacks"]["no_dst"] + 1
    assert dp.classifier.counters()["peer"] == before_peer + 1


def _test_run_cls(prog_fd: int, frame: bytes, ifindex: int) -> tuple[int, bytes, int]:
    """(return value, frame out, queue_mapping out) of one BPF_PROG_TEST_RUN
    of a tc program, with ctx->ifindex set (the run's device, which the
    lookup uses)."""
    from wgebpf.kernel.xdp_guard import _BPF_PROG_TEST_RUN, _TestRunAttr
    buf = ctypes.create_string_buffer(bytes(frame), len(frame))
    out = ctypes.create_string_buffer(len(frame) + 256)
    ctx_in = (ctypes.c_uint32 * 48)()       # struct __sk_buff, 192 bytes
    ctx_in[10] = ifindex                    # __sk_buff.ifindex (offset 40)
    ctx_out = (ctypes.c_uint32 * 48)()
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                        data_in=ctypes.addressof(buf), repeat=1,
                        data_out=ctypes.addressof(out), data_size_out=len(out),
                        ctx_size_in=ctypes.sizeof(ctx_in), ctx_in=ctypes.addressof(ctx_in),
                        ctx_size_out=ctypes.sizeof(ctx_out), ctx_out=ctypes.addressof(ctx_out))
    bpfmaps.bpf(_BPF_PROG_TEST_RUN, attr)
    return attr.retval, out.raw[:attr.data_size_out], ctx_out[3]   # queue_mapping: offset 12


def _frame(packet: bytes, dst: bytes = b"\x02\x00\x00\x00\x00\x01") -> bytes:
    """`packet` behind an Ethernet header, as the stack hands it to the TAP."""
    ethertype = 0x86DD if packet[0] >> 4 == 6 else 0x0800
    return dst + bytes.fromhex("020000000002") + struct.pack("!H", ethertype) + packet


def _udp_packet(src: str, dst: str, payload: bytes, sport: int = 4000, dport: int = 9) -> bytes:
    """An IPv4 or IPv6 UDP packet (checksums left 0: only the classifier reads it)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                           s.packed, d.packed)
    else:
        head = struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, s.packed, d.packed)
    return head + udp


def test_without_btf_offsets_the_classifier_looks_up(netns, monkeypatch, caplog):
    """No usable BTF: built without the route read, says why, still works."""
    from wgebpf.kernel import btf

    def missing(*_a, **_k):
        raise btf.BtfError("struct sk_buff has no member '_skb_refdst'")
    monkeypatch.setattr(btf, "route_cflags", missing)
    d = Datapath()
    try:
        assert d.classifier.route_mode == "lookup"
        assert "_skb_refdst" in d.classifier.route_mode_reason
        assert "looks up every packet" in caplog.text
        assert d.route("198.51.100.3") == 2
        route = d.classifier.route_counters()
        assert route["mode"] == "lookup" and route["dst"] == 0
        assert not any(route["fallbacks"].values())
    finally:
        d.close()


def test_detach_removes_the_filter(dp):
    assert "wg_nexthop" in sh(f"tc filter show dev {dp.name} egress")
    dp.classifier.detach()
    assert sh(f"tc qdisc show dev {dp.name}").find("clsact") < 0
    dp.classifier.detach()      # idempotent


def test_beside_a_clsact_it_did_not_add(netns):
    """Detach (ours, and the runtime-state file's step) removes our filter only."""
    name = f"wgt{secrets.token_hex(4)}"
    with Tap(name, 2):
        sh(f"ip link set {name} up && tc qdisc add dev {name} clsact")
        with NextHopClassifier(name, queues=2) as classifier:
            rec = classifier.attach()
            assert rec["clsact"] is False and rec["prog_id"] == classifier.prog_id
            assert (rec["parent"], rec["prio"], rec["handle"]) == ("ffff:fff3", 1, 1)
            classifier.detach()
            assert "wg_nexthop" not in sh(f"tc filter show dev {name} egress")
            rec = classifier.attach()
            assert "wg_nexthop" in sh(f"tc filter show dev {name} egress")
            assert tc.remove_filter(rec)[0].startswith("removed tc filter")
            assert "wg_nexthop" not in sh(f"tc filter show dev {name} egress")
        assert "clsact" in sh(f"tc qdisc show dev {name}")


# -- tags and worker queues ------------------------------------------------------


@pytest.mark.parametrize("slot", [1, 255, 256, 4660, 65535])
def test_tag_carries_every_slot(dp, slot):
    """Slots up to 65535 come out as tag 02:77:<slot, 32 bits big-endian>,
    through the real device and in a test run."""
    dp.classifier.set_peer(slot, ["203.0.113.0/24", "2001:db8:300::/64"])
    sh(f"ip route add 203.0.113.0/24 dev {dp.name} && ip route add 2001:db8:300::/64 dev {dp.name}")
    assert dp.route("203.0.113.9") == slot
    assert dp.route("2001:db8:300::9") == slot
    frame = _frame(_udp_packet("198.51.100.1", "203.0.113.9", b"run"))
    dp.classifier.set_mode("allowedips")
    retval, out, _ = _test_run_cls(dp.classifier.prog_fd, frame, socket.if_nametoindex(dp.name))
    assert retval == 0
    assert out[:6] == bytes([0x02, 0x77]) + slot.to_bytes(4, "big") == bpfmaps.tag(slot)


def test_slot_range_is_checked():
    with pytest.raises(ValueError, match="1..65535"):
        nexthop._check_slot(65536)
    with pytest.raises(ValueError, match="1..65535"):
        nexthop._check_slot(0)
    assert bpfmaps.slot_of_tag(bpfmaps.tag(65535)) == 65535
    assert bpfmaps.slot_of_tag(bytes.fromhex("027700010000")) == 0      # above SLOT_MAX
    assert bpfmaps.slot_of_tag(bytes.fromhex("020000000001")) == 0      # not 02:77


def _flows(dp, dst: str, ports) -> dict[int, tuple[int, int]]:
    """sport -> (queue, slot) of one datagram per flow."""
    return {p: dp.where(dp.send(dst, sport=p)) for p in ports}


def test_a_flow_keeps_its_worker_and_flows_spread(dp):
    """PeerSpread: one peer, many flows: each flow's packets leave on one
    worker queue (order kept), and the flows use every worker."""
    dp.classifier.set_spread(True)
    ports = range(42000, 42048)
    first = _flows(dp, "198.51.100.3", ports)
    assert {slot for _, slot in first.values()} == {2}
    assert {q for q, _ in first.values()} == {1, 2, 3}
    for _ in range(2):
        assert _flows(dp, "198.51.100.3", ports) == first
    # The peer does not pick the worker: another peer's flows spread too.
    assert {q for q, _ in _flows(dp, "198.51.100.4", ports).values()} == {1, 2, 3}


def test_tcp_segments_are_tagged(dp):
    """TCP keeps a clone of each segment for retransmission: writing the tag
    must not need (or break) it. A SYN and its retransmission both carry
    the tag, on one worker's queue (the socket's own hash changes on the
    retransmission: net.core.txrehash; the classifier's does not)."""
    with socket.socket() as s:
        s.setblocking(False)
        s.connect_ex(("198.51.100.3", 80))
        sport = s.getsockname()[1]

        def syns(got):
            return [(q, f) for q, f in got
                    if f[12:14] == b"\x08\x00" and f[14 + 9] == 6
                    and struct.unpack_from("!H", f, 34)[0] == sport]
        got = syns(dp.frames(lambda g: len(syns(g)) >= 2, timeout=4))
    assert {slot_of(f) for _, f in got} == {2}
    assert len({q for q, _ in got}) == 1 and got[0][0] >= 1


def test_without_peer_spread_a_peer_has_one_worker(dp):
    """The default: every flow of a peer leaves on the peer's own worker,
    1 + (slot - 1) % W, and peers spread over the workers."""
    ports = range(42000, 42032)
    assert {q for q, _ in _flows(dp, "198.51.100.3", ports).values()} == {1 + (2 - 1) % 3}
    assert {q for q, _ in _flows(dp, "198.51.100.4", ports).values()} == {1 + (3 - 1) % 3}


def test_fewer_workers_fewer_queues(dp):
    """set_queue_count(n): flows spread over queues 1..n-1 only."""
    dp.classifier.set_spread(True)
    dp.classifier.set_queue_count(2)
    assert {q for q, _ in _flows(dp, "198.51.100.2", range(42100, 42116)).values()} == {1}
    dp.classifier.set_queue_count(3)
    assert {q for q, _ in _flows(dp, "198.51.100.2", range(42100, 42132)).values()} == {1, 2}


def test_gso_super_packet_is_segmented_with_the_tag_on_every_segment(netns):
    """A UDP_SEGMENT send: tc egress sees one super-packet (one classifier
    verdict), the queue yields one frame per segment, each with the tag and
    all on the same worker's queue."""
    d = Datapath(vnet_hdr=True)
    try:
        d.classifier.set_peer(4660, ["203.0.113.0/24"])
        sh(f"ip route add 203.0.113.0/24 dev {d.name}")     # on-link: the key is the destination
        marker = secrets.token_hex(4).encode()
        segment, count = 1000, 5
        data = b"".join(marker + bytes([i]) * (segment - len(marker)) for i in range(count))
        before = d.classifier.counters()["peer"]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, segment)
            s.sendto(data, ("203.0.113.9", 9))

        def ours(got):
            return [(q, f) for q, f in got if marker in f]
        got = ours(d.frames(lambda g: len(ours(g)) >= count))
        assert d.classifier.counters()["peer"] == before + 1     # seen once at tc egress
        assert len(got) == count
        assert len({q for q, _ in got}) == 1 and got[0][0] >= 1
        for _, frame in got:
            assert slot_of(frame) == 4660
            assert frame[12:14] == b"\x08\x00" and len(frame) == 14 + 20 + 8 + segment
    finally:
        d.close()


# -- cost -----------------------------------------------------------------------


@pytest.mark.parametrize("mode, read_route", [("nexthop", True), ("nexthop", False),
                                              ("allowedips", True)])
def test_cost_per_packet(netns, mode, read_route):
    """run_time_ns / run_cnt of both programs over some thousands of packets
    (pytest -s shows the figures): nexthop mode reading the route, nexthop
    mode looking it up, allowedips."""
    dp = Datapath(read_route=read_route)
    try:
        _cost(dp, mode)
    finally:
        dp.close()


def _cost(dp, mode):
    sh(f"ip route add 203.0.113.0/24 via 198.51.100.3 dev {dp.name}")
    dp.classifier.set_peer(2, ["198.51.100.3/32", "203.0.113.0/24"])
    dp.classifier.set_mode(mode)
    n = 5000
    with bpfmaps.enable_stats():
        c0, s0 = (bpfmaps.prog_info(dp.classifier.prog_fd), bpfmaps.prog_info(dp.steering.prog_fd))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(n):
                s.sendto(b"x" * 64, ("203.0.113.9", 9))
                if i % 256 == 255:
                    dp.drain()
        c1, s1 = (bpfmaps.prog_info(dp.classifier.prog_fd), bpfmaps.prog_info(dp.steering.prog_fd))
    dp.drain()
    for name, a, b in (("classifier", c0, c1), ("steering", s0, s1)):
        runs = b.run_cnt - a.run_cnt
        assert runs >= n
        print(f"{mode} ({dp.classifier.route_mode}) {name}: {runs} runs, {(b.run_time_ns - a.run_time_ns) / runs:.0f} ns per packet")


# -- header agreement -------------------------------------------------------


def test_common_h_and_bpfmaps_agree(root):
    """Every constant, struct size and field offset of common.h equals the
    Python mirror, as the C compiler (bcc's clang) computes them."""
    fib_fields = ["family", "l4_protocol", "sport", "dport", "tot_len", "ifindex", "tos",
                  "flowinfo", "ipv4_src", "ipv6_src", "ipv4_dst", "ipv6_dst", "h_vlan_proto",
                  "smac", "dmac"]
    extra = [("sizeof fib", "sizeof(struct wg_fib_lookup)"),
             ("offsetof fib.mark", "offsetof(struct wg_fib_lookup, mark)"),
             ("offsetof fib.tbid", "offsetof(struct wg_fib_lookup, tbid)")]
    for field in fib_fields:
        extra.append((f"offsetof fib.{field}", f"offsetof(struct wg_fib_lookup, {field})"))
        extra.append((f"uapi fib.{field}", f"offsetof(struct bpf_fib_lookup, {field})"))
    c = bpflayout.assert_mirror(bpfmaps, bpfmaps.COMMON_H, "WG",
                                '#include <uapi/linux/bpf.h>\n#include "common.h"\n', extra)
    # Our 6.10+ struct bpf_fib_lookup: 64 bytes, tbid at 48, mark at 52 (in a
    # union with smac), every older field where the bpf.h bcc compiles
    # against (its own copy of the UAPI header) has it.
    assert c["sizeof fib"] == 64
    assert c["offsetof fib.tbid"] == 48 and c["offsetof fib.mark"] == 52
    for field in fib_fields:
        assert c[f"offsetof fib.{field}"] == c[f"uapi fib.{field}"], field
    # The counter names cover each index once, inside the array.
    assert all(0 <= i < bpfmaps.CNT_MAX for i in bpfmaps.COUNTER_NAMES)
    assert len(set(bpfmaps.COUNTER_NAMES.values())) == len(bpfmaps.COUNTER_NAMES)


def test_maps_of_the_compiled_programs_have_the_mirrored_layouts(root):
    b = bpfmaps.compile_programs(*nexthop.PROGRAMS, "reuseport.c")
    try:
        expect = {
            bpfmaps.MAP_CONFIG: (ctypes.c_uint32, bpfmaps.Config, 1),
            bpfmaps.MAP_PEERS4: (bpfmaps.LpmKey4, ctypes.c_uint32, bpfmaps.PEERS4_MAX),
            bpfmaps.MAP_PEERS6: (bpfmaps.LpmKey6, ctypes.c_uint32, bpfmaps.PEERS6_MAX),
            bpfmaps.MAP_COUNTERS: (ctypes.c_uint32, ctypes.c_uint64, bpfmaps.CNT_MAX),
            bpfmaps.MAP_NEXTHOPS: (bpfmaps.NexthopKey, bpfmaps.NexthopStats,
                                   bpfmaps.NEXTHOPS_MAX),
            bpfmaps.MAP_RXINDEX: (ctypes.c_uint32, ctypes.c_uint32, bpfmaps.RXINDEX_MAX),
            bpfmaps.MAP_POLICIES: (ctypes.c_uint32, ctypes.c_uint32, bpfmaps.SLOTS),
            bpfmaps.MAP_POLICY_CNT: (ctypes.c_uint32, bpfmaps.PolicyCounts, bpfmaps.SLOTS),
        }
        for name, (key, leaf, size) in expect.items():
            table = b[name.encode()]
            assert ctypes.sizeof(table.Key) == ctypes.sizeof(key), name
            # per-CPU tables hand back one leaf per CPU; compare one
            one = getattr(table, "sLeaf", table.Leaf)
            assert ctypes.sizeof(one) == ctypes.sizeof(leaf), name
            assert table.max_entries == size, name
        # A per-CPU hash: rows for configured peers only, not 65536 x CPUs.
        assert type(b[bpfmaps.MAP_POLICY_CNT.encode()]).__name__ == "PerCpuHash"
    finally:
        b.cleanup()


def test_fib_flags_follow_the_kernel_version():
    assert bpfmaps.fib_flags("6.1.0-56-amd64") == 0
    assert bpfmaps.fib_flags("6.3.1") == bpfmaps.FIB_LOOKUP_SKIP_NEIGH
    assert bpfmaps.fib_flags("6.10.0") == (bpfmaps.FIB_LOOKUP_SKIP_NEIGH
                                           | bpfmaps.FIB_LOOKUP_MARK)
    assert bpfmaps.fib_flags("6.18.44-fc-v669") & bpfmaps.FIB_LOOKUP_MARK
