"""The classifier follows the kernel's own routing decision (issue 12).

Topology: tests/test_nexthop.py's Hosts, A (wgebpf) with wireguard-go peers
B and C; 203.0.113.77 and 2001:db8:200::77 are on both B's and C's lo. Each
peer host runs a UDP listener (LISTEN_PORT) that prints the id of every
datagram it receives, so a test knows per flow which peer carried it.

What the kernel chose is established without the classifier: for ECMP from
`ip route get` with the flow's selectors (protocol, ports, and the source the
kernel hashes: 0.0.0.0 / :: for unconnected sockets and connected IPv6
ones, the chosen source address for connected IPv4 ones; that is what makes
the FIB lookup, which hashes the packet's source, disagree), for rule
selectors (uidrange, oif) from the rule itself. Forwarded flows (from S, a
host behind A) are checked against a reference path, see that test; nexthop
groups and IPv4 via an IPv6 link-local gateway (RFC 5549) against
RTM_GETROUTE. The last section shows where the `fib` source policy's
reverse lookup differs from the path the replies take (README, "`fib`").
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Callable

import pytest

from test_nexthop import (ANY4, ANY6, B_LINK_LOCAL, NET4, NET6, Hosts,  # noqa: F401
                          hosts, tunnel4, tunnel6)
from wgebpf.lab import netns

pytestmark = [pytest.mark.netns, pytest.mark.interop]

LISTEN_PORT = 47000
FLOW_PORTS = range(41000, 41050)        # source ports: 50 flows per kind

_LISTENER = """
import select, socket, sys
socks = []
for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, int(sys.argv[1])))
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        print(s.recv(2048).decode(errors="replace"), flush=True)
"""

# argv: destination, first source port, last+1, "connected" or "unconnected",
# id prefix. One socket per flow, bound to its source port; two datagrams.
_SENDER = """
import socket, sys
dst, lo, hi, how, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
port = int(sys.argv[6])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
for sport in range(lo, hi):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))
        if how == "connected":
            s.connect((dst, port))
        for _ in range(2):
            msg = f"{tag}-{sport}".encode()
            if how == "connected":
                s.send(msg)
            else:
                s.sendto(msg, (dst, port))
