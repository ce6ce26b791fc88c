"""The source policy program (bpf/policy.c) on tc ingress, in the real kernel.

Topology (one namespace per test, the test's thread inside it):

    crafted IPv4/IPv6 UDP packets in Ethernet frames from MAC 02:77:<slot>
    (the tag of peer slot s; 0: the control plane's), written to a worker's
    TAP queue as a worker would after decryption
          |
    TAP wgp... (NOARP)  198.51.100.1/24  2001:db8:100::1/64
      clsact ingress: wg_policy (slot = the source MAC's tag -> its policy)
      clsact egress:  wg_nexthop (the classifier; its maps are shared)
          |  kernel IP stack (rp_filter off: only our program filters)
          v
    UDP sockets of the test on 198.51.100.1:4000 and [2001:db8:100::1]:4000

Peer slot s owns 198.51.100.(s+1)/32 and 2001:db8:100::(s+1)/128 (slots
1..3). Each case writes a packet with a unique payload as from a peer, then
a sentinel from slot 0 into queue 0 (never checked, and the TAP hands
frames to the stack synchronously, in order), and reads what arrived before
the sentinel: the packet was delivered or not. The per-slot counters must
show the verdict's reason.
"""

from __future__ import annotations

import ctypes
import json
import secrets
import select
import socket

import pytest

from wgebpf.kernel import bpfmaps
from wgebpf.lab import flood
from wgebpf.kernel import tc
from wgebpf.control.config import PEER_MARK_DEFAULT
from wgebpf.kernel.nexthop import NextHopClassifier
from wgebpf.kernel.policy import POLICIES, SourcePolicy, peer_mark

pytestmark = pytest.mark.netns

QUEUES = 4                      # queue 0 and three workers
LOCAL4, LOCAL6 = "198.51.100.1", "2001:db8:100::1"
PORT = 4000
PEER_ADDRS = {1: ("198.51.100.2", "2001:db8:100::2"),
              2: ("198.51.100.3", "2001:db8:100::3"),
              3: ("198.51.100.4", "2001:db8:100::4")}
SENTINEL_SOURCE = {4: "192.0.2.99", 6: "2001:db8:99::99"}

# -- packets ---------------------------------------------------------------------


def udp_packet(source: str, destination: str, payload: bytes, sport: int = 5555,
               dport: int = PORT) -> bytes:
    """An IPv4 or IPv6 UDP packet with correct checksums (the stack checks them)."""
    return flood.udp_packet(source, destination, sport, dport, payload)


# -- namespace plumbing ------------------------------------------------------------

from nsutil import fresh_netns, sh  # noqa: F401  (the netns fixture)
from taputil import Tap


