"""SourcePolicy end to end: wgebpf on A, an honest wireguard-go peer B, and a
wireguard-go peer C that sends from B's network. The Lan topology of
tests/test_nexthop.py (its Hosts), plus:

    A  routes B's network via B:  203.0.113.0/25     via 198.51.100.2 dev wga...
                                  2001:db8:200::/64  via 2001:db8:100::2 dev wga...
       AllowedIPs on A hold tunnel addresses only (B: .2, ::2, fe80::2; C: .3, ::3)
       a UDP receiver on A, port RECV_PORT, both families: what got through
    B  sends from its tunnel address, and from its network (203.0.113.1, 2001:db8:200::1)
    C  sends from its tunnel address, and spoofs: from B's network (203.0.113.5,
       2001:db8:200::5, on C's lo) and from B's tunnel address (.2, ::2, on C's lo)

wireguard-go picks the peer for an outgoing packet by destination (A's tunnel
address is in its allowed-ips for A), so C's spoofed packets really reach A,
authenticated as C's. What A's kernel lets through is what the policy allowed;
`wgebpf status` must count every drop against its peer and reason.

One topology for the whole module (building it takes about 10 s); each test
leaves A as it found it (policy allowedips, no overrides, B's network via B),
which the `h` fixture restores even when a test fails. The detach test runs
a wgebpf of its own.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from test_nexthop import B_OWN4, B_OWN6, Hosts, ping_ok, tunnel4, tunnel6, wgebpf_with_peers
from wgebpf.lab import netns
from wgebpf.control.config import PEER_MARK_DEFAULT
from wgebpf.lab.netns import Namespace
from wgebpf.kernel.policy import peer_mark

pytestmark = [pytest.mark.netns, pytest.mark.interop]

B_NET = {4: "203.0.113.0/25", 6: "2001:db8:200::/64"}
RECV_PORT = 40200
COUNT = 3                       # datagrams per source and case


@dataclass(frozen=True)
class Source:
    host: str                   # the peer host that sends
    v4: str
    v6: str

    def addr(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6


SOURCES = {
    "b_tunnel": Source("b", tunnel4("b"), tunnel6("b")),
    "b_net": Source("b", B_OWN4, B_OWN6),                       # behind B, routed via B
    "c_tunnel": Source("c", tunnel4("c"), tunnel6("c")),
    "c_spoof_net": Source("c", "203.0.113.5", "2001:db8:200::5"),    # B's network
    "c_spoof_tunnel": Source("c", tunnel4("b"), tunnel6("b")),      # B's tunnel address
}
# C's lo holds the addresses it spoofs, so its sockets can bind them.
C_SPOOFED = ["203.0.113.5/32", "2001:db8:200::5/128", f"{tunnel4('b')}/32",
             f"{tunnel6('b')}/128"]

# What each policy drops (every other source is delivered), and the counter
# the drops land in (status "policy"[slot]).
DROPPED = {
    # classic: B's own network is refused too, as it is not in B's AllowedIPs
    "allowedips": ({"b_net", "c_spoof_net", "c_spoof_tunnel"}, "dropped_allowedips"),
    # the route back decides: B's network is via B, so B may send from it
    "fib": ({"c_spoof_net", "c_spoof_tunnel"}, "dropped_fib"),
    # wgebpf's sets hold the AllowedIPs, so as allowedips until the admin adds more
    "nftables": ({"b_net", "c_spoof_net", "c_spoof_tunnel"}, "dropped_nftables"),
    "off": (set(), None),
}
DROP_REASONS = ("dropped_allowedips", "dropped_fib", "fib_failed", "not_ip", "dropped_nftables")


# -- The receiver on A -------------------------------------------------------------

_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    src = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    print(src, data.decode(errors="replace"), flush=True)
"""

_SENDER = """
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
for arg in sys.argv[3:]:
    src, dst, payload = arg.split("|")
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        for _ in range(count):
            s.sendto(payload.encode(), (dst, port))
"""


