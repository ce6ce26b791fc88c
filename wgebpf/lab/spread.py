"""One peer's traffic over several workers, simulated: `python -m wgebpf.lab.spread`.

    python -m wgebpf.lab.spread [--senders 4] [--receivers 4] [--messages 200000]
                                [--duplicates 0.01] [--jitter 64] [--no-gro]
                                [--per-worker-windows [--no-owner-check]]
                                [--no-compare] [--no-sweep] [--no-model] [--json]

Why the receiving workers share one replay window per session: receive
steering (bpf/reuseport.c) picks a worker per data message by its counter's
run of 128, but with UDP GRO the kernel merges a burst of datagrams of the
peer's one 4-tuple before the reuseport program runs, and the merged burst
reaches the worker of its FIRST message. So the copies of one counter (a
replay, a duplicate on the path) can reach different workers, and with one
window per worker each of them accepts its copy. The owner check that went
with per-worker windows (reuseport.owns: drop what steering would not have
sent here) stops that, but drops every genuine message a merged burst
carried across a run boundary. Commit 467f6ce chose one window per session
that every worker checks (wireguard/replay.py, SharedReplayWindows: a memfd
row, a POSIX record lock per row), recorded once per burst under the lock
(dataplane/batch.py, ReceiveBatch._settle). The default run models that
design, and puts the two per-worker designs beside it on the same traffic.

What is real code here (run in one process, in a discrete event loop):
  - the senders' counters: W SendCounter (wireguard/counters.py) on one
    CounterHints row;
  - steering: spread_position() of wgebpf/kernel/reuseport.py, the Python
    mirror of bpf/reuseport.c (tests/test_bpf_reuseport.py checks they
    agree), run number Fibonacci-mixed;
  - the windows: one SharedReplayWindows row (created in-process with
    SharedReplayWindows.create, its real record lock taken once per burst),
    or ReplayWindow per worker with --per-worker-windows.

What is modelled, and assumed:
  - senders: each has its own speed (a share of the turns, drawn at random)
    and idles for long stretches now and then; a turn takes a batch of
    1..64 counters (a GSO burst) and puts them on the wire in order;
  - the network delays each message by up to --jitter message slots and
    sends a fraction --duplicates again, soon or much later;
  - GRO (on by default; --no-gro): runs of consecutive arrivals, 1..64
    drawn uniformly, are merged whatever their counters and reach the
    worker of the first; without GRO each message is steered alone;
  - concurrency of the shared design: a worker checks a burst against the
    window without the lock (would_accept, before decryption, as receive.py
    does), opens it, and records it under the lock later. Up to R bursts are
    in flight (one per worker) and they are settled in arrival order; a
    worker settles its burst before it takes its next one. So a duplicate
    can pass the unlocked check while its twin is in flight, and only the
    locked accept refuses it ("caught under the lock").

Reports: counters sent, messages dropped (sent but never delivered, which
excludes injected duplicates), duplicates injected, accepted (must be 0)
and rejected, the reordering seen at delivery (how far behind the highest
counter delivered so far a delivered counter was), each receiving worker's
load, and how many receivers each sender's counters are steered to. Then
the load over W = 2, 4, 8 workers, and a model of one peer's throughput
over 1..16 cores whose per-packet costs are measured in the run (AEAD,
UDP, counter take, window check and accept, the row lock) and whose other
assumptions are printed with it.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from wgebpf.kernel.bpfmaps import RX_SPREAD_SHIFT
from wgebpf.kernel.reuseport import owns, spread_position
from wgebpf.wireguard.counters import CounterHints, DEFAULT_BOUND, SendCounter, block_size
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE, ReplayWindow, SharedReplayWindows

GSO_MAX = 64
RECEIVER_INDEX = 0x2A17C0DE
SWEEP_WORKERS = (2, 4, 8)
SWEEP_MESSAGES = 50000

DESIGNS = {
    "shared": "shared window (the design)",
    "per-worker": "per-worker windows",
    "per-worker+owner": "per-worker + owner check",
}


def plain_position(counter: int, receiver_index: int, workers: int) -> int:
    """The steering formula before 467f6ce (run number not mixed), only to
    show what the mixing changed: a sending worker's blocks k % W == w then
    map to few receivers."""
    return 1 + ((counter >> RX_SPREAD_SHIFT) + receiver_index) % workers


# -- the traffic: senders, network, GRO --------------------------------------------------

class Sender:
    """One sending worker: its allocator, its speed, its idle spells, and
    the receivers its counters are steered to."""

    def __init__(self, hints: CounterHints, worker: int, rng: random.Random,
                 block: int, bound: int, receivers: int):
        self.counter = SendCounter(hints, 0, worker, block=block, bound=bound)
        self.speed = rng.choice([0.2, 0.5, 1.0, 1.0, 2.0])   # share of turns it gets
        self.idle_until = 0
        self.sent = self.takes = 0
        self.receivers = receivers
        self.reach: set[int] = set()
        self.plain_reach: set[int] = set()

    def batch(self, n: int) -> list[int]:
        """n counters (over as many takes as the block ends need)."""
        out: list[int] = []
        while len(out) < n:
            first, count = self.counter.take(n - len(out))
            self.takes += 1
            if not count:
                break
            self._steered(first, count)
            out.extend(range(first, first + count))
        self.sent += len(out)
        return out

    def _steered(self, first: int, count: int) -> None:
        # Steering is per run of 128, so one position per run is enough.
        for run in range(first >> RX_SPREAD_SHIFT, ((first + count - 1) >> RX_SPREAD_SHIFT) + 1):
            self.reach.add(spread_position(run << RX_SPREAD_SHIFT, RECEIVER_INDEX, self.receivers))
            self.plain_reach.add(plain_position(run << RX_SPREAD_SHIFT, RECEIVER_INDEX,
                                                self.receivers))


class SendSide:
    """W senders sharing one hints row, taking turns at random."""

    def __init__(self, args, rng: random.Random):
        self.args, self.rng = args, rng
        self.hints = CounterHints.in_process(rows=1, workers=args.senders)
        self.block = args.block or block_size(args.senders, args.bound)
        self.senders = [Sender(self.hints, w, rng, self.block, args.bound, args.receivers)
                        for w in range(args.senders)]
        self.behind = 0

    def wire(self):
        """Yield (slot, counter) as the senders put messages on the wire."""
        args, rng, senders = self.args, self.rng, self.senders
        weights = [s.speed for s in senders]
        slot = turn = 0
        top = -1
        while slot < args.messages:
            turn += 1                      # turns pass even when every sender idles
            s = senders[rng.choices(range(len(senders)), weights)[0]]
            if s.idle_until > turn:
                continue
            if rng.random() < 0.01:        # a long idle spell: many other batches go by
                s.idle_until = turn + rng.randrange(30, 600)
            for counter in s.batch(min(rng.randint(1, GSO_MAX), args.messages - slot)):
                self.behind = max(self.behind, top - counter)
                top = max(top, counter)
                yield slot, counter
                slot += 1

    def result(self) -> dict:
        load = [s.sent for s in self.senders]
        return {"block": self.block, "bound": self.args.bound, "sender_load": load,
                "sender_reordering_max": self.behind,
                "skipped": max(self.hints.highest(0) - sum(load), 0),
                "sender_reach": [len(s.reach) for s in self.senders],
                "sender_reach_plain": [len(s.plain_reach) for s in self.senders],
                "send_batch_mean": sum(load) / max(sum(s.takes for s in self.senders), 1)}


class Network:
    """Jitter and duplicates: messages in arrival order."""

    def __init__(self, args, rng: random.Random):
        self.jitter, self.duplicates, self.rng = args.jitter, args.duplicates, rng
        self.injected = 0

    def arrivals(self, wire):
        """Yield (counter, is_duplicate) in arrival order."""
        pending: list[tuple[float, int, int, bool]] = []
        sequence = 0
        for slot, counter in wire:
            sequence = self._send(pending, sequence, slot, counter)
            while pending and pending[0][0] <= slot:
                yield heapq.heappop(pending)[2:]
        while pending:
            yield heapq.heappop(pending)[2:]

    def _send(self, pending: list, sequence: int, slot: int, counter: int) -> int:
        rng = self.rng
        heapq.heappush(pending, (slot + rng.random() * self.jitter, sequence, counter, False))
        sequence += 1
        if rng.random() < self.duplicates:
            later = rng.choice([1, 10, 1000, 100000])          # soon, or a replay much later
            heapq.heappush(pending, (slot + rng.random() * later, sequence, counter, True))
            sequence += 1
            self.injected += 1
        return sequence


def gro_merge(rng: random.Random, arrivals, enabled: bool):
    """What each recvmsg returns: single messages, or runs of up to 64
    consecutive arrivals merged by GRO whatever their counters."""
    if not enabled:
        for item in arrivals:
            yield [item]
        return
    group: list = []
    limit = rng.randint(1, GSO_MAX)
    for item in arrivals:
        group.append(item)
        if len(group) >= limit:
            yield group
            group, limit = [], rng.randint(1, GSO_MAX)
    if group:
        yield group


@dataclass
class Traffic:
    """One run's arrivals, grouped as the receiving sockets get them; the
    same traffic is fed to every receiving design."""
    groups: list[list[tuple[int, bool]]]
    sent: int
    injected: int
    send: dict = field(default_factory=dict)

    @property
    def burst_mean(self) -> float:
        return (self.sent + self.injected) / max(len(self.groups), 1)


def make_traffic(args) -> Traffic:
    rng = random.Random(args.seed)
    send, network = SendSide(args, rng), Network(args, rng)
    groups = list(gro_merge(rng, network.arrivals(send.wire()), args.gro))
    result = send.result()
    return Traffic(groups, sum(result["sender_load"]), network.injected, result)


# -- the receiving side ---------------------------------------------------------------

class Delivery:
    """What the receiving workers together delivered; the rule under test is
    "each counter at most once, and every message that arrived"."""

    def __init__(self, workers: int):
        self.load = [0] * workers
        self.bursts = [0] * workers
        self.delivered: set[int] = set()
        self.top = -1
        self.behind: list[int] = []
        self.stats = {"duplicates_accepted": 0, "duplicates_rejected": 0,
                      "beyond_window": 0, "foreign_dropped": 0}

    def burst(self, position: int, size: int) -> None:
        self.load[position - 1] += size
        self.bursts[position - 1] += 1

    def accepted(self, counter: int) -> None:
        if counter in self.delivered:
            self.stats["duplicates_accepted"] += 1
            return
        self.delivered.add(counter)
        self.behind.append(max(self.top - counter, 0))
        self.top = max(self.top, counter)

    def rejected(self, counter: int) -> None:
        # A copy of a delivered counter is a replay rightly refused; anything
        # else a window refused fell behind it.
        key = "duplicates_rejected" if counter in self.delivered else "beyond_window"
        self.stats[key] += 1

    def foreign(self) -> None:
        self.stats["foreign_dropped"] += 1


class SharedWindow:
    """The design: one SharedReplayWindow for the session, checked without
    the lock before decryption, recorded under the lock once per burst."""

    def __init__(self, workers: int):
        self.workers = workers
        self.delivery = Delivery(workers)
        self.region = SharedReplayWindows.create(1, "wgebpf-lab-spread")
        self.window = self.region.window(0)
        self.in_flight: deque[tuple[int, list[int]]] = deque()   # (position, opened)
        self.locks = self.caught = 0

    def burst(self, position: int, group: list) -> None:
        # A worker finishes its previous burst before its next recvmsg, and
        # at most one burst per worker is in flight; settle in arrival order.
        while self.in_flight and (len(self.in_flight) >= self.workers
                                  or any(p == position for p, _ in self.in_flight)):
            self._settle(self.in_flight.popleft()[1])
        opened = []
        for counter, _ in group:
            if self.window.would_accept(counter):      # the unlocked pre-check
                opened.append(counter)
            else:
                self.delivery.rejected(counter)
        if opened:
            self.in_flight.append((position, opened))

    def _settle(self, opened: list[int]) -> None:
        window = self.window
        with window.locked():                           # batch.ReceiveBatch._settle
            verdicts = [window.accept(counter) for counter in opened]
        self.locks += 1
        for counter, ok in zip(opened, verdicts):
            if ok:
                self.delivery.accepted(counter)
            else:
                self.caught += 1                        # passed the pre-check: a twin was in flight
                self.delivery.rejected(counter)

    def finish(self) -> dict:
        while self.in_flight:
            self._settle(self.in_flight.popleft()[1])
        self.window = None                  # it holds a view of the mapping
        self.region.close()
        return {"locks": self.locks, "caught_under_lock": self.caught}


class PerWorkerWindows:
    """The earlier design: one ReplayWindow per worker, optionally dropping
    what steering would not have sent to this worker (reuseport.owns)."""

    def __init__(self, workers: int, owner_check: bool):
        self.workers, self.owner_check = workers, owner_check
        self.delivery = Delivery(workers)
        self.windows = [ReplayWindow() for _ in range(workers)]

    def burst(self, position: int, group: list) -> None:
        window, delivery = self.windows[position - 1], self.delivery
        for counter, _ in group:
            if self.owner_check and not owns(position, counter, RECEIVER_INDEX, self.workers):
                delivery.foreign()
            elif window.accept(counter):    # private window: nothing to defer
                delivery.accepted(counter)
            else:
                delivery.rejected(counter)

    def finish(self) -> dict:
        return {"locks": 0, "caught_under_lock": 0}


def make_design(name: str, workers: int):
    if name == "shared":
        return SharedWindow(workers)
    return PerWorkerWindows(workers, owner_check=name == "per-worker+owner")


def receive(traffic: Traffic, design: str, workers: int) -> dict:
    """Steer each burst by its first message and let `design` take it."""
    model = make_design(design, workers)
    for group in traffic.groups:
        position = spread_position(group[0][0], RECEIVER_INDEX, workers)
        model.delivery.burst(position, len(group))
        model.burst(position, group)
    extra = model.finish()
    d = model.delivery
    return {"design": design, "delivered": len(d.delivered),
            "messages_dropped": traffic.sent - len(d.delivered), **d.stats, **extra,
            "reordering": reordering(d.behind),
            "receiver_load": d.load, "receiver_bursts": d.bursts}


def reordering(behind: list[int]) -> dict:
    ordered = sorted(behind)

    def at(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0

    return {"max": ordered[-1] if ordered else 0, "p50": at(50), "p99": at(99),
            "p99.9": at(99.9), "window": COUNTER_WINDOW_SIZE}


def design_of(args) -> str:
    if not args.per_worker_windows:
        return "shared"
    return "per-worker" if args.no_owner_check else "per-worker+owner"


def simulate(args) -> dict:
    traffic = make_traffic(args)
    design = design_of(args)
    result = {"senders": args.senders, "receivers": args.receivers, "gro": args.gro,
              "owner_check": design == "per-worker+owner", **traffic.send,
              "counters_sent": traffic.sent, "duplicates_injected": traffic.injected,
              "recv_burst_mean": traffic.burst_mean,
              **receive(traffic, design, args.receivers)}
    if not args.no_compare:
        result["compare"] = {name: receive(traffic, name, args.receivers) for name in DESIGNS}
    return result


def sweep(args) -> list[dict]:
    """The shared design with senders = receivers = W: does every receiver
    get load, and does every sender reach every receiver?"""
    rows = []
    for workers in SWEEP_WORKERS:
        sub = argparse.Namespace(**{**vars(args), "senders": workers, "receivers": workers,
                                    "messages": min(args.messages, SWEEP_MESSAGES), "block": 0})
        traffic = make_traffic(sub)
        got = receive(traffic, "shared", workers)
        rows.append({"workers": workers, "receiver_load": got["receiver_load"],
                     "duplicates_accepted": got["duplicates_accepted"],
                     "messages_dropped": got["messages_dropped"],
                     "sender_reach": traffic.send["sender_reach"],
                     "sender_reach_plain": traffic.send["sender_reach_plain"]})
    return rows


# -- the scaling model ----------------------------------------------------------------

def _per_call(fn, rounds: int) -> float:
    start = time.perf_counter()
    for i in range(rounds):
        fn(i)
    return (time.perf_counter() - start) / rounds


def aead_costs(size: int, rounds: int = 3000) -> tuple[float, float]:
    """ChaCha20-Poly1305 seal and open of a `size`-byte packet, with
    Python's call overhead (a wgebpf worker pays it too)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    aead = ChaCha20Poly1305(os.urandom(32))
    plain = os.urandom(size)
    nonces = [bytes(4) + i.to_bytes(8, "little") for i in range(rounds)]
    sealed = [b""] * rounds

    def seal(i):
        sealed[i] = aead.encrypt(nonces[i], plain, None)

    c_seal = _per_call(seal, rounds)
    c_open = _per_call(lambda i: aead.decrypt(nonces[i], sealed[i], None), rounds)
    return c_seal, c_open


