"""`wgebpf demo`: what wgebpf does that classic WireGuard cannot, in namespaces.

The default demo (run_hub_demo) builds a hub and two peers on one LAN:

    A  wgebpf hub      198.51.100.1   PeerSelection nexthop, SourcePolicy fib
    B  wireguard-go    198.51.100.2   203.0.113.10 on lo
    C  wireguard-go    198.51.100.3   203.0.113.10 on lo (the same address)

A's AllowedIPs hold only the peers' tunnel addresses (/32, /128). Then, with
narration before each step: a route via B carries 203.0.113.0/24 through B;
`ip route replace` moves it to C with no WireGuard change; an ECMP route
spreads 32 UDP flows over both; B sends from C's tunnel address and the
`fib` source policy drops it. The evidence for each step is A's per-peer
next-hop counters (`wgebpf status`: next-hop traffic), nftables counters on
B and C (what arrived there from the tunnel) and A's source-policy counters.
The demo checks its own evidence and fails when a step did not do what it says.

`wgebpf demo --classic` (run_demo) is the point-to-point demo: the standard
two-host topology of wgebpf.lab.netns, wireguard-go on host B and `wgebpf
attach` on host A with the embedded default config below (fresh keys each
run), pings (IPv4, IPv6, both ways) and a short iperf3 through the tunnel,
`wg show` of both sides.

Both remove everything they made when they end, also on an error, Ctrl-C,
SIGTERM or SIGHUP. Nothing outside their namespaces is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time

from . import netns
from .netns import (A_PORT, A_TUNNEL4, A_TUNNEL6, A_UNDERLAY4, B_PORT, B_TUNNEL4, B_TUNNEL6,
                    B_UNDERLAY4)

# Host A's configuration, as a user would write it. The keys are filled in
# with fresh ones on every run.
DEFAULT_CONFIG = f"""\
# wgebpf demo, host A
[Interface]
PrivateKey = {{private_key}}
ListenPort = {A_PORT}
Address = {A_TUNNEL4}/24, {A_TUNNEL6}/64

[Peer]
# host B, running wireguard-go
PublicKey = {{peer_public_key}}
Endpoint = {B_UNDERLAY4}:{B_PORT}
AllowedIPs = {B_TUNNEL4}/32, {B_TUNNEL6}/128
"""

DIAGRAM = f"""\
   host A (netns)                               host B (netns)
   wgebpf                                       wireguard-go
   {A_TUNNEL4:<15}  ====== tunnel ======  {B_TUNNEL4}
   {A_TUNNEL6:<15}                        {B_TUNNEL6}
   {A_UNDERLAY4 + ':' + str(A_PORT):<15}  ------- veth -------  {B_UNDERLAY4}:{B_PORT}