class Receiver:
    """A UDP socket on A's port RECV_PORT (IPv4 and IPv6): every datagram's
    source address and payload, read by a thread."""

    def __init__(self, ns: Namespace):
        self.proc = ns.popen([sys.executable, "-u", "-c", _RECEIVER, str(RECV_PORT)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = self.proc.stdout.readline().strip()
        assert first == "ready", f"receiver on A: {first}"
        self.lines: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            src, _, payload = line.strip().partition(" ")
            with self._lock:
                self.lines.append((src, payload))

    def got(self, tag: str) -> Counter:
        """(source name, source address) -> datagrams, for payloads "tag name"."""
        with self._lock:
            return Counter((payload.split()[1], src) for src, payload in self.lines
                           if payload.split()[0] == tag)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# -- The topology ------------------------------------------------------------------


class PolicyHosts(Hosts):
    """Hosts (A, B, C) with B's network routed via B, C's spoofed addresses,
    A on SourcePolicy allowedips, and the receiver on A."""

    _serial = 0

    def __init__(self):
        self.receiver = None
        self._slots: dict[str, int] = {}
        super().__init__("bc", {"SourcePolicy": "allowedips"})
        try:
            for cidr in C_SPOOFED:
                netns.add_address(self.ns["c"], "lo", cidr)
            self.route_b_net("b")
            self.receiver = Receiver(self.a)
        except Exception:
            self.close()
            raise

    def route_b_net(self, via: str) -> None:
        """B's network via peer `via`'s tunnel address (ip route replace)."""
        self.a.ip("-4", "route", "replace", B_NET[4], "via", tunnel4(via), "dev", self.dev)
        self.a.ip("-6", "route", "replace", B_NET[6], "via", tunnel6(via), "dev", self.dev)

    def slot(self, peer: str) -> int:
        if peer not in self._slots:     # a peer keeps its slot while it exists
            self._slots[peer] = self.status()["peers"][self.pub[peer]]["slot"]
        return self._slots[peer]

    def wgebpf_set(self, *args: str) -> None:
        """`wgebpf set A's-interface ARGS...` (the live command)."""
        self.wg["a"].cli("set", self.dev, *args)

    def set_policy(self, policy: str, peer: str | None = None) -> None:
        if peer is None:
            self.wgebpf_set("source-policy", policy)
        else:
            self.wgebpf_set("peer", self.pub[peer], "source-policy", policy)

    def reset(self) -> None:
        """Policy allowedips, no overrides (one `wgebpf set`), B's network via B."""
        self.wgebpf_set("source-policy", "allowedips",
                        *(w for p in "bc" for w in ("peer", self.pub[p], "source-policy",
                                                    "default")))
        self.route_b_net("b")

    def send(self, names: list[str], families: tuple[int, ...]) -> str:
        """COUNT datagrams from each named source, in each family, to A's
        receiver; returns the case's tag (payloads are "tag name")."""
        PolicyHosts._serial += 1
        tag = f"case{PolicyHosts._serial}"
        dst = {4: tunnel4("a"), 6: tunnel6("a")}
        for host in "bc":
            args = [f"{SOURCES[n].addr(f)}|{dst[f]}|{tag} {n}" for f in families for n in names
                    if SOURCES[n].host == host]
            if args:
                self.ns[host].run([sys.executable, "-c", _SENDER, str(RECV_PORT), str(COUNT),
                                   *args])
        return tag

    def counters(self) -> dict[str, int]:
        """The source-policy counters of B and C ("b.dropped_fib", ...),
        per-peer drops ("b.drops") and the interface's ("drops")."""
        status = self.status()
        out = {"drops": status["drops"].get("source_policy", 0)}
        for p in "bc":
            peer = status["peers"][self.pub[p]]
            row = status["policy"][str(peer["slot"])]
            out.update({f"{p}.{k}": v for k, v in row.items()})
            out[f"{p}.drops"] = peer["drops"].get("source_policy", 0)
        return out

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
        super().close()


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def expected_drops(dropped: dict[str, str], n: int) -> dict[str, int]:
    """The counter increments for {source name: reason} dropped, n each."""
    out = {f"{p}.{r}": 0 for p in "bc" for r in DROP_REASONS}
    out.update({f"{p}.drops": 0 for p in "bc"}, drops=0)
    for name, reason in dropped.items():
        p = SOURCES[name].host
        out[f"{p}.{reason}"] += n
        out[f"{p}.drops"] += n
        out["drops"] += n
    return out


BOTH = (4, 6)


def check(h: PolicyHosts, delivered: set[str], dropped: dict[str, str],
          families: tuple[int, ...] = BOTH, filtered: set[str] = frozenset()) -> None:
    """Send from every source in delivered | dropped | filtered; the delivered
    ones must reach A's receiver with their own source address, the others
    must not, and each of `dropped` must be counted against its peer under
    its reason (`filtered`: the admin's own firewall drops them, wgebpf
    counts nothing)."""
    before = h.counters()
    tag = h.send(sorted(delivered | set(dropped) | filtered), families)
    want_got = Counter({(n, SOURCES[n].addr(f)): COUNT for n in delivered for f in families})
    want_drops = expected_drops(dropped, COUNT * len(families))

    def counted() -> dict[str, int]:
        d = delta(h.counters(), before)
        return {k: d[k] for k in want_drops}
    netns.wait_until(lambda: h.receiver.got(tag) == want_got and counted() == want_drops, 5, 0.2)
    time.sleep(0.3)     # anything late (a dropped source after all) shows up now
    assert h.receiver.got(tag) == want_got, f"delivered: {sorted(delivered)}"
    after = delta(h.counters(), before)
    assert {k: after[k] for k in want_drops} == want_drops, after
    for p in "bc":     # passed by the ingress program (marked: left to nftables)
        passed = sum(COUNT * len(families) for n in delivered if SOURCES[n].host == p)
        assert after[f"{p}.accepted"] + after[f"{p}.marked"] >= passed, after


@pytest.fixture(scope="module")
def topology(root):
    """Module scope; needs root. PolicyHosts, shared by this module's tests."""
    h = PolicyHosts()
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def h(request, topology):
    """Function scope; needs `topology`. The shared hosts; afterwards A is put
    back (policy allowedips, no overrides, B's network via B) and, when the
    test failed, every daemon's log is printed."""
    yield topology
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(topology.logs())
    topology.reset()


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


# -- Switching live ------------------------------------------------------------------
# First in the module: its handshake count must not meet the 120 s rekey.


def test_switching_policy_live_keeps_the_tunnel(h):
    """Ping streams from A to B (IPv4, IPv6) run on while the interface's
    policy and B's override go through every value: at most two replies lost
    per stream, and no new handshake."""
    key = h.pub["b"]
    handshakes = h.status()["peers"][key]["handshakes_completed"]
    b_handshake = h.wg["b"].peer(h.pub["a"]).latest_handshake
    streams = [h.a.popen(["ping", "-n", *fam, "-c", "70", "-i", "0.05", "-W", "1", dst],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for fam, dst in ((["-4"], tunnel4("b")), (["-6"], tunnel6("b")))]
    time.sleep(0.4)
    for args in (["fib"], ["nftables"], ["off"], ["allowedips"],
                 ["nftables", "b"], ["fib", "b"], ["off", "b"], ["default", "b"]):
        h.set_policy(*args)
        time.sleep(0.3)
    for proc in streams:
        out, _ = proc.communicate(timeout=30)
        sent, received = netns.ping_stats(out)
        assert received >= sent - 2, out
    assert h.status()["peers"][key]["handshakes_completed"] == handshakes
    assert h.wg["b"].peer(h.pub["a"]).latest_handshake == b_handshake


# -- Every policy: what is dropped, what is delivered --------------------------------


@pytest.mark.parametrize("policy", list(DROPPED))
def test_each_policy_drops_and_delivers(h, policy):
    """Every source, IPv4 and IPv6, under the interface's policy."""
    h.set_policy(policy)
    assert h.status()["source_policy"] == policy
    names, reason = DROPPED[policy]
    check(h, set(SOURCES) - names, {n: reason for n in names})


@FAMILIES
def test_network_behind_a_peer_allowedips_drops_its_replies_fib_accepts_them(h, family):
    """The seed's complaint: with only B's tunnel address in AllowedIPs, the
    classic rule drops the replies from B's network (the requests reach B:
    its probe counter moves); adding the network to AllowedIPs, or the fib
    policy with the route alone, lets them in."""
    fam = f"-{family}"
    dst = B_OWN4 if family == 4 else B_OWN6
    slot = str(h.slot("b"))
    dropped0 = h.status()["policy"][slot]["dropped_allowedips"]
    probes0 = h.probes()["b"]
    out = h.a.run(["ping", "-n", fam, "-c", "3", "-i", "0.2", "-w", "2", dst], check=False)
    assert out.returncode != 0, out.stdout
    assert h.probes()["b"] - probes0 >= 3, "the requests did not reach B"
    assert h.status()["policy"][slot]["dropped_allowedips"] - dropped0 >= 3

    allowed = sorted(h.allowed_ips()[h.pub["b"]])
    h.wg["a"].set("peer", h.pub["b"], "allowed-ips", ",".join(allowed + [B_NET[family]]))
    try:
        ping_ok(h.a, dst, fam)
    finally:
        h.wg["a"].set("peer", h.pub["b"], "allowed-ips", ",".join(allowed))

    h.set_policy("fib")
    ping_ok(h.a, dst, fam)
    assert sorted(h.allowed_ips()[h.pub["b"]]) == allowed


# -- fib follows the routing table ---------------------------------------------------


def test_fib_follows_a_route_change(h):
    h.set_policy("fib")
    check(h, {"b_net"}, {"c_spoof_net": "dropped_fib"})
    h.route_b_net("c")          # ip route replace B's network via C's tunnel address
    check(h, {"c_spoof_net"}, {"b_net": "dropped_fib"})
    # The route back leaves through another interface (the underlay): no
    # route through the wgebpf interface, so IPv4 fails the lookup; IPv6's
    # lookup names the underlay again, and the source itself is then
    # checked against AllowedIPs (README, Source policy).
    for family in BOTH:
        h.a.ip(f"-{family}", "route", "replace", B_NET[family], "dev", h.wg["a"].underlay)
    check(h, {"b_tunnel"}, {"b_net": "fib_failed"}, families=(4,))
    check(h, {"b_tunnel"}, {"b_net": "dropped_fib"}, families=(6,))
    # No route back at all: both are refused, as a failed lookup.
    for family in BOTH:
        h.a.ip(f"-{family}", "route", "replace", "unreachable", B_NET[family])
    check(h, {"b_tunnel", "c_tunnel"}, {"b_net": "fib_failed", "c_spoof_net": "fib_failed"})


# -- Per-peer overrides ----------------------------------------------------------------


def test_per_peer_override_beats_the_interface_default(h):
    h.set_policy("off", "b")
    peers = h.status()["peers"]
    assert peers[h.pub["b"]]["source_policy"] == "off"
    assert peers[h.pub["c"]]["source_policy"] == "allowedips"
    check(h, {"b_net", "b_tunnel"}, {"c_spoof_net": "dropped_allowedips"})
    h.set_policy("default", "b")
    check(h, {"b_tunnel"}, {"b_net": "dropped_allowedips"})
    # An override stricter than the default works the same way.
    h.set_policy("off")
    h.set_policy("allowedips", "c")
    check(h, {"b_net", "c_tunnel"}, {"c_spoof_net": "dropped_allowedips",
                                     "c_spoof_tunnel": "dropped_allowedips"})


# -- nftables ----------------------------------------------------------------------------


def nft(ns: Namespace, *args: str) -> str:
    return ns.run(["nft", *args]).stdout


def test_nftables_table_admin_elements_and_resync(h):
    """The table shows in A's ruleset (and only there); an admin's element
    lets B's network through, in both families, and survives wgebpf's own
    re-sync after an AllowedIPs change; C still cannot send from it."""
    h.set_policy("nftables")
    table = f"wgebpf_{h.dev}"
    slot = h.slot("b")
    ruleset = nft(h.a, "list", "ruleset")
    assert f"table inet {table}" in ruleset, ruleset
    for p in "bc":
        for v in (4, 6):
            assert f"set peer{h.slot(p)}_v{v}" in ruleset, ruleset
    assert table not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                       text=True).stdout, "the table leaked into the root namespace"
    # The mark stays on the packet: a rule of the admin's own, in input, sees
    # B's delivered datagrams under B's mark (PeerMark's default mask).
    h.a.run(["nft", "-f", "-"], input=f"""
table inet admin_marks {{
    counter from_b {{ }}
    chain input {{
        type filter hook input priority filter; policy accept;
        meta mark & {PEER_MARK_DEFAULT:#x} == {peer_mark(slot):#x} udp dport {RECV_PORT} counter name from_b
    }}
}}
""")
    try:
        check(h, {"b_tunnel"}, {"b_net": "dropped_nftables"})
        counter = nft(h.a, "list", "counter", "inet", "admin_marks", "from_b")
        assert f"packets {COUNT * 2} " in counter, counter
    finally:
        h.a.run(["nft", "delete", "table", "inet", "admin_marks"])

    allowed = sorted(h.allowed_ips()[h.pub["b"]])
    elements = [(f"peer{slot}_v4", B_NET[4]), (f"peer{slot}_v6", B_NET[6])]
    try:
        for name, net in elements:
            nft(h.a, "add", "element", "inet", table, name, f"{{ {net} }}")
        check(h, {"b_net", "b_tunnel"}, {"c_spoof_net": "dropped_nftables"})
        # AllowedIPs change: wgebpf re-syncs its own elements, never the admin's.
        h.wg["a"].set("peer", h.pub["b"], "allowed-ips", ",".join(allowed + ["198.51.100.102/32"]))
        listed = nft(h.a, "list", "set", "inet", table, f"peer{slot}_v4")
        assert "198.51.100.102" in listed and B_NET[4] in listed, listed
        check(h, {"b_net"}, {"c_spoof_net": "dropped_nftables"})
    finally:
        h.wg["a"].set("peer", h.pub["b"], "allowed-ips", ",".join(allowed))
        for name, net in elements:
            h.a.run(["nft", "delete", "element", "inet", table, name, f"{{ {net} }}"],
                    check=False)
    # wgebpf removed the element it added and no longer wants.
    assert "198.51.100.102" not in nft(h.a, "list", "set", "inet", table, f"peer{slot}_v4")
    # Switching away: no marks, so the table's rules no longer apply.
    h.set_policy("off")
    check(h, {"b_net", "c_spoof_net"}, {}, families=(4,))


def test_off_leaves_it_to_a_firewall_that_cannot_tell_peers_apart(h):
    """With off, the README's interface-level table (here: tunnel prefixes
    only) keeps the networks out, but C still passes with B's tunnel
    address: without a peer mark, nftables cannot see who sent it."""
    h.set_policy("off")
    h.a.run(["nft", "-f", "-"], input=f"""
table inet {h.dev}_sources {{
    set allowed4 {{ type ipv4_addr; flags interval; elements = {{ 198.51.100.0/24 }} }}
    set allowed6 {{ type ipv6_addr; flags interval; elements = {{ 2001:db8:100::/64 }} }}
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{h.dev}" ip saddr != @allowed4 counter drop
        iifname "{h.dev}" ip6 saddr != @allowed6 counter drop
        iifname "{h.dev}" fib saddr . iif oif missing counter drop
    }}
}}
""")
    try:
        check(h, {"b_tunnel", "c_tunnel", "c_spoof_tunnel"}, {},
              filtered={"b_net", "c_spoof_net"})
    finally:
        h.a.run(["nft", "delete", "table", "inet", f"{h.dev}_sources"])


def tables(ns: Namespace) -> str:
    return nft(ns, "list", "tables")


def test_nftables_table_is_removed_by_sigterm_and_by_detach_after_kill_9(root):
    with Namespace("a") as ns, wgebpf_with_peers(ns, 1) as side:
        side.config.extra["SourcePolicy"] = "nftables"
        table = f"table inet wgebpf_{side.ifname}"
        side.start(timeout=60)
        assert table in tables(ns)
        assert side.stop() == 0, side.log()
        assert table not in tables(ns), tables(ns)
        assert not ns.link_exists(side.ifname)

        side.start(timeout=60)
        assert table in tables(ns)
        side.kill()
        assert table in tables(ns), "a killed instance cannot remove its table"
        side.cli("detach", side.ifname)
        assert table not in tables(ns), tables(ns)
        assert not ns.link_exists(side.ifname)