class Ingress:
    """TAP + classifier maps + source policy on ingress, peers 1..3."""

    def __init__(self, default: str = "allowedips", mark_mask: int = PEER_MARK_DEFAULT):
        self.name = f"wgp{secrets.token_hex(4)}"
        self.tun = Tap(self.name, QUEUES)
        self.classifier = self.policy = None
        self.socks: dict[int, socket.socket] = {}
        try:
            dev = self.name
            sh(f"ip link set {dev} up"
               f" && ip addr add {LOCAL4}/24 dev {dev}"
               f" && ip addr add {LOCAL6}/64 dev {dev} nodad"
               # bpf_fib_lookup refuses (FWD_DISABLED) without forwarding on the device
               f" && sysctl -qw net.ipv4.conf.{dev}.forwarding=1"
               f" && sysctl -qw net.ipv6.conf.{dev}.forwarding=1"
               # only our program filters sources here
               f" && sysctl -qw net.ipv4.conf.all.rp_filter=0"
               f" && sysctl -qw net.ipv4.conf.{dev}.rp_filter=0")
            self.classifier = NextHopClassifier(dev, queues=QUEUES)
            self.classifier.attach()
            for slot, addrs in PEER_ADDRS.items():
                self.classifier.set_peer(slot, [f"{addrs[0]}/32", f"{addrs[1]}/128"])
            self.policy = SourcePolicy(self.classifier, default, mark_mask=mark_mask)
            for slot in PEER_ADDRS:     # as the pool does for each peer it adds
                self.policy.set_peer(slot, None)
            self.policy.attach()
            for version, local in ((4, LOCAL4), (6, LOCAL6)):
                s = socket.socket(socket.AF_INET if version == 4 else socket.AF_INET6,
                                  socket.SOCK_DGRAM)
                s.bind((local, PORT))
                s.setblocking(False)
                self.socks[version] = s
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in self.socks.values():
            s.close()
        for part in (self.policy, self.classifier):
            if part is not None:
                part.close()
        self.tun.close()

    def write(self, slot: int, source: str, payload: bytes | None = None, *,
              queue: int | None = None, src: bytes | None = None, **kw) -> bytes:
        """A UDP packet from `source` as peer `slot`'s worker writes it: from
        MAC tag(slot) (or `src`), on a worker's queue (or `queue`)."""
        payload = payload or b"wgebpf-" + secrets.token_hex(8).encode()
        local = LOCAL6 if ":" in source else LOCAL4
        if queue is None:
            queue = 1 + slot % (QUEUES - 1) if slot else bpfmaps.QUEUE_CONTROL
        packet = udp_packet(source, local, payload, **kw)
        assert self.tun.write(queue, packet, src or bpfmaps.tag(slot))
        return payload

    def delivered(self, slot: int, source: str, **kw) -> bool:
        """Write a packet from `source` as peer `slot`: did it reach the socket?"""
        version = 6 if ":" in source else 4
        payload = self.write(slot, source, **kw)
        sentinel = self.write(0, SENTINEL_SOURCE[version])
        seen = self.receive(version, until=sentinel)
        return payload in seen

    def receive(self, version: int, until: bytes, timeout: float = 2.0) -> list[bytes]:
        s, seen = self.socks[version], []
        while True:
            if not select.select([s], [], [], timeout)[0]:
                raise AssertionError(f"sentinel {until!r} never arrived")
            data = s.recv(2048)
            if data == until:
                return seen
            seen.append(data)

    def verdict(self, slot: int, source: str, **kw) -> tuple[bool, str]:
        """(delivered, the one counter of `slot` that moved)."""
        before = self.policy.counters().get(slot, {})
        ok = self.delivered(slot, source, **kw)
        after = self.policy.counters()[slot]
        moved = [r for r, n in after.items() if n != before.get(r, 0)]
        assert len(moved) == 1 and after[moved[0]] == before.get(moved[0], 0) + 1, (after, before)
        return ok, moved[0]


@pytest.fixture
def ing(netns):
    """Function scope; needs `netns`. The Ingress of the module docstring."""
    i = Ingress()
    try:
        yield i
    finally:
        i.close()


# -- every policy, IPv4 and IPv6 -------------------------------------------------

OTHER = PEER_ADDRS[2]           # a source that is another peer's tunnel address
UNKNOWN = ("203.0.113.7", "2001:db8:300::7")    # nobody's, and no route back
# (policy, source from slot 1, delivered, counter)
CASES = [
    ("allowedips", PEER_ADDRS[1], True, "accepted"),
    ("allowedips", OTHER, False, "dropped_allowedips"),
    ("allowedips", UNKNOWN, False, "dropped_allowedips"),
    ("fib", PEER_ADDRS[1], True, "accepted"),        # on-link: the source itself is the key
    ("fib", OTHER, False, "dropped_fib"),
    ("fib", UNKNOWN, False, "fib_failed"),
    ("nftables", PEER_ADDRS[1], True, "marked"),
    ("nftables", OTHER, True, "marked"),             # nftables filters, not eBPF
    ("nftables", UNKNOWN, True, "marked"),
    ("off", PEER_ADDRS[1], True, "accepted"),
    ("off", OTHER, True, "accepted"),
    ("off", UNKNOWN, True, "accepted"),
]


@pytest.mark.parametrize("policy, sources, delivered, reason", CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[1][0]}" for c in CASES])
def test_each_policy_v4_and_v6(ing, policy, sources, delivered, reason):
    ing.policy.set_default(policy)
    for source in sources:
        assert ing.verdict(1, source) == (delivered, reason), source


