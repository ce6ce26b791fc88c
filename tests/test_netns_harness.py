"""The namespace harness itself, proven with wireguard-go on both hosts.

If these fail, the interop tests' failures say nothing about wgebpf.
"""

import os
import subprocess

import pytest

from wgebpf.lab import netns
from wgebpf.lab.netns import (A_TUNNEL4, A_TUNNEL6, B_TUNNEL4, B_TUNNEL6,
                          InterfaceConfig, PeerConfig, parse_dump)

# -- Unit: no root needed ------------------------------------------------------

DUMP = (
    "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\n"
    "cGVlcjE=\t(none)\t192.0.2.2:51821\t198.51.100.2/32,2001:db8:100::2/128"
    "\t1700000000\t1024\t2048\toff\n"
    "cGVlcjI=\tcHNr\t(none)\t(none)\t0\t0\t0\t25\n"
)


@pytest.mark.parametrize("key, field, expected", [
    ("cGVlcjE=", "endpoint", "192.0.2.2:51821"),
    ("cGVlcjE=", "allowed_ips", ["198.51.100.2/32", "2001:db8:100::2/128"]),
    ("cGVlcjE=", "latest_handshake", 1700000000),
    ("cGVlcjE=", "rx_bytes", 1024),
    ("cGVlcjE=", "tx_bytes", 2048),
    ("cGVlcjE=", "preshared_key", None),
    ("cGVlcjE=", "persistent_keepalive", None),
    ("cGVlcjI=", "endpoint", None),
    ("cGVlcjI=", "allowed_ips", []),
    ("cGVlcjI=", "preshared_key", "cHNr"),
    ("cGVlcjI=", "persistent_keepalive", 25),
])
def test_parse_dump_peers(key, field, expected):
    assert getattr(parse_dump(DUMP).peers[key], field) == expected


def test_parse_dump_interface():
    dump = parse_dump(DUMP)
    assert (dump.private_key, dump.public_key, dump.listen_port, dump.fwmark) == \
        ("cHJpdmF0ZQ==", "cHVibGlj", 51820, None)
    assert parse_dump("a\tb\t1\t0x10\n").fwmark == 16


def test_config_rendering_splits_wg_quick_from_setconf():
    cfg = InterfaceConfig("PRIV", 51820, ["198.51.100.1/24"], mtu=1400,
                          extra={"PeerSelection": "nexthop"},
                          peers=[PeerConfig("PUB", ["198.51.100.2/32"], "192.0.2.2:1",
                                            "PSK", 25, {"SourcePolicy": "off"})])
    quick, setconf = cfg.to_wg_quick(), cfg.to_setconf()
    for line in ("Address = 198.51.100.1/24", "MTU = 1400", "PeerSelection = nexthop",
                 "SourcePolicy = off"):
        assert line in quick and line not in setconf
    for line in ("PrivateKey = PRIV", "ListenPort = 51820", "PublicKey = PUB",
                 "PresharedKey = PSK", "Endpoint = 192.0.2.2:1",
                 "AllowedIPs = 198.51.100.2/32", "PersistentKeepalive = 25"):
        assert line in quick and line in setconf
    assert "PRIV" not in cfg.to_wg_quick(hide_keys=True)


def test_unique_ifnames_fit_ifnamsiz():
    names = {netns.unique_ifname("wgb") for _ in range(200)}
    assert len(names) == 200 and all(len(n) <= 15 for n in names)


# -- netns: wireguard-go <-> wireguard-go --------------------------------------

@pytest.mark.netns
@pytest.mark.interop
def test_ping_both_ways_v4_v6(topo):
    a, b = netns.make_pair(topo, "wireguard-go", "wireguard-go")
    for src, dst in ((topo.a, B_TUNNEL4), (topo.b, A_TUNNEL4),
                     (topo.a, B_TUNNEL6), (topo.b, A_TUNNEL6)):
        assert netns.ping(src, dst, count=3, timeout=10), f"{src.name} -> {dst}"
    assert a.peer(b.public_key).latest_handshake > 0


@pytest.mark.netns
@pytest.mark.interop
def test_iperf3_both_ways(topo):
    netns.make_pair(topo, "wireguard-go", "wireguard-go")
    assert netns.iperf3(topo.a, topo.b, B_TUNNEL4, 2) > 0
    assert netns.iperf3(topo.b, topo.a, A_TUNNEL6, 2) > 0


@pytest.mark.netns
@pytest.mark.interop
def test_capture_sees_the_handshake(topo):
    netns.make_pair(topo, "wireguard-go", "wireguard-go", endpoints="a")
    with netns.Capture(topo.b, topo.underlay_b) as cap:
        assert netns.ping(topo.a, B_TUNNEL4, count=1, timeout=10)
    kinds = [(p.src, p.wg_type, len(p.payload)) for p in cap.packets]
    assert kinds[0] == (netns.A_UNDERLAY4, 1, 148)
    assert kinds[1] == (netns.B_UNDERLAY4, 2, 92)


@pytest.mark.netns
@pytest.mark.interop
def test_host_behind_b_is_routed(topo, host_c):
    assert netns.ping(topo.a, netns.BC_C4, count=1, timeout=5)
    assert netns.ping(host_c, netns.A_UNDERLAY6, count=1, timeout=5)


@pytest.mark.netns
@pytest.mark.interop
def test_close_removes_everything(root):
    with netns.TwoHosts() as topo:
        a, b = netns.make_pair(topo, "wireguard-go", "wireguard-go")
        names = [topo.a.name, topo.b.name]
        sockets, pids = [a.socket_path, b.socket_path], [a.pid, b.pid]
        assert all(s.exists() for s in sockets)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    assert not any(s.exists() for s in sockets)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
