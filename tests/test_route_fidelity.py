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
selectors (uidrange, oif) from the rule itself.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time

import pytest

from test_nexthop import (ANY4, ANY6, NET4, NET6, Hosts, hosts, tunnel4,  # noqa: F401
                          tunnel6)
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