def test_fib_follows_a_route_change_at_once(ing):
    """A network behind peer 1, moved to peer 2 by `ip route replace`."""
    ing.policy.set_default("fib")
    sh(f"ip route add 203.0.113.0/24 via {PEER_ADDRS[1][0]} dev {ing.name}"
       f" && ip -6 route add 2001:db8:300::/64 via {PEER_ADDRS[1][1]} dev {ing.name}")
    for source in UNKNOWN:
        assert ing.verdict(1, source) == (True, "accepted")
        assert ing.verdict(2, source) == (False, "dropped_fib")
    sh(f"ip route replace 203.0.113.0/24 via {PEER_ADDRS[2][0]} dev {ing.name}"
       f" && ip -6 route replace 2001:db8:300::/64 via {PEER_ADDRS[2][1]} dev {ing.name}")
    for source in UNKNOWN:
        assert ing.verdict(2, source) == (True, "accepted")
        assert ing.verdict(1, source) == (False, "dropped_fib")


def test_fib_unreachable_route_fails_the_lookup(ing):
    ing.policy.set_default("fib")
    sh("ip route add unreachable 203.0.113.0/24 && ip -6 route add unreachable 2001:db8:300::/64")
    for source in UNKNOWN:
        assert ing.verdict(1, source) == (False, "fib_failed")


def test_fib_ecmp_accepts_the_reply_path_only(ing):
    """A route over peers 1 and 2: a flow is accepted from the peer its
    replies take (the classifier's choice for the reply), not from the other."""
    ing.policy.set_default("fib")
    sh("sysctl -qw net.ipv4.fib_multipath_hash_policy=1")
    sh(f"ip route add 203.0.113.0/24 nexthop via {PEER_ADDRS[1][0]} dev {ing.name}"
       f" nexthop via {PEER_ADDRS[2][0]} dev {ing.name}")
    by_path = {1: 0, 2: 0}
    for sport in range(41000, 41032):
        from_1 = ing.verdict(1, UNKNOWN[0], sport=sport)
        from_2 = ing.verdict(2, UNKNOWN[0], sport=sport)
        assert {from_1[0], from_2[0]} == {True, False}, sport
        by_path[1 if from_1[0] else 2] += 1
    assert by_path[1] and by_path[2], by_path       # flows do spread over both


def test_per_peer_override_beats_the_default(ing):
    source = OTHER[0]           # spoofed by peers 1 and 3
    ing.policy.set_peer(1, "off")
    assert ing.verdict(1, source) == (True, "accepted")
    assert ing.verdict(3, source) == (False, "dropped_allowedips")
    ing.policy.set_default("off")
    ing.policy.set_peer(3, "fib")
    assert ing.verdict(3, source) == (False, "dropped_fib")
    ing.policy.set_peer(1, None)        # follows the default (off) again
    assert ing.verdict(1, source) == (True, "accepted")
    assert ing.policy.overrides() == {3: "fib"}
    assert (ing.policy.policy_of(1), ing.policy.policy_of(3)) == ("off", "fib")


def test_switching_policy_live(ing):
    """The same program and maps; each packet sees the policy of its moment."""
    source = OTHER[1]
    for policy, expect in [("allowedips", (False, "dropped_allowedips")),
                           ("off", (True, "accepted")),
                           ("fib", (False, "dropped_fib")),
                           ("nftables", (True, "marked")),
                           ("allowedips", (False, "dropped_allowedips"))]:
        ing.policy.set_default(policy)
        assert ing.verdict(1, source) == expect, policy
        assert ing.verdict(1, PEER_ADDRS[1][1])[0] is True, policy


def test_allowed_ips_changes_follow_at_once(ing):
    ing.classifier.set_peer(1, ["198.51.100.2/32", "203.0.113.0/24"])
    assert ing.verdict(1, UNKNOWN[0]) == (True, "accepted")
    ing.classifier.set_peer(2, ["198.51.100.3/32", "203.0.113.0/25"])     # longer match wins
    assert ing.verdict(1, UNKNOWN[0]) == (False, "dropped_allowedips")
    assert ing.verdict(2, UNKNOWN[0]) == (True, "accepted")


