"""A swarm of WireGuard peers in one process, for the scale benchmark.

    python -m wgebpf.lab.swarm run --spec SPEC.json
    python -m wgebpf.lab.swarm sink --port 9999

`run` impersonates K peers of one interface (it knows their private keys,
from SPEC) with wgebpf's own protocol code (wgebpf/wireguard: Noise
initiations, responses, cookie replies, data messages). At start it sends
every peer's handshake initiation, from many source addresses at once,
and counts the valid responses. Then it waits for commands on stdin, one
per line:

    trickle SECONDS   every trickling peer sends one small data packet every
                      SECONDS (spread evenly over the period); 0 stops it
    report            print the counters
    quit              exit (so does end of input)

It behaves as a real peer where the responder can tell: a cookie reply is
stored and the next initiation carries mac2; an initiation that got no
response is sent again after REKEY_TIMEOUT (plus jitter) with a fresh
ephemeral and index; a new session is confirmed at once with a keepalive;
a session older than REKEY_AFTER_TIME is rekeyed. Everything it says goes
to stdout as one JSON object per line ("event": progress | handshakes |
report | exit).

Bounded: the handshake phase ends after `handshake_timeout` seconds
whatever was completed, the process exits after `max_seconds` (at most
MAX_SECONDS), and a trickle sends one packet per peer per period.

`sink` is the receiving end of the trickle inside the wgebpf host: a UDP
socket that counts datagrams per source address (so a packet counts only
if it got through decryption and the source policy), and prints the count
on `report` or at the end.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import os
import random
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field

from ..wireguard import keys, noise
from ..wireguard.cookie import CookieGenerator
from ..wireguard.crypto import aead_nonce
from ..wireguard.messages import (DATA_HEADER, MESSAGE_DATA, MESSAGE_HANDSHAKE_COOKIE,
                                  MESSAGE_HANDSHAKE_RESPONSE, REKEY_AFTER_TIME, REKEY_TIMEOUT,
                                  REKEY_TIMEOUT_JITTER_MAX, message_type)
from ..wireguard.send import pad
from .flood import check_address, udp_packet

MAX_SECONDS = 3600.0
RECV_BATCH = 256          # datagrams read per socket per wake-up, so no socket starves
PROGRESS_EVERY = 1.0      # seconds between progress lines in the handshake phase


class _Clock:
    """The clock CookieGenerator asks (wgebpf's devices take one too)."""

    monotonic = staticmethod(time.monotonic)


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class StdinLines:
    """Whole lines from fd 0 as they come. Read with os.read, not sys.stdin:
    a buffered readline would keep a second line that arrived with the first
    where select() no longer sees it. None at end of input."""

    def __init__(self):
        self.buffer = b""

    def read(self) -> list[str] | None:
        chunk = os.read(0, 4096)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode(errors="replace") for line in lines]


# -- One impersonated peer ------------------------------------------------------------


@dataclass(eq=False)
class SwarmPeer:
    number: int                     # position in the spec's peer list
    identity: noise.StaticIdentity
    handshake: noise.Handshake
    cookie: CookieGenerator
    inner_source: str               # the peer's own tunnel address (its AllowedIPs)
    sock: socket.socket
    trickles: bool
    keypair: noise.Keypair | None = None
    pending_index: int = 0          # sender index of the initiation in flight, 0 = none
    initiated_at: float = 0.0
    first_initiation: float = 0.0
    completed_at: float = 0.0       # first completed handshake, 0 = not yet
    data_sent: int = 0
    sessions: int = 0


def make_peer(number: int, private_b64: str, inner_source: str, server_public: bytes,
              sock: socket.socket, trickles: bool) -> SwarmPeer:
    identity = noise.StaticIdentity(keys.decode(private_b64))
    hs = noise.Handshake(remote_static=server_public)
    hs.precompute(identity)        # DH(our static, server static) once, as a real peer
    return SwarmPeer(number, identity, hs, CookieGenerator(server_public, _Clock()),
                     inner_source, sock, trickles)


def data_message(keypair: noise.Keypair, plaintext: bytes, mtu: int) -> bytes:
    """A transport data message (padded as the protocol wants) on keypair."""
    counter = keypair.send_counter
    keypair.send_counter += 1
    sealed = keypair.sending.encrypt(aead_nonce(counter), pad(plaintext, mtu), None)
    return DATA_HEADER.pack(MESSAGE_DATA, keypair.remote_index, counter) + sealed