"""


class Listeners:
    """A UDP listener on each peer host; which ids each one received."""

    def __init__(self, h: Hosts):
        self.procs = {}
        for host in h.peers:
            proc = h.ns[host].popen([sys.executable, "-u", "-c", _LISTENER, str(LISTEN_PORT)],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            self.procs[host] = proc

    def received(self, settle: float = 0.5) -> dict[str, set[str]]:
        """Stop the listeners (by their pids); the ids each one printed."""
        time.sleep(settle)
        out = {}
        for host, proc in self.procs.items():
            proc.terminate()
            text, _ = proc.communicate(timeout=10)
            out[host] = {line for line in text.splitlines() if line and line != "ready"}
        self.procs.clear()
        return out

    def received_all(self, expected: set[str], timeout: float = 10) -> dict[str, set[str]]:
        """Like received(), but reading as ids arrive, until every id in
        `expected` has arrived somewhere (or timeout)."""
        def done(lines: dict[str, list[str]]) -> bool:
            return expected <= {line for got in lines.values() for line in got}
        lines = read_lines(self.procs, done, timeout)
        self.procs.clear()
        return {host: set(got) - {"", "ready"} for host, got in lines.items()}

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()


@pytest.fixture
def listening(hosts):
    """(Hosts, Listeners) with peers B and C."""
    h = hosts()
    listeners = Listeners(h)
    try:
        yield h, listeners
    finally:
        listeners.close()


def send_flows(ns: netns.Namespace, dst: str, how: str, tag: str, *, uid: int = 0,
               ports: range = FLOW_PORTS) -> None:
    argv = ["/usr/bin/python3", "-c", _SENDER, dst, str(ports.start), str(ports.stop), how, tag,
            str(LISTEN_PORT)]
    if uid:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    ns.run(argv)


def kernel_gateway(ns: netns.Namespace, dst: str, source: str, sport: int) -> str:
    """The gateway `ip route get` names for a UDP flow from `source`:sport."""
    family = "-6" if ":" in dst else "-4"
    out = ns.run(["ip", "-j", family, "route", "get", dst, "from", source, "ipproto", "udp",
                  "sport", str(sport), "dport", str(LISTEN_PORT)]).stdout
    return json.loads(out)[0]["gateway"]


def carrier(received: dict[str, set[str]], flow: str) -> str:
    hosts = [host for host, ids in received.items() if flow in ids]
    assert len(hosts) == 1, f"flow {flow} arrived at {hosts or 'no peer'}"
    return hosts[0]


# -- ECMP: every flow at the member the kernel's hash chose -------------------------


def test_ecmp_every_flow_reaches_the_peer_the_kernel_chose(listening):
    h, listeners = listening
    h.a.ip("-4", "route", "add", NET4, "nexthop", "via", tunnel4("b"), "dev", h.dev,
           "nexthop", "via", tunnel4("c"), "dev", h.dev)
    h.a.ip("-6", "route", "add", NET6, "nexthop", "via", tunnel6("b"), "dev", h.dev,
           "nexthop", "via", tunnel6("c"), "dev", h.dev)
    gateway_host = {tunnel4("b"): "b", tunnel4("c"): "c", tunnel6("b"): "b", tunnel6("c"): "c"}
    kinds = [  # (tag, destination, socket, the source address the kernel hashes)
        ("u4", ANY4, "unconnected", "0.0.0.0"),
        ("c4", ANY4, "connected", tunnel4("a")),
        ("u6", ANY6, "unconnected", "::"),
        # IPv6 connect() routes before it picks a source, and keeps that
        # route (ip6_datagram_dst_update): its hash saw ::, as unconnected.
        ("c6", ANY6, "connected", "::"),
    ]
    status0 = h.status()["classifier_route"]
    for tag, dst, how, _source in kinds:
        send_flows(h.a, dst, how, tag)
    received = listeners.received()
    wrong, chosen = [], {"b": 0, "c": 0}
    for tag, dst, how, source in kinds:
        for sport in FLOW_PORTS:
            expected = gateway_host[kernel_gateway(h.a, dst, source, sport)]
            chosen[expected] += 1
            got = carrier(received, f"{tag}-{sport}")
            if got != expected:
                wrong.append(f"{tag}-{sport}: kernel {expected}, wgebpf {got}")
    assert not wrong, f"{len(wrong)} of {len(kinds) * len(FLOW_PORTS)} flows:\n" + "\n".join(wrong)
    assert chosen["b"] > 20 and chosen["c"] > 20, chosen     # the hash did spread them
    status = h.status()["classifier_route"]
    assert status["mode"] == "route"
    assert status["dst"] >= status0["dst"] + 2 * len(kinds) * len(FLOW_PORTS)


# -- rule selectors the FIB lookup cannot see ------------------------------------------


@pytest.mark.parametrize("dst", [ANY4, ANY6], ids=["ipv4", "ipv6"])
def test_uidrange_rule_sends_another_users_traffic_via_its_peer(listening, dst):
    h, listeners = listening
    family = "-6" if ":" in dst else "-4"
    net, via = (NET6, tunnel6) if ":" in dst else (NET4, tunnel4)
    h.a.ip(family, "route", "add", net, "via", via("b"), "dev", h.dev)
    h.a.ip(family, "route", "add", net, "via", via("c"), "dev", h.dev, "table", "100")
    h.a.ip(family, "rule", "add", "uidrange", "1000-1000", "table", "100")
    send_flows(h.a, dst, "unconnected", "root", ports=range(41000, 41004))
    send_flows(h.a, dst, "unconnected", "user", uid=1000, ports=range(41010, 41014))
    received = listeners.received()
    assert {carrier(received, f"root-{p}") for p in range(41000, 41004)} == {"b"}
    assert {carrier(received, f"user-{p}") for p in range(41010, 41014)} == {"c"}


_BOUND_SENDER = """
import socket, sys
dst, dev, tag, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
for bind in (False, True):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        if bind:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
        for _ in range(2):
            s.sendto(f"{tag}-{'bound' if bind else 'free'}".encode(), (dst, port))