"""


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _indent(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.rstrip("\n").splitlines())


def _fmt_bps(bps: float) -> str:
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.0f} Mbit/s"


def run_demo(iperf_seconds: float = 2) -> None:
    """The classic demo (--classic); raises on the first thing that does not work."""
    print("wgebpf demo: a wgebpf host and a wireguard-go host, joined by a veth cable\n")
    print(DIAGRAM)
    topo = netns.TwoHosts()
    try:
        _demo_steps(topo, iperf_seconds)
    except Exception:
        print(f"\n{topo.logs()}", file=sys.stderr)  # what the daemons said
        raise
    finally:
        _step("cleaning up")
        with _signals_held():
            topo.close()
    _step("done: both namespaces and everything in them are gone")


def _demo_steps(topo: netns.TwoHosts, iperf_seconds: float) -> None:
    _step(f"namespaces {topo.a.name} (A) and {topo.b.name} (B) are up")
    a_key, b_key = netns.genkey(), netns.genkey()
    a_cfg, b_cfg = netns.side_configs(endpoints="a", a_key=a_key, b_key=b_key)
    text = DEFAULT_CONFIG.format(private_key=a_key, peer_public_key=netns.pubkey(b_key))

    b = topo.track(netns.make_side("wireguard-go", topo.b, b_cfg, tag="wgb"))
    b.start()
    _step(f"wireguard-go is running on B as {b.ifname}")

    a = topo.track(netns.Wgebpf(topo.a, netns.unique_ifname("wga"), a_cfg,
                                topo.underlay_a, config_text=text))
    print("==> starting wgebpf on A with this configuration:")
    print(_indent(DEFAULT_CONFIG.format(private_key="(generated, not shown)",
                                        peer_public_key=b.public_key)))
    a.start()
    _step(f"wgebpf attach {topo.underlay_a} --name {a.ifname} is ready")

    for src, name, dst in ((topo.a, "A", B_TUNNEL4), (topo.b, "B", A_TUNNEL4),
                           (topo.a, "A", B_TUNNEL6), (topo.b, "B", A_TUNNEL6)):
        started = time.monotonic()
        if not netns.ping(src, dst, count=3, timeout=10):
            raise RuntimeError(f"ping from {name} to {dst} failed")
        _step(f"ping {name} -> {dst}: 3 of 3 replies "
              f"({time.monotonic() - started:.1f} s)")

    for client, server, addr, label in ((topo.a, topo.b, B_TUNNEL4, "A -> B"),
                                        (topo.b, topo.a, A_TUNNEL4, "B -> A")):
        bps = netns.iperf3(client, server, addr, iperf_seconds)
        _step(f"iperf3 TCP {label}, {iperf_seconds:g} s: {_fmt_bps(bps)}")

    print("\n==> wg show on A (stock wg(8), talking to wgebpf over the UAPI socket)")
    print(_indent(a.wg("show", a.ifname).stdout))
    print("==> wg show on B (wireguard-go)")
    print(_indent(b.wg("show", b.ifname).stdout))


# -- The hub demo (the default) ------------------------------------------------

HUB_PORT = 51820                 # every host's WireGuard port, on its LAN address
NET = "203.0.113.0/24"           # the network behind both B and C
SERVICE = "203.0.113.10"         # on B's and on C's lo: what answers in NET
PING_COUNT = 5
FLOW_PORT = 40000                # UDP destination of the ECMP flows (B and C drop them)
FLOW_SPORTS = range(41000, 41032)  # one flow per source port
SPOOF_PORT = 40001               # UDP port on A that step 4 sends to
SPOOF_COUNT = 3
HUB_HOSTS = {"a": 1, "b": 2, "c": 3}  # host -> its number in every prefix


def hub_tunnel4(host: str) -> str:
    return f"198.51.100.{HUB_HOSTS[host]}"


def hub_tunnel6(host: str) -> str:
    return f"2001:db8:100::{HUB_HOSTS[host]}"


def hub_lan4(host: str) -> str:
    return f"192.0.2.{HUB_HOSTS[host]}"


HUB_CONFIG = f"""\
# wgebpf demo, hub A
[Interface]
PrivateKey = {{private_key}}
ListenPort = {HUB_PORT}
Address = {hub_tunnel4('a')}/24, {hub_tunnel6('a')}/64
PeerSelection = nexthop   # the route's next hop picks the peer (the default)
SourcePolicy = fib        # a peer may send from what the routes say is behind it

[Peer]
# B, running wireguard-go
PublicKey = {{b_public_key}}
Endpoint = {hub_lan4('b')}:{HUB_PORT}
AllowedIPs = {hub_tunnel4('b')}/32, {hub_tunnel6('b')}/128

[Peer]
# C, running wireguard-go
PublicKey = {{c_public_key}}
Endpoint = {hub_lan4('c')}:{HUB_PORT}
AllowedIPs = {hub_tunnel4('c')}/32, {hub_tunnel6('c')}/128
"""

HUB_DIAGRAM = f"""\
   A  wgebpf hub      {hub_tunnel4('a'):<14} PeerSelection nexthop, SourcePolicy fib
   B  wireguard-go    {hub_tunnel4('b'):<14} {SERVICE} on lo
   C  wireguard-go    {hub_tunnel4('c'):<14} {SERVICE} on lo (the same address)
   one LAN, 192.0.2.0/24; every host in a network namespace of its own