@pytest.mark.parametrize("policy", POLICIES)
def test_control_plane_queue_passes_untouched(ing, policy):
    """Slot 0's tag marks the control plane's own packets (ICMP errors): no
    check, no mark, counted in row 0, on any queue."""
    ing.policy.set_default(policy)
    before = ing.policy.counters().get(0, {}).get("accepted", 0)
    payload = ing.write(0, UNKNOWN[0])
    other = ing.write(0, UNKNOWN[1], queue=2)
    sentinel = ing.write(0, SENTINEL_SOURCE[4])
    assert payload in ing.receive(4, until=sentinel)
    assert other in ing.receive(6, until=ing.write(0, SENTINEL_SOURCE[6]))
    assert ing.policy.counters()[0]["accepted"] == before + 4


@pytest.mark.parametrize("src", [
    "020000000001",         # locally administered, not ours
    "0077000000 01",        # 00:77: not 02:77
    "027700010000",         # 02:77 with slot 65536: beyond WG_SLOT_MAX
    "027700000000",         # slot 0: the control plane's
])
def test_a_source_mac_that_is_no_peer_tag_is_no_peer(ing, src):
    """Only 02:77:<slot 1..65535> names a peer; any other source MAC is
    row 0 and passes unchecked, whatever queue it came in on (a spoofed
    source that allowedips would drop from slot 1 is delivered)."""
    before = ing.policy.counters()
    assert ing.delivered(1, OTHER[0], src=bytes.fromhex(src.replace(" ", "")), queue=1)
    after = ing.policy.counters()
    assert after[0]["accepted"] == before.get(0, {}).get("accepted", 0) + 2   # + the sentinel
    assert after.get(1, {}) == before.get(1, {})


@pytest.mark.parametrize("slot", [256, 4660, 65535])
def test_high_slots_are_attributed_by_their_tag(ing, slot):
    """Slots beyond a byte come from the tag's 32-bit field, any worker queue."""
    ing.classifier.set_peer(slot, ["203.0.113.0/24", "2001:db8:300::/64"])
    ing.policy.set_peer(slot, None)
    for queue in (1, 2, 3):
        assert ing.verdict(slot, UNKNOWN[0], queue=queue) == (True, "accepted")
        assert ing.verdict(slot, UNKNOWN[1], queue=queue) == (True, "accepted")
        assert ing.verdict(slot, OTHER[0], queue=queue) == (False, "dropped_allowedips")
    # another slot (e.g. a tag cut to a byte) does not own them
    assert ing.verdict(1, UNKNOWN[0]) == (False, "dropped_allowedips")


def test_the_worker_queue_does_not_matter(ing):
    for queue in (0, 1, 2, 3):
        assert ing.verdict(2, PEER_ADDRS[2][0], queue=queue) == (True, "accepted")
        assert ing.verdict(2, PEER_ADDRS[1][0], queue=queue) == (False, "dropped_allowedips")


def test_counter_rows_follow_the_peers(ing):
    """wg_policy_cnt is a hash: a row per configured peer (and row 0), made
    by set_peer, kept by set_peer again, gone with remove_peer. A slot with
    no row is judged but not counted."""
    table = ing.policy._counts
    keys = lambda: sorted(int(k.value) for k in table.keys())      # noqa: E731
    assert keys() == [0, 1, 2, 3]
    ing.verdict(3, PEER_ADDRS[3][0])
    ing.policy.set_peer(3, "off")               # a policy change keeps the counts
    assert ing.policy.counters()[3]["accepted"] == 1
    ing.policy.remove_peer(3)
    assert keys() == [0, 1, 2]
    assert ing.delivered(3, PEER_ADDRS[3][0])   # still judged (allowedips: its own source)
    assert not ing.delivered(3, OTHER[0])
    assert 3 not in ing.policy.counters() and keys() == [0, 1, 2]


def test_truncated_packet_counts_as_not_ip(ing):
    before = ing.policy.counters().get(1, {}).get("not_ip", 0)
    assert ing.tun.write(1, b"\x45\x00\x00\x14" + b"\x00" * 6, bpfmaps.tag(1))   # 10 bytes of IPv4
    assert ing.policy.counters()[1]["not_ip"] == before + 1


def test_remove_peer_resets_its_counters_and_override(ing):
    ing.policy.set_peer(2, "off")
    ing.verdict(2, OTHER[0])
    assert ing.policy.counters()[2]["accepted"] == 1
    ing.policy.remove_peer(2)
    assert 2 not in ing.policy.counters()
    assert ing.policy.policy_of(2) == "allowedips"