"""


@pytest.mark.parametrize("dst", [ANY4, ANY6], ids=["ipv4", "ipv6"])
def test_oif_rule_sends_a_bound_socket_via_its_peer(listening, dst):
    h, listeners = listening
    family = "-6" if ":" in dst else "-4"
    net, via = (NET6, tunnel6) if ":" in dst else (NET4, tunnel4)
    h.a.ip(family, "route", "add", net, "via", via("b"), "dev", h.dev)
    h.a.ip(family, "route", "add", net, "via", via("c"), "dev", h.dev, "table", "101")
    h.a.ip(family, "rule", "add", "oif", h.dev, "table", "101")
    h.a.run([sys.executable, "-c", _BOUND_SENDER, dst, h.dev, "oif", str(LISTEN_PORT)])
    received = listeners.received()
    assert carrier(received, "oif-free") == "b"
    assert carrier(received, "oif-bound") == "c"


# -- the fallback ------------------------------------------------------------------------


_INJECT = """
import socket, struct, sys
src, dst, port, payload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[5].encode()
udp = struct.pack("!HHHH", 41999, port, 8 + len(payload), 0) + payload
head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                   socket.inet_aton(src), socket.inet_aton(dst))
words = struct.unpack("!10H", head)
total = sum(words)
while total >> 16:
    total = (total & 0xFFFF) + (total >> 16)
head = head[:10] + struct.pack("!H", ~total & 0xFFFF) + head[12:]
with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)) as s:
    for _ in range(2):
        s.sendto(head + udp, (sys.argv[4], 0x0800))
"""


def test_packet_socket_injection_is_looked_up_and_counted(listening):
    """A packet injected with AF_PACKET on the wgebpf interface has no route
    attached: the classifier falls back to the FIB lookup (which names B
    here), and counts it as no_dst."""
    h, listeners = listening
    h.a.ip("-4", "route", "add", NET4, "via", tunnel4("b"), "dev", h.dev)
    before = h.status()["classifier_route"]["fallbacks"]["no_dst"]
    h.a.run([sys.executable, "-c", _INJECT, tunnel4("a"), ANY4, str(LISTEN_PORT), h.dev,
             "injected"])
    received = listeners.received()
    assert carrier(received, "injected") == "b"
    netns.wait_until(lambda: h.status()["classifier_route"]["fallbacks"]["no_dst"]
                     >= before + 2, 5, 0.2)
    assert h.status()["classifier_route"]["fallbacks"]["no_dst"] >= before + 2


# -- forwarded traffic -------------------------------------------------------------------

S4, A_S4, S_NET4 = "203.0.113.201", "203.0.113.202", "203.0.113.200/30"
S6, A_S6, S_NET6 = "2001:db8:300::2", "2001:db8:300::1", "2001:db8:300::/64"
FORWARD_PORTS = range(42000, 42064)     # 64 flows per family

# Run in A: prints "<ifname> <payload>" for every UDP datagram to LISTEN_PORT
# that leaves A (PACKET_OUTGOING) on one of the interfaces named in argv.
_SNIFFER = """
import select, socket, sys
port, socks = int(sys.argv[1]), {}
for name in sys.argv[2:]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))   # ETH_P_ALL
    s.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)                            # SO_RCVBUFFORCE
    s.bind((name, 0))
    socks[s] = name