def udp_cost(size: int, rounds: int = 3000) -> float:
    """One UDP sendto + recv over loopback, per datagram."""
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


def take_cost(batch: int = 32, rounds: int = 20000) -> float:
    """One SendCounter.take of `batch` counters (4 workers' hints)."""
    counter = SendCounter(CounterHints.in_process(rows=1, workers=4), 0, 0)
    return _per_call(lambda i: counter.take(batch), rounds)


def window_costs(rounds: int = 20000) -> dict:
    """On a real SharedReplayWindows row: the unlocked check, one accept,
    and one lock + unlock of the row's record lock (uncontended)."""
    region = SharedReplayWindows.create(1, "wgebpf-lab-spread-cost")
    window = region.window(0)
    try:
        def lock_unlock(i):
            with window.locked():
                pass

        return {"c_would": _per_call(window.would_accept, rounds),
                "c_accept": _per_call(window.accept, rounds),
                "c_lock": _per_call(lock_unlock, rounds)}
    finally:
        window = None                       # it holds a view of the mapping
        region.close()


def measure_costs(size: int = 1420) -> dict:
    """Seconds per operation, measured here and now."""
    c_seal, c_open = aead_costs(size)
    return {"size": size, "c_seal": c_seal, "c_open": c_open, "c_udp": udp_cost(size + 32),
            "c_take": take_cost(), **window_costs()}