def test_bad_arguments(ing):
    with pytest.raises(ValueError, match="allowedips, fib, nftables, off"):
        ing.policy.set_default("strict")
    with pytest.raises(ValueError, match="slot"):
        ing.policy.set_peer(0, "off")
    for mask in (0, 0x00F00000, 0xFF00FF00):
        with pytest.raises(ValueError, match="peer mark"):
            SourcePolicy(ing.classifier, mark_mask=mask)


# -- nftables policy: the mark ---------------------------------------------------

PREMARK_C = """
int wg_test_premark(struct __sk_buff *skb)
{
	skb->mark = %#x;	/* another tc user's mark bits, set before ours */
	return -1;		/* TC_ACT_UNSPEC: on to the next filter (ours) */
}
"""


def _nft_counters(table: str) -> dict[str, int]:
    """comment -> packets of each counted rule of `table` (inet)."""
    out = json.loads(sh(f"nft -j list table inet {table}"))["nftables"]
    return {item["rule"]["comment"]: next(e["counter"]["packets"] for e in item["rule"]["expr"]
                                          if "counter" in e)
            for item in out if "rule" in item}


@pytest.mark.parametrize("mask, premark, slot, mark", [
    (0xFF000000, 0x00000000, 2, 0x02000000),
    (0xFF000000, 0x07001234, 2, 0x02001234),     # our byte replaced, the rest kept
    (0x0000FF00, 0xF00000AB, 3, 0xF00003AB),     # a PeerMark lower down
    (0xFFF00000, 0x800FFFFF, 3, 0x003FFFFF),     # wider than 8 bits: its high bits are 0
])
def test_nftables_policy_sets_the_peer_mark(netns, mask, premark, slot, mark):
    from bcc import BPF
    from pyroute2 import IPRoute

    assert peer_mark(slot, mask) == mark & mask
    ing = Ingress("nftables", mark_mask=mask)
    pre = BPF(text=(PREMARK_C % premark).encode())
    try:
        fd = pre.load_func(b"wg_test_premark", BPF.SCHED_CLS).fd
        with IPRoute() as ipr:    # prio 1 runs before ours (prio 2)
            ipr.tc("add-filter", "bpf", ing.tun.ifindex, 1, fd=fd, name="premark",
                   parent="ffff:fff2", prio=1, classid=1, direct_action=True)
        sh("nft add table inet wgtest"
           " && nft add chain inet wgtest pre '{ type filter hook prerouting priority -300; }'"
           f" && nft add rule inet wgtest pre meta mark and {mask:#x} == {mark & mask:#x}"
           " counter comment peer"
           f" && nft add rule inet wgtest pre meta mark {mark:#x} counter comment whole")
        assert ing.verdict(slot, UNKNOWN[0]) == (True, "marked")
        assert ing.verdict(slot, UNKNOWN[1]) == (True, "marked")
        assert _nft_counters("wgtest") == {"peer": 2, "whole": 2}
    finally:
        pre.cleanup()
        ing.close()


def test_nftables_refuses_and_drops_a_slot_beyond_the_mark(netns):
    """An 8-bit PeerMark holds slots 1..255. The loader refuses a higher slot
    on the nftables policy; should one come anyway, policy.c drops its
    packets (unmarked, nftables would pass them)."""
    ing = Ingress("nftables", mark_mask=0xFF000000)
    try:
        ing.classifier.set_peer(300, ["203.0.113.0/24"])
        with pytest.raises(ValueError, match="does not fit PeerMark 0xff000000"):
            ing.policy.set_peer(300, None)
        ing.policy.set_peer(300, "off")
        with pytest.raises(ValueError, match="holds slots up to 255"):
            ing.policy.set_peer(300, "nftables")
        ing.policy.set_default("nftables")          # fine: 300 has its own policy
        ing.policy.set_default("off")
        ing.policy.set_peer(300, None)
        with pytest.raises(ValueError, match="300"):
            ing.policy.set_default("nftables")      # now 300 would follow it
        assert ing.policy.default == "off"
        ing.classifier.update_config(policy=bpfmaps.POLICY_NFTABLES)   # behind its back
        assert ing.verdict(300, UNKNOWN[0]) == (False, "dropped_peer_mark")
        assert ing.verdict(1, PEER_ADDRS[1][0]) == (True, "marked")
    finally:
        ing.close()


