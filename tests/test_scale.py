"""The scale benchmark (wgebpf/lab/scale.py) and its peer swarm
(wgebpf/lab/swarm.py).

Unit: the swarm's peers against a whole in-memory wgebpf Device (handshakes,
cookie replies under load, the trickle's data delivered from each peer's own
address), the config scale.py writes (wgebpf's own parser reads every peer
with its own addresses), and the report arithmetic.

netns: a real run at 40 peers with 20 trickling, whose JSON report must
show every peer loaded and visible, every swarm handshake completed (also
in wgebpf's own `wg show`), the trickle's data counted per peer, and peer
add/remove leaving the ping through another peer flowing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memnet import MemoryConn, MemoryNetwork, MemoryTun
from wgebpf.control import config as wgconfig
from wgebpf.lab import scale, swarm
from wgebpf.wireguard import keys
from wgebpf.wireguard.device import Device
from wgebpf.wireguard.scheduler import FakeClock

SERVER = ("192.0.2.1", 51820)
SERVER_TUNNEL6 = "2001:db8:100::1"

# -- Unit: the swarm against an in-memory Device --------------------------------------


class DeviceSocket:
    """Stands in for one of the swarm's UDP sockets: what the swarm sends goes
    straight into the Device; what the Device sends back waits in `inbox`."""

    def __init__(self, network: MemoryNetwork, address: tuple, device: Device):
        self.address, self.device, self.network = address, device, network
        self.inbox: list[bytes] = []

    def sendto(self, data: bytes, server: tuple) -> None:
        assert server == SERVER
        self.device.on_datagram(bytes(data), self.address)
        for item in self.network.in_flight:          # the Device's answers
            if item[2] == self.address:
                self.inbox.append(item[0])
        self.network.in_flight.clear()

    def recv(self, size: int) -> bytes:
        if not self.inbox:
            raise BlockingIOError
        return self.inbox.pop(0)


def device_and_swarm(count: int, trickle: int):
    """A Device with `count` peers, and a Swarm impersonating all of them."""
    clock, network = FakeClock(), MemoryNetwork()
    server_private = keys.generate_private_key()
    tun = MemoryTun()
    conn = MemoryConn(network, SERVER)
    device = Device("mem", server_private, clock=clock, tun=tun, conn=conn,
                    addresses=[ipaddress.ip_interface(f"{SERVER_TUNNEL6}/64")])
    conn.device = device
    peers = scale.make_keys(count)
    for p in peers:
        device_peer = device.add_peer(keys.decode(p.public))
        device.add_allowed_ip(device_peer, f"{p.v6}/128")
    sock = DeviceSocket(network, ("192.0.2.32", 40000), device)
    spec = {"server_public_key": keys.encode(keys.public_key(server_private)), "mtu": 1420,
            "inner_destination": SERVER_TUNNEL6, "sink_port": 9999, "handshake_timeout": 30,
            "trickle_peers": trickle}
    members = [swarm.make_peer(i, p.private, p.v6, keys.decode(spec["server_public_key"]),
                               sock, i < trickle) for i, p in enumerate(peers)]
    return device, tun, sock, swarm.Swarm(spec, members, [sock], SERVER), peers


def handshake_all(sw: swarm.Swarm, sock: DeviceSocket) -> None:
    now = time.monotonic()
    for peer in sw.peers:
        sw.initiate(peer, now)
    sw.on_readable(sock, now)


def test_swarm_completes_every_handshake_with_a_wgebpf_device():
    device, _, sock, sw, peers = device_and_swarm(5, 0)
    handshake_all(sw, sock)
    assert sw.counters.responses == 5 and sw.counters.bad_responses == 0
    assert sw.handshake_report()["completed"] == 5
    # The keepalive that confirms each session reached the device: every
    # peer's session is its current one there, not a pending "next".
    for p in peers:
        assert device.peers[keys.decode(p.public)].keypairs.current is not None


def test_swarm_trickle_arrives_from_each_peers_own_address():
    _, tun, sock, sw, peers = device_and_swarm(4, 3)
    handshake_all(sw, sock)
    sw.set_trickle(1.0, time.monotonic())
    sw.run_due(time.monotonic() + 0.99)               # one period: one packet each
    sources = [str(ipaddress.IPv6Address(pkt[8:24])) for pkt in tun.received
               if pkt[0] >> 4 == 6]
    assert sorted(sources) == sorted(p.v6 for p in peers[:3])
    assert sw.report()["data_sent_min_per_peer"] == 1
    sw.set_trickle(0, time.monotonic())               # stopped: nothing more is sent
    sw.run_due(time.monotonic() + 5)
    assert sw.counters.data_sent == 3


def test_swarm_stores_a_cookie_and_the_retry_carries_it():
    device, _, sock, sw, peers = device_and_swarm(1, 0)
    device.force_under_load = True                    # the responder wants mac2
    handshake_all(sw, sock)
    assert (sw.counters.cookie_replies, sw.counters.responses) == (1, 0)
    peer = sw.peers[0]
    sw._on_retry(peer, peer.pending_index, time.monotonic())
    sw.on_readable(sock, time.monotonic())
    assert sw.counters.responses == 1 and sw.counters.retries == 1


def test_peak_per_window():
    assert swarm.peak_per_window([], 1.0) == 0
    assert swarm.peak_per_window([0.0, 1.5, 3.0], 1.0) == 1
    assert swarm.peak_per_window([0.0, 0.2, 0.4, 0.6, 2.0, 2.1], 1.0) == 4


# -- Unit: the config and the report -------------------------------------------------------


def test_config_gives_every_peer_addresses_of_its_own():
    peers = scale.make_keys(300)
    opts = scale.Options(peers=300, trickle=10, handshakes=10, source_policy="fib")
    cfg = wgconfig.parse(scale.a_config(keys.encode(keys.generate_private_key()), peers, opts))
    assert len(cfg.peers) == 300
    allowed = [tuple(str(n) for n in p.allowed_ips) for p in cfg.peers]
    assert len(set(a for ips in allowed for a in ips)) == 300 + scale.IPV4_PEERS
    assert all(len(ips) == 2 for ips in allowed[:scale.IPV4_PEERS])
    assert all(len(ips) == 1 and ":" in ips[0] for ips in allowed[scale.IPV4_PEERS:])
    # Every peer address is on-link on the interface, so Table = auto adds no route.
    net6 = ipaddress.ip_network(f"{scale.A_TUNNEL6}/64", strict=False)
    assert all(ipaddress.ip_network(ips[-1]).subnet_of(net6) for ips in allowed)


def test_per_peer_is_the_slope_between_two_sizes():
    def mem(control, worker, maps):
        return {"control": {"rss": control, "pss": control},
                "workers": [{"rss": worker, "pss": worker}] * 2,
                "bpf": {"memlock": maps}, "rss": control + 2 * worker,
                "pss": control + 2 * worker}
    got = scale.per_peer(mem(100, 10, 1000), mem(1100, 60, 3000), 10)
    assert got["control_rss"] == 100 and got["workers_rss"] == 10
    assert got["bpf_memlock"] == 200 and got["total_pss"] == 110 + 200


def test_parse_args_bounds_the_swarm_by_the_peers():
    opts, _ = scale.parse_args(["--peers", "40", "--trickle", "500"])
    assert (opts.trickle, opts.handshakes, opts.swarm) == (39, 39, 39)
    opts, _ = scale.parse_args(["--peers", "5000", "--trickle", "20"])
    assert (opts.trickle, opts.handshakes, opts.swarm) == (20, 1000, 1000)


# -- netns: a real run --------------------------------------------------------------------

PEERS, TRICKLE = 40, 20


@pytest.mark.netns
@pytest.mark.interop
@pytest.mark.wgebpf_only
@pytest.mark.timeout(120)
def test_scale_run_at_small_n(root, tmp_path):
    out = tmp_path / "scale.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "wgebpf.lab.scale", "--peers", str(PEERS), "--trickle",
         str(TRICKLE), "--seconds", "2", "--repeats", "1", "--churn-rounds", "3",
         "--json", str(out)], capture_output=True, text=True, timeout=110)
    elapsed = time.monotonic() - t0
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}, proc.stdout[-3000:]
    assert proc.returncode == 0
    assert elapsed < 60
    check_load_and_memory(report)
    check_handshakes_and_trickle(report)
    check_churn(report)


def check_load_and_memory(report: dict) -> None:
    assert report["load"]["peers"] == PEERS
    assert 0 < report["load"]["uapi_s"] <= report["load"]["all_peers_s"]
    mem = report["memory"]["n_idle"]
    assert mem["control"]["rss"] > 0 and len(mem["workers"]) >= 1
    assert mem["bpf"]["count"] > 0 and mem["bpf"]["memlock"] > 0
    assert "per_peer_n_idle" in report["memory"]
    show = report["show"]["after_handshakes"]
    # Every peer is one "peer:" block in wg show; the scrape has each peer's key.
    assert show["wg_show"]["bytes"] > PEERS * 50 and show["metrics"]["bytes"] > 0


def check_handshakes_and_trickle(report: dict) -> None:
    hs = report["handshakes"]
    assert hs["peers"] == PEERS - 1 and hs["completed"] == PEERS - 1
    assert hs["seen_by_wgebpf"] == PEERS - 1
    assert hs["completions_per_s"] > 0
    tr = report["trickle"]
    assert tr["trickling"] == TRICKLE
    assert tr["rx_grew"] == TRICKLE and tr["sink_sources"] == TRICKLE
    assert tr["rx_bytes_min"] > 0 and tr["sent_min_per_peer"] >= 1
    tp = report["throughput"]
    assert tp["median_off"] > 0 and tp["median_on"] > 0


def check_churn(report: dict) -> None:
    ch = report["churn"]
    assert ch["errors"] == [] and ch["peers_after"] == PEERS
    assert len(ch["add_s"]) == len(ch["remove_s"]) == 3
    assert ch["ping_answered"] > 10 and ch["ping_lost"] == 0