def per_packet(costs: dict, tx_batch: float, rx_burst: float) -> dict:
    """Per-packet costs of one worker (parallel) and of what one peer
    serialises (whatever the number of workers)."""
    return {
        "tx_worker": costs["c_seal"] + 2 * costs["c_udp"] + costs["c_take"] / tx_batch,
        "rx_worker": (costs["c_open"] + 2 * costs["c_udp"] + costs["c_would"]
                      + costs["c_accept"] + costs["c_lock"] / rx_burst),
        "rx_softirq": costs["c_udp"] / 2,
        "rx_lock_hold": (costs["c_lock"] + rx_burst * costs["c_accept"]) / rx_burst,
    }


def scaling(costs: dict, tx_batch: float, rx_burst: float, cores_max: int = 16) -> list[dict]:
    """Packets/s of one peer, one direction, with n workers on n cores:
    the receive rate is capped by the peer's serial parts, each a separate
    resource (the softirq CPU, the row lock)."""
    p = per_packet(costs, tx_batch, rx_burst)
    caps = {"softirq": 1 / p["rx_softirq"], "lock": 1 / p["rx_lock_hold"]}
    rows = []
    for n in range(1, cores_max + 1):
        tx_rate = n / p["tx_worker"]
        limits = {"workers": n / p["rx_worker"], **caps}
        bound = min(limits, key=limits.get)
        rate = min(tx_rate, limits[bound])
        rows.append({"cores": n, "tx_pps": tx_rate, "rx_pps": limits[bound], "rx_limit": bound,
                     "pps": rate, "gbit": rate * costs["size"] * 8 / 1e9})
    return rows


