"""One peer served by every worker, checked on the wire against wireguard-go.

Issue 14's rules for a single peer over several workers, seen from outside
the process: what A (wgebpf, Workers = 2, PeerSpread = true) puts on the
wire, and what it accepts from B (wireguard-go).

  send     several flows to B leave through both workers: every data
           message's counter is new (none used twice, whichever worker
           sealed it), both workers' counter blocks appear, and how far a
           counter trails the highest one sent before it stays well inside
           the receiver's replay window (the figure is printed);
  receive  B's flows to A are opened by both workers (by counter run);
           every data message
           B sent, replayed afterwards (each twice, back to back so GRO
           merges them), is refused as a replay, though the copies of a
           counter may reach another worker than the original did.

Captures use AF_PACKET on the underlay veths, with UDP segmentation offload
off on A's side for the send test (so each datagram is seen alone; the
worker still sends GSO runs and the kernel splits them in software).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from wgebpf.lab import netns
from wgebpf.wireguard import counters
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE

pytestmark = pytest.mark.netns

SPREAD = {"Workers": "2", "PeerSpread": "true"}
FLOWS = 16
PACKETS_PER_FLOW = 250

# Run in a namespace: records the WireGuard data messages (type 4) that leave
# (direction "out") or arrive ("in") on one interface, as JSON lines of
# [receiver index, counter, hex payload or ""] in the file argv[5] (a pipe
# would fill and stall the capture), until killed or argv[4] seconds.
_CAPTURE = r"""
import json, select, socket, sys, time
ifname, direction, keep, seconds = sys.argv[1], sys.argv[2], sys.argv[3] == "keep", float(sys.argv[4])
out = open(sys.argv[5], "w", buffering=1)
wanted = socket.PACKET_OUTGOING if direction == "out" else socket.PACKET_HOST
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)            # SO_RCVBUFFORCE
s.bind((ifname, 0))
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    if not select.select([s], [], [], 0.2)[0]:
        continue
    data, (_, proto, pkttype, *_) = s.recvfrom(65536)
    if pkttype != wanted or proto != 0x0800 or data[9] != 17:
        continue
    udp = (data[0] & 15) * 4
    message = data[udp + 8:]
    if len(message) < 32 or message[:4] != b"\x04\x00\x00\x00":
        continue
    index = int.from_bytes(message[4:8], "little")
    counter = int.from_bytes(message[8:16], "little")
    out.write(json.dumps([index, counter, message.hex() if keep else ""]) + "\n")
"""

# Run in a namespace: FLOWS x PACKETS_PER_FLOW small UDP datagrams to argv[1],
# one source port per flow (so the flows hash to different workers), paced.
_FLOWS = r"""
import socket, sys, time
target, flows, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(flows)]
for n in range(count):
    for i, s in enumerate(socks):
        s.sendto(b"flow %d packet %d" % (i, n), (target, 9000 + i))
    time.sleep(0.002)
"""


class Capture:
    def __init__(self, ns: netns.Namespace, ifname: str, direction: str, path,
                 keep: bool = False, seconds: float = 30):
        self.path = path
        self.proc = ns.popen([sys.executable, "-c", _CAPTURE, ifname, direction,
                              "keep" if keep else "-", str(seconds), str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()

    def stop(self) -> list[tuple[int, int, bytes]]:
        time.sleep(0.5)                         # the last datagrams of a burst
        self.proc.kill()                        # our own child, by its Popen
        self.proc.communicate(timeout=10)
        rows = [json.loads(line) for line in self.path.read_text().splitlines()
                if line.endswith("]")]
        return [(index, counter, bytes.fromhex(payload)) for index, counter, payload in rows]


def workers_carrying(status: dict, slot: int) -> list[int]:
    return [w["worker"] for w in status["workers"]
            if int(w.get("packets_by_slot", {}).get(str(slot), 0) or
                   w.get("packets_by_slot", {}).get(slot, 0) or 0) > 0]


def trailing(counters_in_order: list[int]) -> int:
    """How far the furthest counter trails the highest one before it."""
    top, worst = -1, 0
    for counter in counters_in_order:
        if counter > top:
            top = counter
        else:
            worst = max(worst, top - counter)
    return worst


def test_one_peer_sends_through_every_worker_and_never_reuses_a_counter(make_pair, topo,
                                                                       tmp_path):
    a, b = make_pair(a_extra=SPREAD)
    topo.a.run(["ethtool", "-K", topo.underlay_a, "tx-udp-segmentation", "off"])
    capture = Capture(topo.a, topo.underlay_a, "out", tmp_path / "sent")
    topo.a.run([sys.executable, "-c", _FLOWS, netns.B_TUNNEL4, str(FLOWS),
                str(PACKETS_PER_FLOW)], timeout=60)
    seen = capture.stop()
    slot = a.status()["peers"][b.public_key]["slot"]

    assert sorted(workers_carrying(a.status(), slot)) == [1, 2], a.status()["workers"]
    by_index: dict[int, list[int]] = {}
    for index, counter, _ in seen:
        by_index.setdefault(index, []).append(counter)
    assert sum(len(c) for c in by_index.values()) >= FLOWS * PACKETS_PER_FLOW * 0.9, \
        f"captured {len(seen)} data messages"
    block = counters.block_size(2)
    for index, sent in by_index.items():
        assert len(sent) == len(set(sent)), f"index {index}: a counter was used twice"
    busiest = max(by_index.values(), key=len)
    assert {counter // block % 2 for counter in busiest} == {0, 1}, \
        "both workers' counter blocks should be on the wire"
    lag = max(trailing(sent) for sent in by_index.values())
    print(f"\nlargest distance behind the highest counter already sent: {lag} "
          f"(bound at take time {counters.DEFAULT_BOUND}, window {COUNTER_WINDOW_SIZE})")
    assert lag < COUNTER_WINDOW_SIZE


def test_one_peer_is_received_by_every_worker_and_no_replay_gets_through(make_pair, topo,
                                                                         tmp_path):
    a, b = make_pair(a_extra=SPREAD)
    capture = Capture(topo.b, topo.underlay_b, "out", tmp_path / "sent", keep=True)
    topo.b.run([sys.executable, "-c", _FLOWS, netns.A_TUNNEL4, str(FLOWS),
                str(PACKETS_PER_FLOW)], timeout=60)
    seen = capture.stop()
    assert len(seen) >= FLOWS * PACKETS_PER_FLOW * 0.9, f"captured {len(seen)}"
    key = b.public_key
    status = a.status()
    slot = status["peers"][key]["slot"]
    assert sorted(workers_carrying(status, slot)) == [1, 2], status["workers"]

    replays_before = status["drops"].get("replay", 0)
    received_before = status["peers"][key]["rx_packets"]
    replayed = [payload for _, _, payload in seen]
    topo.b.run([sys.executable, "-c", _REPLAY, netns.A_UNDERLAY4, str(netns.A_PORT)],
               input="\n".join(p.hex() for p in replayed), timeout=60)
    expected = 2 * len(replayed)
    netns.wait_until(lambda: a.status()["drops"].get("replay", 0) - replays_before >= expected,
                     10, 0.2)
    after = a.status()
    assert after["drops"].get("replay", 0) - replays_before == expected
    assert after["peers"][key]["rx_packets"] == received_before, \
        "a replayed data message was accepted"


# Run in B's namespace: every hex line on stdin is a data message B sent;
# send each twice, back to back, to A's listen port from a socket of our own.
_REPLAY = r"""
import socket, sys
target = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin.read().split():
    message = bytes.fromhex(line)
    s.sendto(message, target)
    s.sendto(message, target)
"""