"""

# B and C count what arrives from the tunnel: A's pings and UDP flows (the
# flows are dropped there, so no ICMP error comes back). Keepalives and
# handshakes never reach the interface, so they are not counted.
_PEER_COUNTER = """
table inet demo {{
    counter arrived {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{ifname}" icmp type echo-request counter name arrived
        iifname "{ifname}" udp dport {flow_port} counter name arrived drop
    }}
}}
"""

# A counts what its source policy let through to port SPOOF_PORT (and drops
# it there: no ICMP error goes back).
_HUB_COUNTER = """
table inet demo {{
    counter delivered {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{ifname}" udp dport {port} counter name delivered drop
    }}
}}
"""

# One datagram per flow, each from its own source port (argv: dst, dport,
# first source port, flows).
_FLOWS = """
import socket, sys
dst, dport, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for sport in range(first, first + n):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", sport))
        s.sendto(b"flow", (dst, dport))
"""

# count datagrams from src to dst:port. IP_TRANSPARENT lets the socket bind
# and send from an address this host does not own (argv: src, dst, port, count).
_SEND_FROM = """
import socket, sys
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.setsockopt(socket.SOL_IP, getattr(socket, "IP_TRANSPARENT", 19), 1)
    s.bind((src, 0))
    for _ in range(count):
        s.sendto(b"hello from " + src.encode(), (dst, port))