def assumptions(costs: dict, tx_batch: float, rx_burst: float) -> list[str]:
    us = {k: v * 1e6 for k, v in costs.items() if k.startswith("c_")}
    return [
        "workers = cores, one worker per core, nothing else running on them",
        f"send, per packet and worker: seal ({us['c_seal']:.2f} us) + one TUN and one UDP system "
        f"call, each counted as a loopback sendto+recv ({us['c_udp']:.2f} us: an overestimate, no "
        f"GSO/GRO batching of system calls) + one SendCounter.take ({us['c_take']:.2f} us) per "
        f"batch of {tx_batch:.1f} (the simulation's mean)",
        f"receive, per packet and worker: open ({us['c_open']:.2f} us) + the same two system calls "
        f"+ the unlocked would_accept ({us['c_would']:.2f} us) + accept ({us['c_accept']:.2f} us) "
        f"+ one lock+unlock of the row ({us['c_lock']:.2f} us, fcntl record lock, uncontended) "
        f"per burst of {rx_burst:.1f} (the simulation's mean GRO burst; without GRO, 1)",
        f"serial per peer (1): the kernel's receive softirq for the peer's one UDP 4-tuple (RSS "
        f"puts it on one CPU; GRO and the reuseport program run there), ASSUMED c_udp/2 = "
        f"{us['c_udp'] / 2:.2f} us a packet, not measured",
        f"serial per peer (2): the row lock's hold, counted whole: lock+unlock + burst x accept "
        f"= {(us['c_lock'] + rx_burst * us['c_accept']) / rx_burst:.3f} us a packet; lock "
        "contention beyond that (waiters sleeping, waking) is not modelled",
        "ignored: handshakes, the hints' cache line bouncing between senders, TAP writes' "
        "coalescing (tcpgro), the work duplicates cost",
        "one inner flow stays on one sending worker (flow hash): these rates need many flows",
        "receive spreading reorders one inner flow across receiving workers at run boundaries "
        "(runs of 128 counters); TCP's reaction to that is not modelled",
        f"only {os.cpu_count()} cores here: rows above that are extrapolation, not measurement",
    ]