def test_a_16_bit_peer_mark_holds_every_slot(netns):
    ing = Ingress("nftables", mark_mask=0xFFFF0000)
    try:
        ing.classifier.set_peer(65535, ["203.0.113.0/24"])
        ing.policy.set_peer(65535, None)
        assert peer_mark(65535, 0xFFFF0000) == 0xFFFF0000
        sh("nft add table inet wgtest"
           " && nft add chain inet wgtest pre '{ type filter hook prerouting priority -300; }'"
           " && nft add rule inet wgtest pre meta mark 0xffff0000 counter comment top")
        assert ing.verdict(65535, UNKNOWN[0]) == (True, "marked")
        assert _nft_counters("wgtest") == {"top": 1}
    finally:
        ing.close()


# -- attachment ---------------------------------------------------------------------


def test_attach_record_and_detach(ing):
    rec = ing.policy.record
    assert (rec["parent"], rec["prio"], rec["handle"]) == ("ffff:fff2", 2, 2)
    assert rec["clsact"] is False           # the classifier added it
    assert rec["prog_id"] == ing.policy.prog_id
    assert "wg_policy" in sh(f"tc filter show dev {ing.name} ingress")
    ing.policy.detach()
    assert "wg_policy" not in sh(f"tc filter show dev {ing.name} ingress")
    assert "wg_nexthop" in sh(f"tc filter show dev {ing.name} egress")
    ing.policy.detach()                     # idempotent
    # The runtime-state file's removal step finds it by the record.
    rec = ing.policy.attach()
    assert tc.remove_filter(rec)[0].startswith("removed tc filter")
    assert "wg_policy" not in sh(f"tc filter show dev {ing.name} ingress")
    assert "wg_nexthop" in sh(f"tc filter show dev {ing.name} egress")


def test_policy_alone_takes_its_clsact_away(netns):
    name = f"wgp{secrets.token_hex(4)}"
    with Tap(name, 2), NextHopClassifier(name, queues=2) as classifier:
        sh(f"ip link set {name} up")
        with SourcePolicy(classifier) as policy:
            assert policy.attach()["clsact"] is True
        assert "clsact" not in sh(f"tc qdisc show dev {name}")


# -- cost ------------------------------------------------------------------------


@pytest.mark.parametrize("policy, source", [
    ("allowedips", PEER_ADDRS[1][0]),
    ("fib", PEER_ADDRS[1][0]),               # on-link route
    ("fib", UNKNOWN[0]),                     # route via peer 1's address
    ("nftables", PEER_ADDRS[1][0]),
    ("off", PEER_ADDRS[1][0]),
    ("allowedips", PEER_ADDRS[1][1]),
    ("fib", PEER_ADDRS[1][1]),
])
def test_cost_per_packet(ing, policy, source):
    """run_time_ns / run_cnt of wg_policy over some thousands of accepted
    packets (pytest -s shows the figures)."""
    sh(f"ip route add 203.0.113.0/24 via {PEER_ADDRS[1][0]} dev {ing.name}")
    ing.policy.set_default(policy)
    version = 6 if ":" in source else 4
    packet = udp_packet(source, LOCAL6 if version == 6 else LOCAL4, b"x" * 64)
    n = 5000
    with bpfmaps.enable_stats():
        a = bpfmaps.prog_info(ing.policy.prog_fd)
        for i in range(n):
            ing.tun.write(1 + i % (QUEUES - 1), packet, bpfmaps.tag(1))
            if i % 128 == 127:
                _drain(ing.socks[version])
        b = bpfmaps.prog_info(ing.policy.prog_fd)
    _drain(ing.socks[version])
    runs = b.run_cnt - a.run_cnt
    assert runs >= n
    verdict = "marked" if policy == "nftables" else "accepted"
    assert ing.policy.counters()[1][verdict] >= n
    print(f"\n{policy} IPv{version} from {source}: {runs} runs, "
          f"{(b.run_time_ns - a.run_time_ns) / runs:.0f} ns per packet")


def _drain(s: socket.socket) -> None:
    try:
        while True:
            s.recv(2048)
    except BlockingIOError:
        pass