# -- The swarm ----------------------------------------------------------------------------


@dataclass
class Counters:
    initiations: int = 0
    retries: int = 0
    responses: int = 0              # valid responses (handshakes completed)
    bad_responses: int = 0          # stale or not authenticating
    cookie_replies: int = 0
    bad_cookie_replies: int = 0
    data_sent: int = 0
    data_received: int = 0          # data messages from the interface (keepalives)
    send_blocked: int = 0           # EAGAIN on a send: tried again later
    rekeys: int = 0


@dataclass
class Swarm:
    spec: dict
    peers: list[SwarmPeer]
    sockets: list[socket.socket]
    server: tuple
    started: float = field(default_factory=time.monotonic)
    counters: Counters = field(default_factory=Counters)
    by_index: dict = field(default_factory=dict)     # our sender index -> peer
    timers: list = field(default_factory=list)       # heap of (when, seq, action, peer, gen)
    seq: int = 0
    trickle_gen: int = 0
    trickle_period: float = 0.0
    completion_times: list = field(default_factory=list)
    handshake_phase_done: bool = False
    rng: random.Random = field(default_factory=random.Random)

    # timers

    def schedule(self, when: float, action: str, peer: SwarmPeer | None, gen: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, action, peer, gen))

    def run_due(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, action, peer, gen = heapq.heappop(self.timers)
            getattr(self, f"_on_{action}")(peer, gen, now)

    def next_deadline(self, now: float) -> float:
        return self.timers[0][0] - now if self.timers else 0.5

    # handshakes

    def initiate(self, peer: SwarmPeer, now: float) -> None:
        if peer.pending_index:
            self.by_index.pop(peer.pending_index, None)
        index = self._new_index()
        message = noise.create_initiation(peer.identity, peer.handshake, index)
        if not self._send(peer, bytes(peer.cookie.add_macs(message)), now, "initiate"):
            return
        self.by_index[index] = peer
        peer.pending_index, peer.initiated_at = index, now
        peer.first_initiation = peer.first_initiation or now
        self.counters.initiations += 1
        jitter = self.rng.uniform(0, REKEY_TIMEOUT_JITTER_MAX)
        self.schedule(now + self.spec.get("retry_after", REKEY_TIMEOUT) + jitter,
                      "retry", peer, index)

    def _new_index(self) -> int:
        while True:
            index = self.rng.getrandbits(32)
            if index and index not in self.by_index:
                return index

    def _on_initiate(self, peer: SwarmPeer, gen: int, now: float) -> None:
        self.initiate(peer, now)

    def _on_retry(self, peer: SwarmPeer, index: int, now: float) -> None:
        """No response to initiation `index` in time: a real peer sends a new one."""
        if peer.pending_index != index or self.stopping(now):
            return
        self.counters.retries += 1
        self.initiate(peer, now)

    def stopping(self, now: float) -> bool:
        """Past the handshake phase's limit, peers still without a session give up."""
        return (not self.handshake_phase_done
                and now - self.started > self.spec["handshake_timeout"])

    def on_response(self, data: bytes, now: float) -> None:
        receiver = int.from_bytes(data[8:12], "little")
        peer = self.by_index.get(receiver)
        if peer is None or peer.pending_index != receiver:
            self.counters.bad_responses += 1
            return
        try:
            noise.consume_response(peer.identity, peer.handshake, data)
            keypair = noise.begin_session(peer.handshake, receiver, now)
        except noise.HandshakeError:
            self.counters.bad_responses += 1
            return
        self.by_index.pop(receiver, None)
        peer.pending_index, peer.keypair = 0, keypair
        peer.sessions += 1
        self.counters.responses += 1
        if not peer.completed_at:
            peer.completed_at = now
            self.completion_times.append(now)
        # The initiator confirms a new session at once (a keepalive), so the
        # responder moves it from "next" to "current".
        self._send(peer, data_message(keypair, b"", self.spec["mtu"]), now, None)

    def on_cookie_reply(self, data: bytes) -> None:
        peer = self.by_index.get(int.from_bytes(data[4:8], "little"))
        if peer is not None and peer.cookie.consume_reply(data):
            self.counters.cookie_replies += 1     # the next initiation carries mac2
        else:
            self.counters.bad_cookie_replies += 1

    # data

    def set_trickle(self, period: float, now: float) -> None:
        self.trickle_gen += 1
        self.trickle_period = period
        if period <= 0:
            return
        trickling = [p for p in self.peers if p.trickles]
        for i, peer in enumerate(trickling):
            self.schedule(now + period * i / max(1, len(trickling)), "trickle", peer,
                          self.trickle_gen)

    def _on_trickle(self, peer: SwarmPeer, gen: int, now: float) -> None:
        if gen != self.trickle_gen:
            return                              # that trickle was stopped or replaced
        self.schedule(now + self.trickle_period, "trickle", peer, gen)
        keypair = peer.keypair
        if keypair is None or not keypair.can_send(now):
            return
        if now - keypair.birthdate > REKEY_AFTER_TIME and not peer.pending_index:
            self.counters.rekeys += 1           # as a sender does: rekey, keep sending
            self.initiate(peer, now)
        payload = b"wgebpf-swarm %d %d" % (peer.number, peer.data_sent)
        inner = udp_packet(peer.inner_source, self.spec["inner_destination"],
                           40000 + peer.number % 20000, self.spec["sink_port"], payload)
        if self._send(peer, data_message(keypair, inner, self.spec["mtu"]), now, None):
            peer.data_sent += 1
            self.counters.data_sent += 1

    # sockets

    def _send(self, peer: SwarmPeer, message: bytes, now: float, again: str | None) -> bool:
        """Send one datagram; on a full socket buffer try `again` 10 ms later."""
        try:
            peer.sock.sendto(message, self.server)
            return True
        except BlockingIOError:
            self.counters.send_blocked += 1
            if again:
                self.schedule(now + 0.01, again, peer)
            return False

    def on_readable(self, sock: socket.socket, now: float) -> None:
        for _ in range(RECV_BATCH):
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            kind = message_type(data)
            if kind == MESSAGE_HANDSHAKE_RESPONSE and len(data) == 92:
                self.on_response(data, now)
            elif kind == MESSAGE_HANDSHAKE_COOKIE and len(data) == 64:
                self.on_cookie_reply(data)
            elif kind == MESSAGE_DATA:
                self.counters.data_received += 1

    # reports

    def handshake_report(self) -> dict:
        done = sorted(self.completion_times)
        first = min((p.first_initiation for p in self.peers if p.first_initiation),
                    default=self.started)
        span = (done[-1] - first) if done else 0.0
        return {"peers": len(self.peers), "completed": len(done),
                "seconds_to_all": span if len(done) == len(self.peers) else None,
                "seconds_to_last": span,
                "completions_per_s": len(done) / span if span > 0 else None,
                "peak_completions_1s": peak_per_window(done, 1.0),
                "median_seconds": done[len(done) // 2] - first if done else None,
                **self.counters.__dict__}

    def report(self) -> dict:
        trickling = [p for p in self.peers if p.trickles]
        sent = [p.data_sent for p in trickling]
        return {"uptime_s": time.monotonic() - self.started,
                "with_session": sum(1 for p in self.peers if p.keypair is not None),
                "trickling": len(trickling), "trickle_period": self.trickle_period,
                "data_sent_min_per_peer": min(sent, default=0),
                "data_sent_per_peer": {str(p.number): p.data_sent for p in trickling},
                **self.counters.__dict__}


def peak_per_window(times: list[float], window: float) -> int:
    """The most events inside any `window` seconds (times sorted)."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- Building and running ----------------------------------------------------------------


def open_sockets(sources: list[str]) -> list[socket.socket]:
    """One non-blocking UDP socket per source address: the responder's per-source
    rate limit (20 a second under load) then applies per address, as it
    would to that many hosts."""
    out = []
    for addr in sources:
        check_address(addr)
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((addr, 0))
        sock.setblocking(False)
        out.append(sock)
    return out


def build(spec: dict) -> Swarm:
    host, port = spec["server"]
    check_address(host)
    check_address(spec["inner_destination"])
    server_public = keys.decode(spec["server_public_key"])
    sockets = open_sockets(spec["sources"])
    trickle = spec.get("trickle_peers", 0)
    peers = [make_peer(i, private, inner, server_public, sockets[i % len(sockets)],
                       i < trickle)
             for i, (private, inner) in enumerate(spec["peers"])]
    return Swarm(spec, peers, sockets, (host, port))


def start_handshakes(swarm: Swarm) -> None:
    """Every peer initiates, paced at spec["rate"] a second (0: all at once)."""
    rate, now = swarm.spec.get("rate", 0), time.monotonic()
    swarm.started = now
    for i, peer in enumerate(swarm.peers):
        swarm.schedule(now + (i / rate if rate else 0), "initiate", peer)


def command(swarm: Swarm, line: str, now: float) -> bool:
    """Apply one stdin command; False means quit."""
    words = line.split()
    if not words:
        return True
    if words[0] == "quit":
        return False
    if words[0] == "trickle" and len(words) == 2:
        swarm.set_trickle(float(words[1]), now)
        emit("trickle", period=swarm.trickle_period)
    elif words[0] == "report":
        emit("report", **swarm.report())
    else:
        emit("error", message=f"unknown command {line.strip()!r}")
    return True


def loop(swarm: Swarm) -> None:
    sel = selectors.DefaultSelector()
    for sock in swarm.sockets:
        sel.register(sock, selectors.EVENT_READ, sock)
    sel.register(0, selectors.EVENT_READ, None)
    stdin = StdinLines()
    deadline = swarm.started + min(float(swarm.spec.get("max_seconds", 600)), MAX_SECONDS)
    next_progress = swarm.started + PROGRESS_EVERY
    while True:
        now = time.monotonic()
        if now >= deadline:
            emit("exit", reason="max_seconds")
            return
        swarm.run_due(now)
        for key, _ in sel.select(max(0.0, min(swarm.next_deadline(now), 0.1))):
            if key.data is None:
                lines = stdin.read()
                if lines is None or not all(command(swarm, line, time.monotonic())
                                            for line in lines):
                    emit("exit", reason="quit")
                    return
            else:
                swarm.on_readable(key.data, time.monotonic())
        now = time.monotonic()
        if not swarm.handshake_phase_done:
            next_progress = handshake_phase(swarm, now, next_progress)


def handshake_phase(swarm: Swarm, now: float, next_progress: float) -> float:
    """Progress lines while handshaking; the summary once all are done or time is up."""
    completed = len(swarm.completion_times)
    if completed == len(swarm.peers) or swarm.stopping(now):
        swarm.handshake_phase_done = True
        emit("handshakes", **swarm.handshake_report())
    elif now >= next_progress:
        emit("progress", completed=completed, peers=len(swarm.peers),
             elapsed=now - swarm.started, cookie_replies=swarm.counters.cookie_replies,
             retries=swarm.counters.retries)
        next_progress = now + PROGRESS_EVERY
    return next_progress


def run_swarm(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    swarm = build(spec)
    emit("ready", peers=len(swarm.peers), sources=len(swarm.sockets))
    start_handshakes(swarm)
    loop(swarm)
    return 0


# -- The sink -----------------------------------------------------------------------------


def run_sink(port: int, max_seconds: float) -> int:
    """Count UDP datagrams per source address on [::]:port (IPv4 too)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("::", port))
    counts: dict[str, int] = {}
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(0, selectors.EVENT_READ, "stdin")
    stdin = StdinLines()
    emit("ready", port=port)
    deadline = time.monotonic() + min(max_seconds, MAX_SECONDS)
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            if key.data == "sock":
                _, source = sock.recvfrom(2048)
                addr = str(ipaddress.ip_address(source[0].split("%")[0]))
                counts[addr] = counts.get(addr, 0) + 1
            else:
                lines = stdin.read()
                if lines is None or not all(sink_command(line, counts) for line in lines):
                    return 0
    emit("report", sources=len(counts), packets=sum(counts.values()), per_source=counts)
    return 0


def sink_command(line: str, counts: dict) -> bool:
    """Apply one stdin line; False means quit."""
    if line.strip() == "report":
        emit("report", sources=len(counts), packets=sum(counts.values()), per_source=counts)
    return line.strip() != "quit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wgebpf.lab.swarm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="impersonate the peers of a spec file")
    r.add_argument("--spec", required=True)
    s = sub.add_parser("sink", help="count UDP datagrams per source")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args(argv)
    if args.what == "run":
        return run_swarm(args.spec)
    return run_sink(args.port, args.max_seconds)


if __name__ == "__main__":
    sys.exit(main())