"""


def _nft_counter(ns: netns.Namespace, name: str) -> int:
    data = json.loads(ns.run(["nft", "-j", "list", "counter", "inet", "demo", name]).stdout)
    return next(item["counter"]["packets"] for item in data["nftables"] if "counter" in item)


class Hub:
    """A (wgebpf), B and C (wireguard-go) on one Lan; see HUB_DIAGRAM.

    Closes itself when building fails or is interrupted."""

    def __init__(self):
        self.ns: dict[str, netns.Namespace] = {}
        self.wg: dict[str, netns.WgInterface] = {}
        self.lan: netns.Lan | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.lan = netns.Lan("demo-lan")
        keys = {h: netns.genkey() for h in HUB_HOSTS}
        self.pub = {h: netns.pubkey(k) for h, k in keys.items()}
        underlay = {}
        for h in HUB_HOSTS:
            self.ns[h] = netns.Namespace(f"demo-{h}")
            underlay[h] = self.lan.join(self.ns[h], [f"{hub_lan4(h)}/24"])
        _step("namespaces: " + ", ".join([self.lan.ns.name] + [n.name for n in self.ns.values()]))
        for h in "bc":
            netns.add_address(self.ns[h], "lo", f"{SERVICE}/32")
            cfg = netns.InterfaceConfig(
                keys[h], HUB_PORT, [f"{hub_tunnel4(h)}/24", f"{hub_tunnel6(h)}/64"],
                peers=[netns.PeerConfig(self.pub["a"],
                                        [f"{hub_tunnel4('a')}/32", f"{hub_tunnel6('a')}/128"],
                                        f"{hub_lan4('a')}:{HUB_PORT}")])
            self.wg[h] = netns.WireGuardGo(self.ns[h], netns.unique_ifname(f"wg{h}"), cfg)
            self.wg[h].start()
            self.ns[h].run(["nft", "-f", "-"], input=_PEER_COUNTER.format(
                ifname=self.wg[h].ifname, flow_port=FLOW_PORT))
        _step(f"wireguard-go is running on B ({self.wg['b'].ifname}) "
              f"and on C ({self.wg['c'].ifname})")
        self.config_text = HUB_CONFIG.format(private_key=keys["a"], b_public_key=self.pub["b"],
                                             c_public_key=self.pub["c"])
        a_cfg = netns.InterfaceConfig(keys["a"], HUB_PORT)   # its key; the text is used
        print("==> starting wgebpf on A with this configuration:")
        print(_indent(HUB_CONFIG.format(private_key="(generated, not shown)",
                                        b_public_key=self.pub["b"],
                                        c_public_key=self.pub["c"])))
        self.wg["a"] = netns.Wgebpf(self.a, netns.unique_ifname("wga"), a_cfg, underlay["a"],
                                    config_text=self.config_text)
        self.wg["a"].start(timeout=60)
        self.a.run(["nft", "-f", "-"], input=_HUB_COUNTER.format(ifname=self.dev,
                                                                  port=SPOOF_PORT))
        # Every peer pings A once: the handshakes are done before the steps.
        for h in "bc":
            if not netns.ping(self.ns[h], hub_tunnel4("a"), count=1, timeout=10):
                raise RuntimeError(f"no tunnel from {h.upper()} to A")
        _step(f"wgebpf attach {self.wg['a'].underlay} --name {self.dev} is ready; "
              f"B and C have each pinged A once (handshakes done)")

    @property
    def a(self) -> netns.Namespace:
        return self.ns["a"]

    @property
    def dev(self) -> str:
        """A's wgebpf interface."""
        return self.wg["a"].ifname

    def status(self) -> dict:
        return self.wg["a"].status()

    def sent(self) -> dict[str, int]:
        """Packets A's classifier gave each peer's next hop (status: nexthops)."""
        nexthops = self.status().get("nexthops", {})
        return {h: nexthops.get(hub_tunnel4(h), {}).get("packets", 0) for h in "bc"}

    def arrived(self) -> dict[str, int]:
        """Probes that arrived at B and C from the tunnel (their nftables counters)."""
        return {h: _nft_counter(self.ns[h], "arrived") for h in "bc"}

    def counts(self) -> dict[str, dict[str, int]]:
        return {"sent": self.sent(), "arrived": self.arrived()}

    def policy(self, host: str) -> dict[str, int]:
        """The source-policy verdicts of peer `host` on A (status: policy[slot])."""
        status = self.status()
        slot = status["peers"][self.pub[host]]["slot"]
        return status["policy"][str(slot)]

    def delivered(self) -> int:
        """Datagrams to A's SPOOF_PORT that its source policy let through."""
        return _nft_counter(self.a, "delivered")

    def peers_config(self) -> dict[str, tuple]:
        """A's peers as `wg show` reports them: endpoint and AllowedIPs."""
        return {key: (peer.endpoint, sorted(peer.allowed_ips))
                for key, peer in self.wg["a"].dump().peers.items()}

    def run_ip(self, *args: str) -> None:
        """`ip ARGS...` on A, shown as typed."""
        print(f"    A# ip {' '.join(args)}", flush=True)
        self.a.ip(*args)

    def logs(self) -> str:
        return "\n".join(f"===== {side!r} log =====\n{side.log()}"
                         for side in self.wg.values())

    def close(self) -> None:
        for side in reversed(list(self.wg.values())):
            side.close()
        for ns in reversed(list(self.ns.values())):
            ns.close()
        if self.lan is not None:
            self.lan.close()


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"unexpected: {what}")


def _traffic_table(hub: Hub, before: dict, want: dict[str, object], timeout: float = 5
                   ) -> dict[str, dict[str, int]]:
    """Wait until both counters moved as `want` says ({host: n, or "some"}),
    print the increments per peer, and return them."""
    def delta() -> dict[str, dict[str, int]]:
        now = hub.counts()
        return {k: {h: now[k][h] - before[k][h] for h in "bc"} for k in now}

    def done(d) -> bool:
        return all((d[k][h] > 0 if n == "some" else d[k][h] == n)
                   for k in d for h, n in want.items())
    d = delta()
    deadline = time.monotonic() + timeout
    while not done(d) and time.monotonic() < deadline:
        time.sleep(0.2)
        d = delta()
    print(f"    {'peer':<6}{'next hop':<16}{'A sent it':>10}{'arrived':>10}")
    for h in "bc":
        print(f"    {h.upper():<6}{hub_tunnel4(h):<16}{d['sent'][h]:>10}{d['arrived'][h]:>10}")
    return d