print("ready", flush=True)
while True:
    for s in select.select(list(socks), [], [])[0]:
        data, (_ifname, proto, pkttype, *_rest) = s.recvfrom(4096)
        if pkttype != socket.PACKET_OUTGOING:
            continue
        if proto == 0x0800 and data[9] == 17:
            udp = (data[0] & 15) * 4
        elif proto == 0x86DD and data[6] == 17:
            udp = 40
        else:
            continue
        if int.from_bytes(data[udp + 2:udp + 4], "big") == port:
            print(socks[s], data[udp + 8:].decode(errors="replace"), flush=True)
"""


def read_lines(procs: dict[str, subprocess.Popen], done: Callable[[dict[str, list[str]]], bool],
               timeout: float) -> dict[str, list[str]]:
    """The lines each process prints (read from its pipe's fd as they come)
    until done(lines so far) or timeout; then each is stopped by its pid and
    the rest of its output added. Stopping a printer without this would lose
    what it had not printed yet."""
    lines: dict[str, list[str]] = {name: [] for name in procs}
    partial = {proc.stdout.fileno(): b"" for proc in procs.values()}
    names = {proc.stdout.fileno(): name for name, proc in procs.items()}
    deadline = time.monotonic() + timeout
    while partial and not done(lines):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd in select.select(list(partial), [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                del partial[fd]
                continue
            *whole, partial[fd] = (partial[fd] + chunk).split(b"\n")
            lines[names[fd]] += [line.decode(errors="replace") for line in whole]
    for name, proc in procs.items():
        fd_rest = partial.get(proc.stdout.fileno(), b"").decode(errors="replace")
        proc.terminate()
        rest, _ = proc.communicate(timeout=10)
        lines[name] += (fd_rest + rest).splitlines()
    return lines


# Run in a namespace: the FIB's answer per flow, by RTM_GETROUTE with the
# selectors `ip route get` takes (iproute2 6.1 has no `flowlabel`) and the
# gateway read from RTA_GATEWAY or RTA_VIA (RFC 5549). stdin: a JSON list of
# [dst, src, iif or "", sport, dport]; stdout: a JSON list of gateways.
_ROUTE_GET = r"""
import ipaddress, json, socket, struct, sys
RTA_DST, RTA_SRC, RTA_IIF, RTA_GATEWAY, RTA_VIA = 1, 2, 3, 5, 18
RTA_IP_PROTO, RTA_SPORT, RTA_DPORT = 27, 28, 29
def attr(kind, data):
    return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)
nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
out = []
for seq, (dst, src, iif, sport, dport) in enumerate(json.loads(sys.stdin.read()), 1):
    d, s = ipaddress.ip_address(dst), ipaddress.ip_address(src)
    family = socket.AF_INET6 if d.version == 6 else socket.AF_INET
    body = struct.pack("=BBBBBBBBI", family, d.max_prefixlen, 0 if iif == "" and s.is_unspecified
                       else d.max_prefixlen, 0, 0, 0, 0, 0, 0)
    body += attr(RTA_DST, d.packed) + attr(RTA_SRC, s.packed)
    if iif:
        body += attr(RTA_IIF, struct.pack("=I", socket.if_nametoindex(iif)))
    body += attr(RTA_IP_PROTO, bytes([socket.IPPROTO_UDP]))
    body += attr(RTA_SPORT, struct.pack("!H", sport)) + attr(RTA_DPORT, struct.pack("!H", dport))
    nl.send(struct.pack("=IHHII", 16 + len(body), 26, 1, seq, 0) + body)   # RTM_GETROUTE
    msg = nl.recv(65536)
    length, kind = struct.unpack_from("=IH", msg)
    if kind == 2:                                                          # NLMSG_ERROR
        errno = -struct.unpack_from("=i", msg, 16)[0]
        raise SystemExit(f"route get {dst} from {src}: errno {errno}")
    pos, gateway = 16 + 12, None
    while pos + 4 <= length:
        alen, akind = struct.unpack_from("=HH", msg, pos)
        if akind == RTA_GATEWAY:
            gateway = str(ipaddress.ip_address(msg[pos + 4:pos + alen]))
        elif akind == RTA_VIA:
            gateway = str(ipaddress.ip_address(msg[pos + 6:pos + alen]))
        pos += (alen + 3) & ~3
    out.append(gateway)
