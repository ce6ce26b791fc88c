"""One peer's traffic over several workers, simulated: `python -m wgebpf.lab.spread`.

    python -m wgebpf.lab.spread [--senders 4] [--receivers 4] [--messages 200000]
                                [--duplicates 0.01] [--jitter 64] [--gro] [--json]

Drives the real pieces in one process, in a discrete event loop:
  - the sending side: W workers, each with a SendCounter
    (wgebpf/wireguard/counters.py) on one shared CounterHints row; each has
    its own speed (batches per turn, drawn at random) and idles for long
    stretches now and then. A turn takes a batch of 1..64 counters (a GSO
    burst) and puts those messages on the wire in order.
  - the network: each message is delayed by up to --jitter message slots
    (reordering), and a fraction --duplicates of the messages is sent again
    later (a replay, or a duplicate on the path), soon or much later.
  - receive steering: spread_position() from wgebpf/kernel/reuseport.py, the
    Python mirror of bpf/reuseport.c (tests/test_bpf_reuseport.py checks they
    agree), picks one of R receiving workers per message.
    With --gro, runs of consecutive arrivals (up to 64) are merged as the
    kernel's UDP GRO would, and reach the worker of the first of them; each
    worker then drops what it does not own (reuseport.owns()).
  - R replay windows (wgebpf/wireguard/replay.py), one per receiving worker.

Reports counters sent, duplicates injected and accepted (must be 0), the
reordering the receivers saw (how far behind the highest counter seen so far
a delivered counter was: max and percentiles, and how many fell beyond the
window), and each worker's load; then a model of one peer's throughput over
1..16 cores from per-packet costs measured here. Everything the model
assumes is printed with it.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import socket
import statistics
import sys
import time

from wgebpf.kernel.reuseport import owns, spread_position
from wgebpf.wireguard.counters import CounterHints, DEFAULT_BOUND, SendCounter, block_size
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE, ReplayWindow

GSO_MAX = 64
RECEIVER_INDEX = 0x2A17C0DE


# -- the simulation ------------------------------------------------------------------

class Sender:
    """One sending worker: its allocator, its speed, its idle spells."""

    def __init__(self, hints: CounterHints, worker: int, rng: random.Random,
                 block: int, bound: int):
        self.counter = SendCounter(hints, 0, worker, block=block, bound=bound)
        self.speed = rng.choice([0.2, 0.5, 1.0, 1.0, 2.0])   # share of turns it gets
        self.idle_until = 0
        self.sent = 0

    def batch(self, n: int) -> list[int]:
        """n counters (over as many takes as the block ends need)."""
        out = []
        while len(out) < n:
            first, count = self.counter.take(n - len(out))
            if not count:
                break
            out.extend(range(first, first + count))
        self.sent += len(out)
        return out


def send_side(args, rng: random.Random):
    """Yield (slot, counter) as the senders put messages on the wire."""
    hints = CounterHints.in_process(rows=1, workers=args.senders)
    block = args.block or block_size(args.senders, args.bound)
    senders = [Sender(hints, w, rng, block, args.bound) for w in range(args.senders)]
    slot = turn = 0
    top, behind = -1, 0
    weights = [s.speed for s in senders]
    while slot < args.messages:
        turn += 1                          # turns pass even when every sender idles
        s = senders[rng.choices(range(len(senders)), weights)[0]]
        if s.idle_until > turn:
            continue
        if rng.random() < 0.01:            # a long idle spell: many other batches go by
            s.idle_until = turn + rng.randrange(30, 600)
        for counter in s.batch(min(rng.randint(1, GSO_MAX), args.messages - slot)):
            behind = max(behind, top - counter)
            top = max(top, counter)
            yield slot, counter
            slot += 1
    senders_load = [s.sent for s in senders]
    send_side.result = {"block": block, "bound": args.bound, "sender_load": senders_load,
                        "sender_reordering_max": behind,
                        "skipped": max(hints.highest(0) - sum(senders_load), 0)}


def network(args, rng: random.Random, wire):
    """Messages in arrival order: jittered, some sent twice. Yields
    (counter, is_duplicate)."""
    pending: list[tuple[float, int, int, bool]] = []
    sequence = 0
    injected = 0
    for slot, counter in wire:
        heapq.heappush(pending, (slot + rng.random() * args.jitter, sequence, counter, False))
        sequence += 1
        if rng.random() < args.duplicates:
            later = rng.choice([1, 10, 1000, 100000])          # soon, or a replay much later
            heapq.heappush(pending, (slot + rng.random() * later, sequence, counter, True))
            sequence += 1
            injected += 1
        while pending and pending[0][0] <= slot:
            _, _, c, dup = heapq.heappop(pending)
            yield c, dup
    while pending:
        _, _, c, dup = heapq.heappop(pending)
        yield c, dup
    network.injected = injected


def gro_merge(rng: random.Random, arrivals, enabled: bool):
    """Groups of arrivals one socket receives together: singles, or runs of
    up to 64 merged by GRO (delivered where the first one is steered)."""
    if not enabled:
        for item in arrivals:
            yield [item]
        return
    group = []
    limit = rng.randint(1, GSO_MAX)
    for item in arrivals:
        group.append(item)
        if len(group) >= limit:
            yield group
            group, limit = [], rng.randint(1, GSO_MAX)
    if group:
        yield group


class Receivers:
    """R receiving workers, each with its own replay window."""

    def __init__(self, count: int, check_owner: bool):
        self.windows = [ReplayWindow() for _ in range(count)]
        self.load = [0] * count
        self.check_owner = check_owner
        self.top = -1
        self.behind: list[int] = []
        self.accepted: set[int] = set()
        self.stats = {"delivered": 0, "duplicates_rejected": 0, "duplicates_accepted": 0,
                      "beyond_window": 0, "foreign_dropped": 0}

    def receive(self, group) -> None:
        workers = len(self.windows)
        position = spread_position(group[0][0], RECEIVER_INDEX, workers)
        for counter, duplicate in group:
            self._one(position, counter, duplicate)

    def _one(self, position: int, counter: int, duplicate: bool) -> None:
        workers = len(self.windows)
        self.load[position - 1] += 1
        if self.check_owner and not owns(position, counter, RECEIVER_INDEX, workers):
            self.stats["foreign_dropped"] += 1
            return
        window = self.windows[position - 1]
        if window.would_accept(counter) and window.accept(counter):
            self._accepted(counter, duplicate)
        elif duplicate or counter in self.accepted:
            self.stats["duplicates_rejected"] += 1
        else:
            self.stats["beyond_window"] += 1

    def _accepted(self, counter: int, duplicate: bool) -> None:
        if counter in self.accepted:
            self.stats["duplicates_accepted"] += 1
            return
        self.accepted.add(counter)
        self.stats["delivered"] += 1
        self.behind.append(max(self.top - counter, 0))
        self.top = max(self.top, counter)


def percentile(values: list[int], p: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def simulate(args) -> dict:
    rng = random.Random(args.seed)
    receivers = Receivers(args.receivers, check_owner=not args.no_owner_check)
    arrivals = network(args, rng, send_side(args, rng))
    for group in gro_merge(rng, arrivals, args.gro):
        receivers.receive(group)
    behind = receivers.behind
    return {
        "senders": args.senders, "receivers": args.receivers, "gro": args.gro,
        "owner_check": not args.no_owner_check, **send_side.result,
        "counters_sent": sum(send_side.result["sender_load"]),
        "duplicates_injected": network.injected,
        **receivers.stats,
        "reordering": {"max": max(behind, default=0), "p50": percentile(behind, 50),
                       "p99": percentile(behind, 99), "p99.9": percentile(behind, 99.9),
                       "window": COUNTER_WINDOW_SIZE},
        "receiver_load": receivers.load,
    }


# -- the scaling model ----------------------------------------------------------------

def measure_costs(size: int = 1420, rounds: int = 3000) -> dict:
    """Seconds per packet, measured here: ChaCha20-Poly1305 seal and open of
    a `size`-byte packet (with Python's call overhead, which a wgebpf worker
    pays too), and one UDP sendto + recv over loopback (the kernel's share)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    aead = ChaCha20Poly1305(os.urandom(32))
    plain = os.urandom(size)
    nonces = [bytes(4) + i.to_bytes(8, "little") for i in range(rounds)]
    start = time.perf_counter()
    sealed = [aead.encrypt(n, plain, None) for n in nonces]
    seal = (time.perf_counter() - start) / rounds
    start = time.perf_counter()
    for n, s in zip(nonces, sealed):
        aead.decrypt(n, s, None)
    opened = (time.perf_counter() - start) / rounds
    return {"size": size, "c_seal": seal, "c_open": opened, "c_udp": _udp_cost(size + 32)}


def _udp_cost(size: int, rounds: int = 3000) -> float:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        target, payload = rx.getsockname(), os.urandom(size)
        start = time.perf_counter()
        for i in range(rounds):
            tx.sendto(payload, target)
            if i % 64 == 63:
                for _ in range(64):
                    rx.recv(65536)
        return (time.perf_counter() - start) / rounds
    finally:
        rx.close()
        tx.close()


def scaling(costs: dict, cores_max: int = 16) -> list[dict]:
    """Packets/s of one peer, one direction, with n workers on n cores.

    Per worker (parallel): TUN read or write and the UDP syscall, counted as
    one c_udp each, plus seal (sender) or open (receiver). Serial (one core
    whatever n): the kernel's softirq receive of the peer's single UDP
    4-tuple, assumed to be half of c_udp (RSS hashes one 4-tuple to one
    queue and CPU; the reuseport program and GRO run there). The sender's
    serial part is per flow: one inner flow hashes to one worker."""
    serial_rx = costs["c_udp"] / 2
    rows = []
    for n in range(1, cores_max + 1):
        tx_rate = n / (costs["c_seal"] + 2 * costs["c_udp"])
        rx_rate = min(n / (costs["c_open"] + 2 * costs["c_udp"]), 1 / serial_rx)
        rate = min(tx_rate, rx_rate)
        rows.append({"cores": n, "tx_pps": tx_rate, "rx_pps": rx_rate, "pps": rate,
                     "gbit": rate * costs["size"] * 8 / 1e9})
    return rows


ASSUMPTIONS = [
    "workers = cores, one worker per core, nothing else running on them",
    "a worker's per-packet cost = seal or open + one TUN and one UDP system call (each "
    "c_udp, measured as a loopback sendto+recv: an overestimate of one call, no batching, no GSO/GRO)",
    "serial per peer: the kernel's receive softirq for the peer's one UDP 4-tuple (RSS puts it "
    "on one CPU), assumed c_udp/2; handshakes and the shared hints (one cache line read per "
    "batch) are ignored",
    "one inner flow stays on one sending worker (flow hash): these rates need many flows",
    "receive spreading reorders one inner flow across receiving workers at 128-counter run "
    "boundaries; TCP's reaction to that is not modelled",
    f"only {os.cpu_count()} cores here: rows above that are extrapolation, not measurement",
]


# -- output ---------------------------------------------------------------------------------

def table(result: dict, costs: dict | None, model: list[dict] | None) -> str:
    r = result["reordering"]
    lines = [
        f"senders {result['senders']}  receivers {result['receivers']}  block {result['block']}"
        f"  bound {result['bound']}  gro {'on' if result['gro'] else 'off'}"
        f"  owner check {'on' if result['owner_check'] else 'off'}",
        f"counters sent        {result['counters_sent']:>10}   (skipped {result['skipped']})",
        f"delivered            {result['delivered']:>10}",
        f"duplicates injected  {result['duplicates_injected']:>10}",
        f"duplicates rejected  {result['duplicates_rejected']:>10}",
        f"duplicates ACCEPTED  {result['duplicates_accepted']:>10}",
        f"beyond the window    {result['beyond_window']:>10}",
        f"foreign (GRO) drops  {result['foreign_dropped']:>10}",
        f"sender reordering    {result['sender_reordering_max']:>10}   (max, in send order;"
        f" must stay below the bound, {result['bound']})",
        f"receiver reordering: max {r['max']}  p50 {r['p50']}  p99 {r['p99']}"
        f"  p99.9 {r['p99.9']}  (behind the highest seen; window {r['window']})",
        "sender load          " + " ".join(f"{n:>8}" for n in result["sender_load"]),
        "receiver load        " + " ".join(f"{n:>8}" for n in result["receiver_load"]),
    ]
    if costs:
        lines += ["", f"measured per {costs['size']}-byte packet: seal {costs['c_seal'] * 1e6:.2f} us,"
                  f" open {costs['c_open'] * 1e6:.2f} us, UDP sendto+recv {costs['c_udp'] * 1e6:.2f} us",
                  f"{'cores':>5} {'tx kpps':>9} {'rx kpps':>9} {'peer kpps':>10} {'Gbit/s':>7} {'speedup':>8}"]
        base = model[0]["pps"]
        for row in model:
            lines.append(f"{row['cores']:>5} {row['tx_pps'] / 1e3:>9.0f} {row['rx_pps'] / 1e3:>9.0f}"
                         f" {row['pps'] / 1e3:>10.0f} {row['gbit']:>7.2f} {row['pps'] / base:>8.2f}")
        lines += ["assumptions:"] + [f"  - {a}" for a in ASSUMPTIONS]
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m wgebpf.lab.spread", description=__doc__.split("\n")[0])
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--receivers", type=int, default=4)
    p.add_argument("--messages", type=int, default=200000)
    p.add_argument("--block", type=int, default=0, help="0: block_size(senders, bound)")
    p.add_argument("--bound", type=int, default=DEFAULT_BOUND)
    p.add_argument("--jitter", type=int, default=64, help="network reordering, in message slots")
    p.add_argument("--duplicates", type=float, default=0.01)
    p.add_argument("--gro", action="store_true", help="merge arrivals as UDP GRO would")
    p.add_argument("--no-owner-check", action="store_true",
                   help="record foreign counters too (shows why owns() is needed with --gro)")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    result = simulate(args)
    costs = model = None
    if not args.no_model:
        costs = measure_costs()
        model = scaling(costs)
        result["model"] = {"costs": costs, "rows": model, "assumptions": ASSUMPTIONS}
    print(json.dumps(result, indent=1) if args.json else table(result, costs, model))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