def _ping(hub: Hub) -> None:
    print(f"    A# ping -c {PING_COUNT} {SERVICE}", flush=True)
    out = netns.ping_run(hub.a, SERVICE, count=PING_COUNT, timeout=5).stdout
    sent, received = netns.ping_stats(out)
    print(f"    {received} of {sent} replies", flush=True)
    _expect(received == sent, f"ping {SERVICE}: {received} of {sent} replies")


def run_hub_demo() -> None:
    """The default demo; raises on the first thing that does not work."""
    print("wgebpf demo: one network behind two WireGuard peers, and the routing table "
          "chooses\n")
    print(HUB_DIAGRAM)
    hub = None
    try:
        hub = Hub()
        try:
            _hub_steps(hub)
        except Exception:
            print(f"\n{hub.logs()}", file=sys.stderr)   # what the daemons said
            raise
    finally:
        if hub is not None:
            _step("cleaning up")
            with _signals_held():
                hub.close()
    _step("done: the namespaces and everything in them are gone")


def _hub_steps(hub: Hub) -> None:
    print(f"\n    A# wg show {hub.dev} allowed-ips")
    print(_indent(hub.wg["a"].wg("show", hub.dev, "allowed-ips").stdout))
    print(f"Only the peers' tunnel addresses are in AllowedIPs; {NET} is in none.\n"
          f"Below, 'A sent it' is what A's eBPF classifier sent to each peer (wgebpf status:\n"
          f"next-hop traffic); 'arrived' is an nftables counter on B and on C.\n")

    _step(f"1. A route sends {NET} through B, with nothing written in WireGuard")
    before = hub.counts()
    hub.run_ip("route", "add", NET, "via", hub_tunnel4("b"), "dev", hub.dev)
    _ping(hub)
    d = _traffic_table(hub, before, {"b": PING_COUNT, "c": 0})
    _expect(d["sent"] == d["arrived"] == {"b": PING_COUNT, "c": 0}, f"step 1: {d}")
    print(f"    The replies come from {SERVICE}, in no AllowedIPs: SourcePolicy fib accepts "
          f"them,\n    since the route back to {SERVICE} goes via B.\n")

    _step("2. ip route replace moves the network to C")
    config = hub.peers_config()
    before = hub.counts()
    hub.run_ip("route", "replace", NET, "via", hub_tunnel4("c"), "dev", hub.dev)
    _ping(hub)
    d = _traffic_table(hub, before, {"b": 0, "c": PING_COUNT})
    _expect(d["sent"] == d["arrived"] == {"b": 0, "c": PING_COUNT}, f"step 2: {d}")
    unchanged = hub.peers_config() == config
    _expect(unchanged, "A's WireGuard peers changed")
    print("    No WireGuard change: no `wg set`, no config edit; A's peers, endpoints and\n"
          "    AllowedIPs are the same before and after (wg show). Only the route moved.\n")

    _step(f"3. An ECMP route over B and C spreads {len(FLOW_SPORTS)} UDP flows over both")
    before = hub.counts()
    print("    A# sysctl -w net.ipv4.fib_multipath_hash_policy=1   # hash flows by their ports")
    hub.a.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
    hub.run_ip("route", "replace", NET, "nexthop", "via", hub_tunnel4("b"), "dev", hub.dev,
               "nexthop", "via", hub_tunnel4("c"), "dev", hub.dev)
    print(f"    A: {len(FLOW_SPORTS)} flows to {SERVICE} UDP port {FLOW_PORT}, one datagram "
          f"each, from source ports {FLOW_SPORTS.start}-{FLOW_SPORTS.stop - 1}", flush=True)
    hub.a.run([sys.executable, "-c", _FLOWS, SERVICE, str(FLOW_PORT),
               str(FLOW_SPORTS.start), str(len(FLOW_SPORTS))])
    total = len(FLOW_SPORTS)

    def spread(d) -> bool:
        return all(sum(d[k].values()) == total for k in d)
    d = _traffic_table(hub, before, {"b": "some", "c": "some"})
    _expect(spread(d) and d["sent"] == d["arrived"] and min(d["sent"].values()) > 0,
            f"step 3: {d}")
    print("    Every flow went to one peer, chosen by the kernel's ECMP hash; both carried "
          "some.\n")

    _step("4. A spoofed packet: B sends from C's tunnel address, and A drops it")
    print(f"    B sends {SPOOF_COUNT} UDP datagrams to A ({hub_tunnel4('a')} port {SPOOF_PORT}) "
          f"from {hub_tunnel4('c')}.\n"
          f"    WireGuard authenticates them as B's; the route back to {hub_tunnel4('c')} "
          f"goes via C.", flush=True)
    b0, c0, delivered0 = hub.policy("b"), hub.policy("c"), hub.delivered()
    hub.ns["b"].run([sys.executable, "-c", _SEND_FROM, hub_tunnel4("c"), hub_tunnel4("a"),
                     str(SPOOF_PORT), str(SPOOF_COUNT)])
    netns.wait_until(lambda: hub.policy("b")["dropped_fib"] - b0["dropped_fib"]
                     >= SPOOF_COUNT, 5, 0.2)
    time.sleep(0.3)     # a datagram that got through after all shows up now
    b1, delivered1 = hub.policy("b"), hub.delivered()
    print(f"    B's dropped_fib (wgebpf status: source policy)  "
          f"{b0['dropped_fib']} -> {b1['dropped_fib']}")
    print(f"    delivered to A's port {SPOOF_PORT}                     "
          f"{delivered1 - delivered0}")
    _expect(b1["dropped_fib"] - b0["dropped_fib"] == SPOOF_COUNT
            and delivered1 == delivered0, f"step 4: B {b0} -> {b1}, delivered "
                                          f"{delivered0} -> {delivered1}")
    logged = ""

    def log_line() -> bool:
        nonlocal logged
        logged = next((line for line in hub.wg["a"].log().splitlines()
                       if "does not allow" in line), "")
        return bool(logged)
    if netns.wait_until(log_line, 3, 0.2):
        print(f"    A's log (B is peer {hub.pub['b'][:8]}…):\n      {logged.strip()}")
    print(f"    C sends the same {SPOOF_COUNT} datagrams from its own address:", flush=True)
    hub.ns["c"].run([sys.executable, "-c", _SEND_FROM, hub_tunnel4("c"), hub_tunnel4("a"),
                     str(SPOOF_PORT), str(SPOOF_COUNT)])
    netns.wait_until(lambda: hub.delivered() - delivered1 >= SPOOF_COUNT, 5, 0.2)
    c1, delivered2 = hub.policy("c"), hub.delivered()
    print(f"    C's accepted (wgebpf status: source policy)     "
          f"{c0['accepted']} -> {c1['accepted']}")
    print(f"    delivered to A's port {SPOOF_PORT}                     "
          f"{delivered2 - delivered1}\n")
    _expect(delivered2 - delivered1 == SPOOF_COUNT, f"step 4: C's datagrams: "
                                                    f"{delivered2 - delivered1} delivered")


@contextlib.contextmanager
def _signals_held():
    """Ignore Ctrl-C, SIGTERM and SIGHUP meanwhile (the cleanup must finish);
    only possible in the main thread, elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(classic: bool = False) -> int:
    """Entry point of `wgebpf demo`; returns the exit status."""
    if os.geteuid() != 0:
        print("wgebpf demo needs root (network namespaces): sudo wgebpf demo",
              file=sys.stderr)
        return 1
    # SIGTERM and SIGHUP (the terminal closed) end the demo as Ctrl-C does:
    # through its cleanup.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        if classic:
            run_demo()
        else:
            run_hub_demo()
    except KeyboardInterrupt:
        print("\nwgebpf demo interrupted; everything it made is removed", file=sys.stderr)
        return 130
    except Exception as exc:  # a demo reports, it does not dump a traceback
        print(f"\nwgebpf demo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
