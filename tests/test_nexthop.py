"""Next-hop peer selection and the worker pool: wgebpf on host A, wireguard-go
on hosts B and C (D and E for the worker test), through the CLI and `ip`.

                    netns <run>-lan: bridge br0, no address
         +--------------------+--------------------+--------------------+
         | veth               | veth               | veth               | veth
+--------+---------+ +--------+---------+ +--------+---------+ +- - - - + - - - - - +
| A  192.0.2.1     | | B  192.0.2.2     | | C  192.0.2.3     | : D .4, E .5         :
| wgebpf  wga...   | | wireguard-go     | | wireguard-go     | : wireguard-go       :
| 198.51.100.1/24  | | 198.51.100.2/24  | | 198.51.100.3/24  | : 198.51.100.4, .5   :
| 2001:db8:100::1  | | 2001:db8:100::2  | | 2001:db8:100::3  | : (worker test only) :
|                  | | fe80::2/64       | |                  | +- - - - - - - - - - +
| routes, rules    | | lo:              | | lo:              |
| and BIRD, as     | |  203.0.113.1     | |  203.0.113.129   |
| each test adds   | |  203.0.113.77    | |  203.0.113.77    |  .77 and ::77 are on
| them             | |  2001:db8:200::1 | |  2001:db8:200::77|  both B and C: a ping
|                  | |  2001:db8:200::77| |                  |  works via either
+------------------+ +------------------+ +------------------+

Every host's WireGuard listens on UDP 51820 of its LAN address (192.0.2.0/24).
A's AllowedIPs hold only the peers' tunnel addresses (B also fe80::2/128);
each peer's allowed-ips for A hold A's tunnel addresses. Which peer carried
a probe is read from an nftables counter on each peer host's tunnel
interface (echo requests and the test's UDP ports only: keepalives never
reach the interface and BGP is TCP), and from `wgebpf status` on A.

A runs `SourcePolicy = off`: replies come from 203.0.113.x and
2001:db8:200::x, which are deliberately not in any AllowedIPs on A.

Sections: static routes (via, replace, ECMP, fwmark, link-local next hops),
no peer for the next hop, BGP with BIRD, the worker pool, the peer limit.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable

import pytest

from wgebpf.lab import netns
from wgebpf.lab.netns import Bird, InterfaceConfig, Namespace, PeerConfig

pytestmark = [pytest.mark.netns, pytest.mark.interop]

HOSTS = "abcde"  # host h is number HOSTS.index(h) + 1 in every prefix below
PORT = 51820
ANY4, ANY6 = "203.0.113.77", "2001:db8:200::77"  # on both B and C
B_OWN4, C_OWN4, B_OWN6 = "203.0.113.1", "203.0.113.129", "2001:db8:200::1"
NET4, NET6 = "203.0.113.0/24", "2001:db8:200::/64"
B_LINK_LOCAL = "fe80::2"
BEHIND = {  # addresses a peer host answers for, on lo
    "b": [f"{B_OWN4}/32", f"{ANY4}/32", f"{B_OWN6}/128", f"{ANY6}/128"],
    "c": [f"{C_OWN4}/32", f"{ANY4}/32", f"{ANY6}/128"],
}
UDP_PORTS = range(40000, 40064)  # the ECMP test's flows, one per port


def num(host: str) -> int:
    return HOSTS.index(host) + 1


def tunnel4(host: str) -> str:
    return f"198.51.100.{num(host)}"


def tunnel6(host: str) -> str:
    return f"2001:db8:100::{num(host)}"


# -- The topology ------------------------------------------------------------------


class Hosts:
    """A (wgebpf) and the given wireguard-go peers on one Lan; see the diagram.

    Every peer pings A once at the end of set-up: all handshakes are done
    before a test starts, and A sent last, so A has no passive keepalive
    pending that would show up in a peer's receive counters later.
    """

    def __init__(self, peers: str = "bc", a_extra: dict[str, str] | None = None):
        self.peers = peers
        self.ns: dict[str, Namespace] = {}
        self.wg: dict[str, netns.WgInterface] = {}
        self.birds: list[Bird] = []
        self.lan = netns.Lan()
        try:
            self._build(a_extra or {})
        except Exception:
            self.close()
            raise

    def _build(self, a_extra: dict[str, str]) -> None:
        keys = {h: netns.genkey() for h in "a" + self.peers}
        self.pub = {h: netns.pubkey(k) for h, k in keys.items()}
        underlay = {}
        for h in "a" + self.peers:
            self.ns[h] = Namespace(h)
            underlay[h] = self.lan.join(self.ns[h], [f"192.0.2.{num(h)}/24"])
        for h in self.peers:
            addrs = [f"{tunnel4(h)}/24", f"{tunnel6(h)}/64"]
            if h == "b":
                addrs.append(f"{B_LINK_LOCAL}/64")
            cfg = InterfaceConfig(keys[h], PORT, addrs, peers=[PeerConfig(
                self.pub["a"], [f"{tunnel4('a')}/32", f"{tunnel6('a')}/128"],
                f"192.0.2.1:{PORT}")])
            for cidr in BEHIND.get(h, ()):
                netns.add_address(self.ns[h], "lo", cidr)
            self.wg[h] = netns.WireGuardGo(self.ns[h], netns.unique_ifname(f"wg{h}"), cfg)
            self.wg[h].start()
            count_probes(self.ns[h], self.wg[h].ifname)
        a_peers = []
        for h in self.peers:
            allowed = [f"{tunnel4(h)}/32", f"{tunnel6(h)}/128"]
            if h == "b":
                allowed.append(f"{B_LINK_LOCAL}/128")
            a_peers.append(PeerConfig(self.pub[h], allowed, f"192.0.2.{num(h)}:{PORT}"))
        a_cfg = InterfaceConfig(keys["a"], PORT, [f"{tunnel4('a')}/24", f"{tunnel6('a')}/64"],
                                peers=a_peers, extra={"SourcePolicy": "off", **a_extra})
        # ECMP hashes by L4 ports only with policy 1 (the default hashes by L3).
        self.a.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
        self.a.sysctl("net.ipv6.fib_multipath_hash_policy", 1)
        self.wg["a"] = netns.Wgebpf(self.a, netns.unique_ifname("wga"), a_cfg, underlay["a"])
        self.wg["a"].start()
        failed = pings([(self.ns[h], tunnel4("a")) for h in self.peers], count=2)
        assert not failed, f"set-up: no tunnel to A from {failed}"

    @property
    def a(self) -> Namespace:
        return self.ns["a"]

    @property
    def dev(self) -> str:
        """A's wgebpf interface."""
        return self.wg["a"].ifname

    def status(self) -> dict:
        return self.wg["a"].status()

    def tx_packets(self) -> dict[str, int]:
        """Packets A's wgebpf sent to each peer, by host letter."""
        peers = self.status()["peers"]
        return {h: peers[self.pub[h]]["tx_packets"] for h in self.peers}

    def rx_bytes(self) -> dict[str, int]:
        """Bytes each peer's wireguard-go received from A (handshakes included)."""
        return {h: self.wg[h].peer(self.pub["a"]).rx_bytes for h in self.peers}

    def probes(self) -> dict[str, int]:
        return {h: probe_count(self.ns[h]) for h in self.peers}

    def carried_by(self, action: Callable[[], object]) -> dict[str, int]:
        """Run action; how many probes each peer host received meanwhile."""
        before = self.probes()
        action()
        after = self.probes()
        return {h: after[h] - before[h] for h in self.peers}

    def allowed_ips(self) -> dict[str, list[str]]:
        """A's AllowedIPs per peer key, as `wg show` reports them."""
        return {k: sorted(p.allowed_ips) for k, p in self.wg["a"].dump().peers.items()}

    def bird(self, host: str, config: str) -> Bird:
        bird = Bird(self.ns[host], config, name=f"bird-{host}")
        self.birds.append(bird)
        return bird.start()

    def logs(self) -> str:
        out = [f"===== {side!r} log =====\n{side.log()}" for side in self.wg.values()]
        out += [f"===== {bird!r} log =====\n{bird.log()}" for bird in self.birds]
        return "\n".join(out)

    def close(self) -> None:
        for bird in reversed(self.birds):
            bird.close()
        for side in reversed(list(self.wg.values())):
            side.close()
        for ns in reversed(list(self.ns.values())):
            ns.close()
        self.lan.close()