print(json.dumps(out))
"""


def route_get(ns: netns.Namespace, queries: list[list]) -> list[str | None]:
    """The gateway the FIB names for each [dst, src, iif or "", sport, dport]."""
    return json.loads(ns.run([sys.executable, "-c", _ROUTE_GET],
                             input=json.dumps(queries)).stdout)


def ecmp(ns: netns.Namespace, family: str, net: str, *members: tuple[str, str],
         onlink: bool = False) -> None:
    """`ip route add net nexthop via G dev D ...` (the order of the members matters)."""
    argv = []
    for gateway, dev in members:
        argv += ["nexthop", "via", gateway, "dev", dev] + (["onlink"] if onlink else [])
    ns.ip(family, "route", "add", net, *argv)


def test_forwarded_flows_reach_the_peer_the_kernel_chose(listening):
    """Flows from S, a host behind A, forwarded by A over ECMP to B and C.

    The kernel's member per flow is established without the classifier on
    a reference path: the same route over two veths (same member
    order and weights), the same flows sent again, and which dummy each flow
    left on captured. That is needed for IPv6: S's stack hashes each UDP
    datagram to make its automatic flow label (skb_get_hash_flowi6), the
    hash (l4_hash) stays on the skb through the veth, and A's multipath
    selection then uses it as it is: no `ip route get` selector reproduces
    it (57 of 100 flows matched in a trial; with S's auto_flowlabels off,
    all did). For IPv4, RTM_GETROUTE with iif, from, protocol and ports
    reproduces the kernel too, and is checked as well.
    """
    h, listeners = listening
    s = netns.Namespace("s")
    try:
        _forwarded_flows(h, listeners, s)
    finally:
        s.close()


def _forwarded_flows(h: Hosts, listeners: Listeners, s: netns.Namespace) -> None:
    _s_dev, a_dev = netns.veth(s, h.a, [f"{S4}/30", f"{S6}/64"], [f"{A_S4}/30", f"{A_S6}/64"],
                               prefix_a="vs", prefix_b="va")
    s.ip("-4", "route", "add", "default", "via", A_S4)
    s.ip("-6", "route", "add", "default", "via", A_S6)
    h.a.sysctl("net.ipv4.ip_forward", 1)
    h.a.sysctl("net.ipv6.conf.all.forwarding", 1)
    for peer in h.peers:       # the peers accept S's sources from A, and route back to them
        allowed = [f"{tunnel4('a')}/32", f"{tunnel6('a')}/128", S_NET4, S_NET6]
        h.wg[peer].set("peer", h.pub["a"], "allowed-ips", ",".join(allowed))
        h.ns[peer].ip("-4", "route", "add", S_NET4, "dev", h.wg[peer].ifname)
        h.ns[peer].ip("-6", "route", "add", S_NET6, "dev", h.wg[peer].ifname)
    # The reference path: two veth pairs inside A (no dummy driver here);
    # the gateways' static MAC is not the far ends', which drop what arrives.
    refs = [netns.unique_ifname("ref") for _ in range(2)]
    kinds = [("f4", "-4", NET4, ANY4, S4, tunnel4, "192.0.2.250"),
             ("f6", "-6", NET6, ANY6, S6, tunnel6, "fe80::250")]
    for ref in refs:
        h.a.ip("link", "add", ref, "type", "veth", "peer", "name", ref + "p")
        h.a.ip("link", "set", ref, "up")
        h.a.ip("link", "set", ref + "p", "up")
        for _tag, family, *_rest, ref_gw in kinds:
            h.a.ip(family, "neigh", "add", ref_gw, "lladdr", "02:00:00:00:02:50", "dev", ref,
                   "nud", "permanent")

    sniffer = h.a.popen([sys.executable, "-u", "-c", _SNIFFER, str(LISTEN_PORT), *refs],
                        stdout=subprocess.PIPE, text=True)
    try:
        assert sniffer.stdout.readline().strip() == "ready"
        for tag, family, net, dst, _src, _via, ref_gw in kinds:
            ecmp(h.a, family, net, (ref_gw, refs[0]), (ref_gw, refs[1]), onlink=family == "-4")
            send_flows(s, dst, "unconnected", tag, ports=FORWARD_PORTS)
    finally:
        total = len(kinds) * len(FORWARD_PORTS)
        captured = read_lines({"sniffer": sniffer}, lambda lines: len(
            {ln.split(" ", 1)[-1] for ln in lines["sniffer"]}) >= total, 10)["sniffer"]
    for _tag, family, net, *_rest in kinds:
        h.a.ip(family, "route", "del", net)
    for ref in refs:
        h.a.ip("link", "del", ref)
    reference: dict[str, set[str]] = {}
    for line in captured:
        ifname, flow = line.split(" ", 1)
        reference.setdefault(flow, set()).add(ifname)

    for _tag, family, net, _dst, _src, via, _ref in kinds:
        ecmp(h.a, family, net, (via("b"), h.dev), (via("c"), h.dev))
    status0 = h.status()["classifier_route"]
    for tag, _family, _net, dst, *_ in kinds:
        send_flows(s, dst, "unconnected", tag, ports=FORWARD_PORTS)
    received = listeners.received_all({f"{k[0]}-{p}" for k in kinds for p in FORWARD_PORTS})

    member_host = {refs[0]: "b", refs[1]: "c"}
    gateway_host = {tunnel4("b"): "b", tunnel4("c"): "c"}
    wrong, chosen = [], {"b": 0, "c": 0}
    for tag, family, _net, dst, src, _via, _ref in kinds:
        if family == "-4":
            asked = route_get(h.a, [[dst, src, a_dev, p, LISTEN_PORT] for p in FORWARD_PORTS])
        for i, sport in enumerate(FORWARD_PORTS):
            flow = f"{tag}-{sport}"
            refs_seen = reference.get(flow, set())
            assert len(refs_seen) == 1, f"reference path: flow {flow} left on {refs_seen}"
            expected = member_host[refs_seen.pop()]
            if family == "-4":
                assert gateway_host[asked[i]] == expected, f"{flow}: route get vs reference"
            chosen[expected] += 1
            got = carrier(received, flow)
            if got != expected:
                wrong.append(f"{flow}: kernel {expected}, wgebpf {got}")
    assert not wrong, f"{len(wrong)} of {total} forwarded flows:\n" + "\n".join(wrong)
    assert chosen["b"] > 10 and chosen["c"] > 10, chosen
    status = h.status()["classifier_route"]
    assert status["mode"] == "route"
    assert status["dst"] >= status0["dst"] + 2 * total     # read from the route, no fallback


# -- nexthop objects and IPv4 via an IPv6 gateway, end to end -----------------------------

GROUP_PORTS = range(43000, 43032)       # 32 flows per kind


def _flows_follow_the_fib(h: Hosts, listeners: Listeners,
                          kinds: list[tuple[str, str, str]], also: tuple[str, ...] = ()
                          ) -> tuple[dict[str, int], dict[str, set[str]]]:
    """Send GROUP_PORTS unconnected flows per (tag, destination, unspecified
    source) from A; assert each arrived at the peer RTM_GETROUTE names for it
    (from the unspecified source: what the kernel hashes for an unconnected
    socket). `also`: ids sent before, to wait for too. Returns flows per
    peer, and what the listeners received."""
    for tag, dst, _any in kinds:
        send_flows(h.a, dst, "unconnected", tag, ports=GROUP_PORTS)
    received = listeners.received_all({f"{k[0]}-{p}" for k in kinds for p in GROUP_PORTS}
                                      | set(also))
    gateway_host = {tunnel4("b"): "b", tunnel4("c"): "c", tunnel6("b"): "b",
                    tunnel6("c"): "c", B_LINK_LOCAL: "b"}
    wrong, chosen = [], {"b": 0, "c": 0}
    for tag, dst, any_source in kinds:
        gateways = route_get(h.a, [[dst, any_source, "", p, LISTEN_PORT] for p in GROUP_PORTS])
        for sport, gateway in zip(GROUP_PORTS, gateways):
            expected = gateway_host[gateway]
            chosen[expected] += 1
            got = carrier(received, f"{tag}-{sport}")
            if got != expected:
                wrong.append(f"{tag}-{sport}: kernel {expected} ({gateway}), wgebpf {got}")
    assert not wrong, f"{len(wrong)} flows:\n" + "\n".join(wrong)
    return chosen, received


def test_nexthop_object_group_flows_reach_the_member_the_kernel_chose(listening):
    h, listeners = listening
    for nhid, gateway in ((1, tunnel4("b")), (2, tunnel4("c")), (3, tunnel6("b")),
                          (4, tunnel6("c"))):
        h.a.ip("nexthop", "add", "id", str(nhid), "via", gateway, "dev", h.dev)
    h.a.ip("nexthop", "add", "id", "10", "group", "1/2")
    h.a.ip("nexthop", "add", "id", "11", "group", "3/4")
    h.a.ip("-4", "route", "add", NET4, "nhid", "10")
    h.a.ip("-6", "route", "add", NET6, "nhid", "11")
    chosen, _ = _flows_follow_the_fib(h, listeners,
                                      [("g4", ANY4, "0.0.0.0"), ("g6", ANY6, "::")])
    assert chosen["b"] > 5 and chosen["c"] > 5, chosen


def test_ipv4_via_ipv6_link_local_gateway_reaches_its_peer(listening):
    """RFC 5549: 203.0.113.77 (on both B and C) via fe80::2, which only B
    holds, alone and as one member of an ECMP route with C's IPv4 gateway."""
    h, listeners = listening
    h.a.ip("-4", "route", "add", f"{ANY4}/32", "via", "inet6", B_LINK_LOCAL, "dev", h.dev)
    send_flows(h.a, ANY4, "unconnected", "ll", ports=range(43100, 43108))
    h.a.ip("-4", "route", "del", f"{ANY4}/32")
    h.a.ip("-4", "route", "add", f"{ANY4}/32", "nexthop", "via", "inet6", B_LINK_LOCAL,
           "dev", h.dev, "nexthop", "via", tunnel4("c"), "dev", h.dev)
    chosen, received = _flows_follow_the_fib(h, listeners, [("mix", ANY4, "0.0.0.0")],
                                             also=tuple(f"ll-{p}" for p in range(43100, 43108)))
    assert {carrier(received, f"ll-{p}") for p in range(43100, 43108)} == {"b"}
    assert chosen["b"] > 3 and chosen["c"] > 3, chosen


