"""`wgebpf demo`: wgebpf and wireguard-go talking, in two network namespaces.

Builds the standard two-host topology of wgebpf.lab.netns, starts wireguard-go on
host B and `wgebpf attach` on host A with the embedded default config below
(fresh keys each run), sends pings (IPv4, IPv6, both ways) and a short iperf3
through the tunnel, prints `wg show` of both sides, and removes everything.
Nothing outside the two namespaces is touched.
"""

from __future__ import annotations

import os
import sys
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
    """The demo proper; raises on the first thing that does not work."""
    print("wgebpf demo: a wgebpf host and a wireguard-go host, joined by a veth cable\n")
    print(DIAGRAM)
    with netns.TwoHosts() as topo:
        try:
            _demo_steps(topo, iperf_seconds)
        except Exception:
            print(f"\n{topo.logs()}", file=sys.stderr)  # what the daemons said
            raise
        _step("cleaning up")
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


def main(classic: bool = False) -> int:
    """Entry point of `wgebpf demo`; returns the exit status."""
    if os.geteuid() != 0:
        print("wgebpf demo needs root (network namespaces): sudo wgebpf demo",
              file=sys.stderr)
        return 1
    try:
        run_demo()
    except Exception as exc:  # a demo reports, it does not dump a traceback
        print(f"\nwgebpf demo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