# -- output ---------------------------------------------------------------------------------

def _row(label: str, values) -> str:
    return f"{label:<21}" + " ".join(f"{v:>8}" for v in values)


def summary(r: dict) -> list[str]:
    o = r["reordering"]
    return [
        f"senders {r['senders']}  receivers {r['receivers']}  block {r['block']}  bound {r['bound']}"
        f"  GRO {'on (a burst goes where its first message is steered)' if r['gro'] else 'off'}",
        f"design: {DESIGNS[r['design']]}",
        f"counters sent        {r['counters_sent']:>10}   (skipped {r['skipped']})",
        f"delivered            {r['delivered']:>10}",
        f"messages DROPPED     {r['messages_dropped']:>10}   (sent, never delivered; copies refused: "
        f"{r['foreign_dropped']} foreign, {r['beyond_window']} behind the window)",
        f"duplicates injected  {r['duplicates_injected']:>10}",
        f"duplicates rejected  {r['duplicates_rejected']:>10}"
        + (f"   ({r['caught_under_lock']} passed the unlocked check, refused under the lock)"
           if r["design"] == "shared" else ""),
        f"duplicates ACCEPTED  {r['duplicates_accepted']:>10}",
        f"row locks taken      {r['locks']:>10}   (one per burst with a message to record;"
        f" mean burst {r['recv_burst_mean']:.1f})" if r["design"] == "shared" else
        f"mean burst           {r['recv_burst_mean']:>10.1f}   (messages a recvmsg returns)",
        f"sender reordering    {r['sender_reordering_max']:>10}   (max, in send order;"
        f" must stay below the bound, {r['bound']})",
        f"delivery reordering: max {o['max']}  p50 {o['p50']}  p99 {o['p99']}"
        f"  p99.9 {o['p99.9']}  (behind the highest delivered; window {o['window']})",
        _row("sender load", r["sender_load"]),
        _row("sender reach", r["sender_reach"]) + "   (receivers each sender's counters go to)",
        _row("receiver load", r["receiver_load"]),
        _row("receiver bursts", r["receiver_bursts"]),
    ]