# -- the `fib` source policy: where its answer is not the reply's path ---------------------

# Run on a peer host: one datagram pair per source port from sys.argv[1] (an
# address on the host's lo) to A; the payload is "<tag>-<sport>".
_FROM_SENDER = """
import socket, sys
src, dst, tag = sys.argv[1], sys.argv[2], sys.argv[6]
port, lo, hi = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for sport in range(lo, hi):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, sport))
        for _ in range(2):
            s.sendto(f"{tag}-{sport}".encode(), (dst, port))
"""

POLICY_PORTS = range(44000, 44032)


def test_fib_policy_ecmp_accepts_by_the_packets_addresses_not_an_unconnected_reply(hosts):
    """With an ECMP route to 203.0.113.77 over B and C, B and C each send
    flows from 203.0.113.77:p to A. The `fib` policy accepts a flow from the
    member its reverse lookup hashes to: source A's address, destination
    203.0.113.77, ports swapped (RTM_GETROUTE from 198.51.100.1). A reply
    from an unconnected socket on A (sendto) is routed with no source yet,
    so the kernel hashes 0.0.0.0 instead: for some flows the reply leaves
    via the other peer than the one whose packets were accepted."""
    h = hosts(a_extra={"SourcePolicy": "fib"})
    h.a.ip("-4", "route", "add", NET4, "nexthop", "via", tunnel4("b"), "dev", h.dev,
           "nexthop", "via", tunnel4("c"), "dev", h.dev)
    gateway_host = {tunnel4("b"): "b", tunnel4("c"): "c"}
    checked = route_get(h.a, [[ANY4, tunnel4("a"), "", LISTEN_PORT, p] for p in POLICY_PORTS])
    reply = route_get(h.a, [[ANY4, "0.0.0.0", "", LISTEN_PORT, p] for p in POLICY_PORTS])
    expected = {f"{gateway_host[gw]}-{p}" for p, gw in zip(POLICY_PORTS, checked)}
    listener = h.a.popen([sys.executable, "-u", "-c", _LISTENER, str(LISTEN_PORT)],
                         stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "ready"

    def dropped() -> int:
        status = h.status()
        return sum(status["policy"][str(status["peers"][h.pub[p]]["slot"])]["dropped_fib"]
                   for p in h.peers)
    try:
        for peer in h.peers:
            h.ns[peer].run([sys.executable, "-c", _FROM_SENDER, ANY4, tunnel4("a"),
                            str(LISTEN_PORT), str(POLICY_PORTS.start), str(POLICY_PORTS.stop),
                            peer])
        # Every flow is accepted from one peer and dropped from the other.
        netns.wait_until(lambda: dropped() >= 2 * len(POLICY_PORTS), 5, 0.2)
    finally:
        out = read_lines({"a": listener}, lambda got: expected <= set(got["a"]), 10)["a"]
    assert dropped() == 2 * len(POLICY_PORTS)
    accepted = set(out) - {"", "ready"}
    differ = 0
    for sport, gw_checked, gw_reply in zip(POLICY_PORTS, checked, reply):
        member = gateway_host[gw_checked]
        assert {peer for peer in h.peers if f"{peer}-{sport}" in accepted} == {member}, sport
        differ += gateway_host[gw_reply] != member
    assert 0 < differ < len(POLICY_PORTS), differ


def test_fib_policy_does_not_see_uidrange_rules(hosts):
    """A uidrange rule sends uid 1000's traffic to 203.0.113.77 via C; the
    `fib` policy's lookup carries no uid (the namespace's root), so it
    accepts 203.0.113.77 from B only, the path uid 1000's replies do not take."""
    h = hosts(a_extra={"SourcePolicy": "fib"})
    h.a.ip("-4", "route", "add", NET4, "via", tunnel4("b"), "dev", h.dev)
    h.a.ip("-4", "route", "add", NET4, "via", tunnel4("c"), "dev", h.dev, "table", "100")
    h.a.ip("-4", "rule", "add", "uidrange", "1000-1000", "table", "100")
    out = h.a.run(["ip", "-j", "-4", "route", "get", ANY4, "uid", "1000"]).stdout
    assert json.loads(out)[0]["gateway"] == tunnel4("c")      # uid 1000's replies: via C
    listener = h.a.popen(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                          sys.executable, "-u", "-c", _LISTENER, str(LISTEN_PORT)],
                         stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "ready"
    expected = {"b-44100", "b-44101"}
    slot_c = str(h.status()["peers"][h.pub["c"]]["slot"])

    def dropped_c() -> int:
        return h.status()["policy"][slot_c]["dropped_fib"]
    try:
        for peer in h.peers:
            h.ns[peer].run([sys.executable, "-c", _FROM_SENDER, ANY4, tunnel4("a"),
                            str(LISTEN_PORT), "44100", "44102", peer])
        netns.wait_until(lambda: dropped_c() >= 4, 5, 0.2)
    finally:
        out = read_lines({"a": listener}, lambda got: expected <= set(got["a"]), 10)["a"]
    assert dropped_c() == 4                     # C's two flows, two datagrams each
    assert set(out) - {"", "ready"} == expected
