"""`python -m wgebpf.lab.stages`: one quick run in namespaces; every stage
produces a positive figure, the JSON holds the expected rows, and the
namespaces are gone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wgebpf.lab import stages

SEND = ["sendto per datagram", "sendmsg UDP_SEGMENT x16", "sendmsg UDP_SEGMENT x32",
        "sendmsg UDP_SEGMENT x64"]
RECEIVE = ["recvfrom per datagram", "recvmsg_into + UDP_GRO, sender sendto",
           "recvmsg_into + UDP_GRO, sender UDP_SEGMENT x32"]
EXPECTED_ROWS = (
    [("TUN read", "os.read per packet"), ("TUN read", "os.readv into a preallocated buffer"),
     ("TSO split", "checksum of one segment in Python"),
     ("encrypt", "encrypt (allocating) + header bytes"),
     ("encrypt", "encrypt_into + pack_into (preallocated)")]
    + [("UDP send", v) for v in SEND] + [("UDP send", v + ", XDP") for v in SEND]
    + [("UDP receive", v) for v in RECEIVE] + [("UDP receive", v + ", XDP") for v in RECEIVE]
    + [("replay window", "would_accept + accept, in order"),
       ("decrypt", "decrypt (allocating) of message[16:]"),
       ("decrypt", "decrypt_into a preallocated buffer"),
       ("TCP GRO", "coalesce 44 segments of one flow"),
       ("TUN write", "os.write per packet (forwarded to a blackhole)"),
       ("channel", "send TimerEvents (pickle + send)"),
       ("channel", "receive TimerEvents (recv_fds + unpickle)")])


@pytest.mark.netns
@pytest.mark.timeout(120)
def test_stages_command_measures_every_stage(tmp_path, root):
    out = tmp_path / "stages.json"
    proc = subprocess.run([sys.executable, "-m", "wgebpf.lab.stages", "--packets", "200",
                           "--json", str(out)], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["stage"], r["variant"]) for r in rows] == EXPECTED_ROWS
    for stage in stages.STAGES:
        assert any((r["us_per_packet"] or 0) > 0 for r in rows if r["stage"] == stage), stage
    for r in rows:
        if r["error"]:
            # Only 64 segments of 1452 bytes may be refused (over 65507 bytes).
            assert "UDP_SEGMENT x64" in r["variant"] and "EMSGSIZE" in r["error"], r
            continue
        assert r["packets"] > 0 and r["us_per_packet"] > 0 and r["pps"] > 0, r
        assert r["gbps"] > 0, r
    segmented = [r for r in rows if "UDP_SEGMENT x32" in r["variant"]]
    assert all(r["packets_per_call"] and r["packets_per_call"] >= 1 for r in segmented), segmented
    assert "xdp" in result["observations"] and "native" in result["observations"]["xdp"]

    for stage in stages.STAGES:             # the printed table has every stage
        assert f"\n{stage} " in proc.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert result["namespaces"] and not any(name in listed for name in result["namespaces"])


def test_stages_refuses_bad_options():
    for argv in (["--packets", "0"], ["--size", "2000"], ["--size", "10"]):
        with pytest.raises(SystemExit):
            stages.parse_args(argv)


def test_ipv4_udp_packet_has_a_valid_header_checksum():
    packet = stages.ipv4_udp_packet("198.51.100.2", "203.0.113.9", 100)
    assert len(packet) == 100 and packet[0] == 0x45
    assert stages.ip_checksum(packet[:20]) == 0