def comparison(r: dict) -> list[str]:
    lines = ["", "the same traffic, side by side:",
             f"  {'design':<28} {'dup injected':>13} {'dup ACCEPTED':>13} {'msgs DROPPED':>13}"
             f" {'row locks':>10}"]
    for name, c in r["compare"].items():
        lines.append(f"  {DESIGNS[name]:<28} {r['duplicates_injected']:>13}"
                     f" {c['duplicates_accepted']:>13} {c['messages_dropped']:>13} {c['locks']:>10}")
    return lines


def sweep_table(rows: list[dict]) -> list[str]:
    lines = ["", f"spread over W workers (senders = receivers = W, shared window,"
             f" <= {SWEEP_MESSAGES} messages):",
             "   W  receiver load share %                            dup acc  dropped"
             "  sender reach (unmixed formula)"]
    for row in rows:
        total = sum(row["receiver_load"]) or 1
        shares = " ".join(f"{100 * n / total:4.1f}" for n in row["receiver_load"])
        lines.append(f"  {row['workers']:>2}  {shares:<48} {row['duplicates_accepted']:>7}"
                     f" {row['messages_dropped']:>8}  {row['sender_reach']}"
                     f" ({row['sender_reach_plain']})")
    return lines


def model_table(model: dict) -> list[str]:
    costs = model["costs"]
    us = {k: v * 1e6 for k, v in costs.items() if k.startswith("c_")}
    lines = ["", f"measured: seal {us['c_seal']:.2f} us, open {us['c_open']:.2f} us"
             f" ({costs['size']} bytes), UDP sendto+recv {us['c_udp']:.2f} us,"
             f" take {us['c_take']:.2f} us, would_accept {us['c_would']:.3f} us,"
             f" accept {us['c_accept']:.3f} us, row lock+unlock {us['c_lock']:.2f} us",
             f"{'cores':>5} {'tx kpps':>9} {'rx kpps':>9} {'rx limit':>9} {'peer kpps':>10}"
             f" {'Gbit/s':>7} {'speedup':>8}"]
    base = model["rows"][0]["pps"]
    for row in model["rows"]:
        lines.append(f"{row['cores']:>5} {row['tx_pps'] / 1e3:>9.0f} {row['rx_pps'] / 1e3:>9.0f}"
                     f" {row['rx_limit']:>9} {row['pps'] / 1e3:>10.0f} {row['gbit']:>7.2f}"
                     f" {row['pps'] / base:>8.2f}")
    return lines + ["assumptions:"] + [f"  - {a}" for a in model["assumptions"]]