def count_probes(ns: Namespace, ifname: str) -> None:
    """An nftables counter of the probes arriving from the tunnel on ifname."""
    ns.run(["nft", "-f", "-"], input=f"""
table inet probes {{
    counter seen {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{ifname}" icmp type echo-request counter name seen
        iifname "{ifname}" icmpv6 type echo-request counter name seen
        iifname "{ifname}" udp dport {UDP_PORTS.start}-{UDP_PORTS.stop - 1} counter name seen
    }}
}}
""")


def probe_count(ns: Namespace) -> int:
    data = json.loads(ns.run(["nft", "-j", "list", "counter", "inet", "probes", "seen"]).stdout)
    return next(item["counter"]["packets"] for item in data["nftables"] if "counter" in item)


def pings(targets: list[tuple[Namespace, str]], count: int = 3,
          timeout: float = 10) -> list[str]:
    """Ping every (namespace, address) at once; the ones that did not get `count`
    replies within `timeout` seconds, with ping's output."""
    procs = [(ns, addr, ns.popen(["ping", "-n", "-c", str(count), "-i", "0.2",
                                  "-w", str(round(timeout)), addr],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for ns, addr in targets]
    failed = []
    for ns, addr, proc in procs:
        out, _ = proc.communicate(timeout=timeout + 10)
        if proc.returncode != 0:
            failed.append(f"{ns.role} -> {addr}: {out}")
    return failed


def ping_ok(ns: Namespace, addr: str, *extra: str, count: int = 3) -> None:
    out = ns.run(["ping", "-n", *extra, "-c", str(count), "-i", "0.2", "-w", "10", addr],
                 check=False)
    assert out.returncode == 0, f"ping {' '.join(extra)} {addr}:\n{out.stdout}{out.stderr}"


_UDP_FLOWS = """
import socket, sys
dst, ports = sys.argv[1], range(int(sys.argv[2]), int(sys.argv[3]))
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
for port in ports:
    # A new socket, so a new source port, per flow. Not connected: the peers'
    # ICMP port unreachable would make the next send fail.
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        for _ in range(3):
            s.sendto(b"flow", (dst, port))
"""


def udp_flows(ns: Namespace, dst: str) -> None:
    """Three datagrams on each of len(UDP_PORTS) flows (distinct ports) to dst."""
    ns.run([sys.executable, "-c", _UDP_FLOWS, dst, str(UDP_PORTS.start), str(UDP_PORTS.stop)])


def wait_status(hosts: Hosts, predicate: Callable[[dict], bool], timeout: float = 5) -> dict:
    """Poll `wgebpf status` until predicate(status) holds; the last status either way
    (workers report about every 0.5 s)."""
    last: dict = {}

    def check() -> bool:
        nonlocal last
        last = hosts.status()
        return predicate(last)
    netns.wait_until(check, timeout, 0.2)
    return last


@pytest.fixture
def hosts(request, root):
    """Function scope; needs root. A (wgebpf) with peers B and C, built per test
    (the diagram above); every daemon's log is printed when the test fails."""
    made: list[Hosts] = []

    def factory(peers: str = "bc", a_extra: dict[str, str] | None = None) -> Hosts:
        made.append(Hosts(peers, a_extra))
        return made[-1]
    try:
        yield factory
    finally:
        report = getattr(request.node, "rep_call", None)
        for h in made:
            if report is not None and report.failed:
                print(h.logs())
            h.close()


# -- Static routes ---------------------------------------------------------------


@pytest.mark.parametrize("family, net, dst, via_b, via_c", [
    ("-4", NET4, ANY4, tunnel4("b"), tunnel4("c")),
    ("-6", NET6, ANY6, tunnel6("b"), tunnel6("c")),
], ids=["ipv4", "ipv6"])
def test_route_via_a_peer_and_replace_moves_it(hosts, family, net, dst, via_b, via_c):
    h = hosts()
    allowed = h.allowed_ips()
    tx0 = h.tx_packets()
    h.a.ip(family, "route", "add", net, "via", via_b, "dev", h.dev)
    got = h.carried_by(lambda: ping_ok(h.a, dst))
    assert got["b"] >= 3 and got["c"] == 0, got
    # wgebpf's own counters agree: per peer, and per next hop.
    status = wait_status(h, lambda s: s["peers"][h.pub["b"]]["tx_packets"] >= tx0["b"] + 3
                         and s["nexthops"].get(via_b, {}).get("packets", 0) >= 3)
    assert status["peers"][h.pub["b"]]["tx_packets"] >= tx0["b"] + 3, status["peers"]
    assert status["nexthops"].get(via_b, {}).get("packets", 0) >= 3, status["nexthops"]

    h.a.ip(family, "route", "replace", net, "via", via_c, "dev", h.dev)
    got = h.carried_by(lambda: ping_ok(h.a, dst))
    assert got["c"] >= 3 and got["b"] == 0, got
    assert h.allowed_ips() == allowed  # nothing in wgebpf changed


@pytest.mark.parametrize("family, net, dst, via_b, via_c", [
    ("-4", NET4, ANY4, tunnel4("b"), tunnel4("c")),
    ("-6", NET6, ANY6, tunnel6("b"), tunnel6("c")),
], ids=["ipv4", "ipv6"])
def test_ecmp_route_spreads_flows_over_both_peers(hosts, family, net, dst, via_b, via_c):
    h = hosts()
    h.a.ip(family, "route", "add", net, "nexthop", "via", via_b, "dev", h.dev,
           "nexthop", "via", via_c, "dev", h.dev)
    tx0 = h.tx_packets()
    before = h.probes()
    udp_flows(h.a, dst)
    flows = len(UDP_PORTS)

    def spread() -> dict[str, int]:
        now = h.probes()
        return {p: now[p] - before[p] for p in h.peers}
    # Datagrams arrive after the sender is done; wait for most of them.
    netns.wait_until(lambda: sum(spread().values()) >= flows * 3 * 0.9, 5)
    got = spread()
    assert got["b"] > 0 and got["c"] > 0, f"all {flows} flows went one way: {got}"
    assert sum(got.values()) >= flows * 3 * 0.9, got
    status = wait_status(h, lambda s: all(
        s["peers"][h.pub[p]]["tx_packets"] > tx0[p] for p in "bc"))
    assert all(status["peers"][h.pub[p]]["tx_packets"] > tx0[p] for p in "bc"), \
        (tx0, status["peers"])


@pytest.mark.parametrize("family, net, dst, via_b, via_c", [
    ("-4", NET4, ANY4, tunnel4("b"), tunnel4("c")),
    ("-6", NET6, ANY6, tunnel6("b"), tunnel6("c")),
], ids=["ipv4", "ipv6"])
def test_fwmark_rule_sends_marked_traffic_through_another_peer(hosts, family, net, dst,
                                                               via_b, via_c):
    h = hosts()
    h.a.ip(family, "rule", "add", "fwmark", "0x7", "table", "100")
    h.a.ip(family, "route", "add", net, "via", via_c, "dev", h.dev, "table", "100")
    h.a.ip(family, "route", "add", net, "via", via_b, "dev", h.dev)
    got = h.carried_by(lambda: ping_ok(h.a, dst, "-m", "7"))
    assert got["c"] >= 3 and got["b"] == 0, f"marked: {got}"
    got = h.carried_by(lambda: ping_ok(h.a, dst))
    assert got["b"] >= 3 and got["c"] == 0, f"unmarked: {got}"


@pytest.mark.parametrize("route, dst", [
    (["-6", "route", "add", NET6, "via", B_LINK_LOCAL], B_OWN6),
    # IPv4 over an IPv6 gateway (RFC 5549), as BGP unnumbered sets up.
    (["-4", "route", "add", NET4, "via", "inet6", B_LINK_LOCAL], B_OWN4),
], ids=["ipv6", "ipv4-via-ipv6"])
def test_link_local_next_hop(hosts, route, dst):
    h = hosts()
    h.a.ip(*route, "dev", h.dev)
    got = h.carried_by(lambda: ping_ok(h.a, dst))
    assert got["b"] >= 3 and got["c"] == 0, got


# -- No peer for the next hop ------------------------------------------------------


@pytest.mark.parametrize("family, net, dst, gateway", [
    ("-4", NET4, ANY4, "198.51.100.99"),
    ("-6", NET6, ANY6, "2001:db8:100::99"),
], ids=["ipv4", "ipv6"])
def test_next_hop_no_peer_owns_is_dropped_counted_and_answered(hosts, family, net, dst,
                                                              gateway):
    h = hosts()
    h.a.ip(family, "route", "add", net, "via", gateway, "dev", h.dev)
    status0 = h.status()
    drops0 = status0["drops"].get("no_peer", 0)
    classified0 = status0["classifier"]["no_peer"]
    rx0, probes0 = h.rx_bytes(), h.probes()
    started = time.monotonic()
    out = h.a.run(["ping", "-n", "-c", "2", "-i", "0.2", "-W", "5", dst], check=False)
    assert out.returncode != 0, out.stdout
    assert re.search(r"(?i)destination (host |address )?unreachable", out.stdout), out.stdout
    assert time.monotonic() - started < 4, "a timeout, not an ICMP error"
    status = wait_status(h, lambda s: s["drops"].get("no_peer", 0) >= drops0 + 2
                         and s["classifier"]["no_peer"] >= classified0 + 2)
    assert status["drops"].get("no_peer", 0) >= drops0 + 2, status["drops"]
    assert status["classifier"]["no_peer"] >= classified0 + 2, status["classifier"]
    assert h.rx_bytes() == rx0 and h.probes() == probes0


# -- BGP with BIRD -------------------------------------------------------------------

BGP_TIMERS = "connect delay time 1; connect retry time 2; error wait time 1, 5;"


def bird_a_config() -> str:
    sessions = "\n".join(
        f"protocol bgp to_{p} {{ local {tunnel4('a')} as 65001; "
        f"neighbor {tunnel4(p)} as {65000 + num(p)}; "
        f"ipv4 {{ import all; export none; }}; {BGP_TIMERS} }}" for p in "bc")
    return f"""
router id {tunnel4('a')};
log stderr all;
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ import none; export all; }}; }}
{sessions}
"""


def bird_peer_config(host: str, networks: list[str]) -> str:
    # No kernel protocol: the announced networks are not installed on the peer
    # host itself, which answers for its addresses on lo.
    routes = " ".join(f"route {net} blackhole;" for net in networks)
    return f"""
router id {tunnel4(host)};
log stderr all;
protocol device {{ scan time 1; }}
protocol static announced {{ ipv4; {routes} }}
protocol bgp to_a {{
    local {tunnel4(host)} as {65000 + num(host)};
    neighbor {tunnel4('a')} as 65001;
    ipv4 {{ import none; export where proto = "announced"; }};
    {BGP_TIMERS}
}}
"""


def route_of(h: Hosts, prefix: str) -> str:
    return h.a.ip("route", "show", "exact", prefix).stdout.strip()


def test_bgp_routes_learned_by_bird_steer_networks_and_fail_over(hosts):
    h = hosts()
    allowed = h.allowed_ips()
    bird_b = h.bird("b", bird_peer_config("b", ["203.0.113.0/25"]))
    h.bird("c", bird_peer_config("c", ["203.0.113.128/25", NET4]))
    bird_a = h.bird("a", bird_a_config())
    assert netns.wait_until(lambda: bird_a.established("to_b")
                            and bird_a.established("to_c"), 30, 0.5), \
        bird_a.birdc("show", "protocols", "all").stdout
    expected = {"203.0.113.0/25": tunnel4("b"), "203.0.113.128/25": tunnel4("c"),
                NET4: tunnel4("c")}
    assert netns.wait_until(lambda: all(f"via {gw} dev {h.dev} proto bird" in route_of(h, net)
                                        for net, gw in expected.items()), 15, 0.5), \
        h.a.ip("route").stdout
    for dst, via in ((B_OWN4, "b"), (C_OWN4, "c"), (ANY4, "b")):
        got = h.carried_by(lambda: ping_ok(h.a, dst))
        assert got[via] >= 3 and sum(got.values()) == got[via], f"{dst}: {got}"

    # B's session goes down: its /25 is withdrawn and C's covering /24 takes over.
    bird_b.birdc("disable", "to_a")
    assert netns.wait_until(lambda: route_of(h, "203.0.113.0/25") == "", 15, 0.5), \
        h.a.ip("route").stdout
    got = h.carried_by(lambda: ping_ok(h.a, ANY4))
    assert got["c"] >= 3 and got["b"] == 0, got
    assert h.allowed_ips() == allowed  # wgebpf's configuration never changed


# -- The worker pool ----------------------------------------------------------------


def counted_by_worker(status: dict) -> dict[int, dict[int, int]]:
    """Worker number -> {slot: packets it counted for that peer}."""
    return {w["worker"]: {int(k): n for k, n in w["packets_by_slot"].items()}
            for w in status["workers"]}


def test_two_workers_serve_four_peers_and_survive_a_killed_worker(hosts):
    """Workers = 2, PeerSpread: every worker serves every peer. Many flows
    to each peer spread over both workers (the flow hash picks the queue);
    a killed worker is restarted, the other keeps running, and since every
    session had a share in the dead one, every peer re-handshakes."""
    h = hosts("bcde", {"Workers": "2", "PeerSpread": "true"})
    status = h.status()
    slot = {p: status["peers"][h.pub[p]]["slot"] for p in h.peers}
    assert sorted(slot.values()) == [1, 2, 3, 4], slot
    assert [w["peers"] for w in status["workers"]] == [4, 4], status["workers"]
    assert all("worker" not in peer for peer in status["peers"].values()), status["peers"]
    assert not pings([(h.a, tunnel4(p)) for p in h.peers])

    before = counted_by_worker(h.status())
    tx0, probes0 = h.tx_packets(), h.probes()
    for p in h.peers:
        udp_flows(h.a, tunnel4(p))
    expected = len(UDP_PORTS) * 3

    def arrived() -> dict[str, int]:
        now = h.probes()
        return {p: now[p] - probes0[p] for p in h.peers}
    netns.wait_until(lambda: all(n >= expected * 0.9 for n in arrived().values()), 10)
    got = arrived()
    assert all(n >= expected * 0.9 for n in got.values()), got

    def grown(s: dict) -> dict[int, set[int]]:
        """Worker -> the slots it counted packets of since the flows began."""
        now = counted_by_worker(s)
        return {w: {k for k, n in counts.items() if n > before.get(w, {}).get(k, 0)}
                for w, counts in now.items()}

    def spread(s: dict) -> bool:
        g = grown(s)
        return len(g) == 2 and all(g.values()) and bool(set.intersection(*g.values()))
    status = wait_status(h, lambda s: spread(s) and all(
        s["peers"][h.pub[p]]["tx_packets"] >= tx0[p] + expected for p in h.peers))
    assert spread(status), (before, status["workers"])
    both = set.intersection(*grown(status).values())
    assert both <= set(slot.values()), both
    for p in h.peers:
        assert status["peers"][h.pub[p]]["tx_packets"] >= tx0[p] + expected, status["peers"]

    victim, survivor = status["workers"]
    handshakes0 = {p: status["peers"][h.pub[p]]["handshakes_completed"] for p in h.peers}
    os.kill(victim["pid"], signal.SIGKILL)  # a child of the attach process we started

    def restarted(s: dict) -> bool:
        w = next(w for w in s["workers"] if w["worker"] == victim["worker"])
        return w["restarts"] == 1 and w["alive"] and w["pid"] not in (None, victim["pid"])
    status = wait_status(h, restarted, timeout=10)
    assert restarted(status), status["workers"]
    after = {w["worker"]: w for w in status["workers"]}
    assert after[survivor["worker"]]["pid"] == survivor["pid"]
    assert after[survivor["worker"]]["restarts"] == 0 and after[survivor["worker"]]["alive"]
    # Every session had a share in the dead worker: all peers re-handshake,
    # and the tunnel works both ways again.
    failed = pings([(h.a, tunnel4(p)) for p in h.peers], timeout=15)
    failed += pings([(h.ns[p], tunnel4("a")) for p in h.peers], timeout=15)
    assert not failed, failed
    status = wait_status(h, lambda s: all(
        s["peers"][h.pub[p]]["handshakes_completed"] > handshakes0[p] for p in h.peers))
    handshakes = {p: status["peers"][h.pub[p]]["handshakes_completed"] for p in h.peers}
    assert all(handshakes[p] > handshakes0[p] for p in h.peers), (handshakes0, handshakes)
    assert {w["worker"]: w["pid"] for w in status["workers"]}[survivor["worker"]] == \
        survivor["pid"]


# -- Many peers -------------------------------------------------------------------------
# Queues are workers, not peers: a peer's slot is a 32-bit tag in the frames'
# Ethernet header and a key in the kernel maps, 1..65535 (the pool refuses
# the next one: tests/test_pool.py).

FILLERS = 600


def random_public_key() -> str:
    # Any 32 bytes are a Curve25519 public key; no private key is needed for a
    # peer that never connects.
    return base64.b64encode(os.urandom(32)).decode()


def wgebpf_with_peers(ns: Namespace, count: int) -> netns.Wgebpf:
    """A not-yet-started wgebpf in ns with `count` peers that never connect."""
    # An underlay to bind to (there is no dummy module here); nothing is sent.
    ns.ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
    ns.ip("link", "set", "ul0", "up")
    peers = [PeerConfig(random_public_key(), [f"2001:db8:100::{i + 2:x}/128"])
             for i in range(count)]
    cfg = InterfaceConfig(netns.genkey(), PORT, [f"{tunnel4('a')}/24"], peers=peers)
    return netns.Wgebpf(ns, netns.unique_ifname("wga"), cfg, "ul0")


def test_more_peers_than_a_tap_has_queues_are_accepted(root):
    with Namespace("a") as ns, wgebpf_with_peers(ns, FILLERS) as side:
        side.start(timeout=60)
        peers = side.status()["peers"]
        assert sorted(p["slot"] for p in peers.values()) == list(range(1, FILLERS + 1))
        assert len(side.dump().peers) == FILLERS


def add_fillers(side: netns.Wgebpf, count: int) -> None:
    """`count` peers that never connect, 50 to a `wg set`."""
    for start in range(0, count, 50):
        args: list[str] = []
        for i in range(start, min(start + 50, count)):
            args += ["peer", random_public_key(), "allowed-ips", f"2001:db8:100::{i + 2:x}/128"]
        side.set(*args)


def test_a_peer_whose_slot_needs_more_than_a_byte_carries_traffic(hosts):
    """B re-added after 600 other peers: its slot is above 600, so its tag
    takes two bytes on the wire between the eBPF programs and the workers.
    Pings flow both ways, IPv4 and IPv6, and the classic source check
    attributes B's packets to B's slot."""
    h = hosts("b", {"SourcePolicy": "allowedips"})
    a = h.wg["a"]
    add_fillers(a, FILLERS)
    a.set("peer", h.pub["b"], "remove")
    a.set("peer", random_public_key(), "allowed-ips", "2001:db8:100::ffff/128")  # takes B's slot
    a.set("peer", h.pub["b"], "allowed-ips", f"{tunnel4('b')}/32,{tunnel6('b')}/128",
          "endpoint", f"192.0.2.{num('b')}:{PORT}")
    slot = h.status()["peers"][h.pub["b"]]["slot"]
    assert slot > FILLERS, slot
    failed = pings([(h.a, tunnel4("b")), (h.a, tunnel6("b")), (h.ns["b"], tunnel4("a"))],
                   timeout=15)
    assert not failed, failed
    status = h.status()
    assert status["policy"][str(slot)]["accepted"] >= 3, status["policy"].get(str(slot))
    assert status["peers"][h.pub["b"]]["tx_packets"] >= 3