def table(result: dict) -> str:
    lines = summary(result)
    if "compare" in result:
        lines += comparison(result)
    if "spread_check" in result:
        lines += sweep_table(result["spread_check"])
    if "model" in result:
        lines += model_table(result["model"])
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
    p.add_argument("--gro", action=argparse.BooleanOptionalAction, default=True,
                   help="merge arrivals as UDP GRO would (default: on)")
    p.add_argument("--per-worker-windows", action="store_true",
                   help="the earlier design: one replay window per receiving worker")
    p.add_argument("--no-owner-check", action="store_true",
                   help="with --per-worker-windows: record foreign counters too")
    p.add_argument("--no-compare", action="store_true", help="skip the side-by-side designs")
    p.add_argument("--no-sweep", action="store_true", help="skip the W = 2, 4, 8 load check")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def run_model(result: dict) -> dict:
    costs = measure_costs()
    tx_batch, rx_burst = result["send_batch_mean"], result["recv_burst_mean"]
    return {"costs": costs, "tx_batch": tx_batch, "rx_burst": rx_burst,
            "per_packet": per_packet(costs, tx_batch, rx_burst),
            "rows": scaling(costs, tx_batch, rx_burst),
            "assumptions": assumptions(costs, tx_batch, rx_burst)}


def main(argv=None) -> dict:
    args = parse(argv)
    result = simulate(args)
    if not args.no_sweep:
        result["spread_check"] = sweep(args)
    if not args.no_model:
        result["model"] = run_model(result)
    print(json.dumps(result, indent=1) if args.json else table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
