"""The crypto worker pool, seen from the control plane.

Processes, not threads: the per-packet Python, the AEAD call included, holds
the GIL (docs/platform-notes.md, item 4), so only processes use more than one
core. The control plane

  - owns every file descriptor the data plane uses: the TAP queues (queue
    0 is its own: packets no peer takes arrive there; queue k is worker
    k's) and the UDP sockets of both SO_REUSEPORT groups (position 0 is its
    own). Workers get dups. Holding them here keeps queue numbers and socket
    positions stable when a worker dies: the kernel renumbers both when one
    closes;
  - gives each peer a slot (1..65535): its name in the kernel's maps and in
    the tag its packets carry (tun.py, "Peer tags"). Queues are workers, not
    peers: every worker holds every peer and every session. By default a
    peer has one worker both ways (worker_of: the classifier queues its
    packets there, and receive steering hands it the peer's sessions);
    with PeerSpread the classifier picks the worker by flow hash and
    receive steering by counter run, so one peer uses every worker;
  - runs handshakes and timers, sends each new keypair to every worker
    (each takes counters from its own share of the keypair's counter
    space: wireguard/counters.py) and maps its receiver index in the
    receive steering;
  - restarts a worker that dies. Every session had a share in it (its replay
    windows, its counters), so every session is dropped and the peers that
    had one re-handshake.

Implements the same hooks as device.LocalDataplane.
"""

import collections
import errno
import heapq
import logging
import os
import select
import selectors
import subprocess
import sys
import time

from . import channel
from .commands import (ConfirmKeypair, EndpointLearned, HandshakeConfirmed, Init, InstallKeypair,
                       NeedHandshake, PeerAdd, PeerRemove, PurgeStaged, ReleasedIndices,
                       ReplaceSockets, SendKeepalive, SetEndpoint, SocketsDone, Stats,
                       StatsRequest, Stop, TimerEvents, ZeroKeys)
from ..kernel.bpfmaps import SLOT_MAX
from ..wireguard import counters, send
from ..wireguard.messages import REJECT_AFTER_TIME
from ..wireguard.replay import SharedReplayWindows
from ..wireguard.device import DeviceError
from .worker import (AUTH_RECEIVED, AUTH_SENT, DATA_RECEIVED, DATA_SENT, EVENT_ORDER,
                     TRAVERSAL)

log = logging.getLogger("wgebpf")

MAX_SLOTS = SLOT_MAX     # peer slots 1..65535 (the tag and the kernel maps hold 16 bits)
# Rows of counter hints: a keypair's row is its index modulo this. More live
# keypairs than rows only share rows, which costs counters, never
# uniqueness (counters.py). 8 bytes a row per worker.
HINT_ROWS = 65536
# Shared replay windows, one per live session (plus the ones resting until
# no worker can use them: ReplayRows). 1040 bytes a row, in a sparse memfd:
# only rows ever used take memory.
REPLAY_ROWS = 65536
ROW_REST_MARGIN = 5.0    # seconds on top of REJECT_AFTER_TIME before a row is reused
ROUND_TRIP_TIMEOUT = 1.0
MIN_UPTIME = 2.0         # a worker that dies sooner is restarted with back-off
MAX_BACKOFF = 8.0


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) or 1


def launch_process(theirs) -> subprocess.Popen:
    """Start a worker process on its end of the channel (the default
    WorkerPool launcher; tests run Worker objects in-process instead)."""
    # -P: `-m` would put the current directory first on the worker's path,
    # so a root daemon started in a folder holding some other wgebpf/ would
    # run that code in its workers. They import what sys.path gives the
    # daemon itself (the install, or PYTHONPATH).
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "wgebpf.dataplane.worker", str(theirs.fileno())],
        pass_fds=[theirs.fileno()], close_fds=True)
    theirs.close()
    return process


class WorkerHandle:
    def __init__(self, position: int):
        self.position = position          # its socket position, 1..N
        self.process: subprocess.Popen | None = None
        self.control = None
        self.restarts = 0
        self.started = 0.0
        self.backoff = 0.0
        self.restart_timer = None
        self.busy_seconds = 0.0
        self.packets = collections.Counter()
        self.traffic = collections.Counter()
        self.busy_before_restart = 0.0
        self.queue_depth = 0


class WorkerPool:
    def __init__(self, device, tun, conn, count: int, classifier=None, reuseport=None,
                 selector=None, policy=None, nft_factory=None, launcher=launch_process,
                 peer_spread: bool = False):
        self.device = device
        self.tun = tun
        self.conn = conn
        self.classifier = classifier
        self.reuseport = reuseport
        self.policy = policy                # policy.SourcePolicy (tc ingress)
        self.nft_factory = nft_factory      # makes the nftables table on first need
        self.nft = None
        self.selector = selector
        self.workers = [WorkerHandle(k) for k in range(1, count + 1)]
        self.peer_spread = peer_spread
        # Where the workers tell each other how far they got in each
        # keypair's counters (wireguard/counters.py); one worker needs none.
        self.hints = counters.CounterHints.create(HINT_ROWS, count) if count > 1 else None
        # The replay windows of sessions every worker receives (replay.py).
        # Only PeerSpread needs them: otherwise one worker receives each
        # session and keeps its window in its own memory, with no lock.
        spread = peer_spread and count > 1
        self.windows = SharedReplayWindows.create(REPLAY_ROWS) if spread else None
        if classifier is not None:
            classifier.set_spread(spread)
        self.replay_rows = ReplayRows()
        self.row_of_index: dict[int, int] = {}
        self.peer_by_slot: dict[int, object] = {}
        self.free_slots: list[int] = []          # a heap of slots given back, reused lowest first
        self.next_slot = 1
        self.pushed: dict[int, set] = {}         # slot -> the allowed-ips last pushed to the kernel
        self.pushed_owner: dict = {}             # network -> the slot it was pushed for
        self.had_sessions: list = []             # peers to re-handshake after a worker restart
        self.confirmed: dict[int, int] = {}      # slot -> index of its last confirmed session
        self.stopping = False
        self.launcher = launcher            # (its channel end) -> a Popen-like process
        # Uptime and restart back-off read the device's clock, so tests can
        # drive them with a FakeClock.
        self.clock = device.clock
        self.handlers = {
            TimerEvents: self._on_events,
            NeedHandshake: self._on_need_handshake,
            HandshakeConfirmed: self._on_confirmed,
            EndpointLearned: self._on_endpoint,
            ReleasedIndices: self._on_released,
            SocketsDone: self._on_sockets_done,
            Stats: self._on_stats,
        }

    # --- worker processes ---------------------------------------------------------

    def start(self) -> None:
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: WorkerHandle) -> None:
        ours, theirs = channel.pair()
        worker.process = self.launcher(theirs)
        worker.started = self.clock.monotonic()
        worker.control = ours
        shared = [region.fd for region in (self.hints, self.windows) if region is not None]
        channel.send(ours, Init(worker.position, self.device.name, self.device.mtu,
                                self.tun.mac, len(self.workers),
                                counter_hints=self.hints is not None,
                                replay_windows=self.windows is not None),
                     [self.tun.fds[worker.position],
                      *(s.fileno() for s in self.conn.position(worker.position)), *shared])
        ours.setblocking(False)
        if self.selector is not None:
            self.selector.register(ours, selectors.EVENT_READ, ("worker", worker))
        for peer in self.peer_by_slot.values():
            self._send_peer(worker, peer)

    def _send(self, worker: WorkerHandle, message, fds=()) -> None:
        if worker.control is None:
            return                  # not started yet: _spawn sends it everything
        try:
            channel.send(worker.control, message, fds)
        except (channel.ChannelClosed, OSError):
            pass        # it died: the selector sees EOF and restarts it

    def stop(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process is None:
                continue
            self._send(worker, Stop())
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
            self._close_control(worker)

    def _close_control(self, worker: WorkerHandle) -> None:
        if worker.control is not None:
            if self.selector is not None:
                try:
                    self.selector.unregister(worker.control)
                except (KeyError, ValueError):
                    pass
            worker.control.close()
            worker.control = None

    def worker_died(self, worker: WorkerHandle) -> None:
        """Restart it. The sessions that had a share in the dead worker (its
        counters, its replay windows: a fresh one would accept replays) are
        dropped everywhere, and their peers re-handshake: under PeerSpread
        every session, otherwise the sessions of the peers it was the own
        worker of. Every other peer carries on untouched."""
        if self.stopping:
            return
        code = worker.process.poll() if worker.process else None
        if code is None and worker.process is not None:
            worker.process.kill()
            code = worker.process.wait()
        log.warning("%s: worker %d exited (%s); restarting it", self.device.name,
                    worker.position, code)
        self._close_control(worker)
        worker.restarts += 1
        worker.busy_before_restart = worker.busy_seconds
        self.had_sessions = [peer for peer in self.peer_by_slot.values()
                             if self._had_share(peer, worker) and self._forget_sessions(peer)]
        for other in self.workers:
            if other is not worker:
                for peer in self.had_sessions:
                    self._send(other, ZeroKeys(peer.queue))
        # A worker that keeps dying at once must not spin the control plane.
        quick = self.clock.monotonic() - worker.started < MIN_UPTIME
        worker.backoff = min(max(worker.backoff * 2, 0.25), MAX_BACKOFF) if quick else 0.0
        if worker.backoff:
            worker.restart_timer = self.device.scheduler.timer(lambda: self._restart(worker))
            worker.restart_timer.mod(worker.backoff)
        else:
            self._restart(worker)

    def _had_share(self, peer, worker: WorkerHandle) -> bool:
        return self.peer_spread or self.worker_of(peer.queue) == worker.position

    def _restart(self, worker: WorkerHandle) -> None:
        if self.stopping:
            return
        self._spawn(worker)
        for peer in self.had_sessions:
            if peer.queue in self.peer_by_slot:
                peer.last_sent_handshake = -1e18
                send.send_handshake_initiation(self.device, peer, retry=False)
        self.had_sessions = []

    def _forget_sessions(self, peer) -> bool:
        """Unmap the peer's sessions (not a handshake in flight); whether it had any."""
        had = False
        for index, (owner, thing) in list(self.device.indices.items()):
            if owner is peer and thing is not peer.handshake:
                had = True
                self.device.forget_index(index)
                if self.reuseport is not None:
                    self.reuseport.remove_index(index)
                self._release_row(index)
        return had

    # --- peers and slots ------------------------------------------------------------

    def _take_slot(self) -> int:
        if self.free_slots:
            return heapq.heappop(self.free_slots)
        if self.next_slot > MAX_SLOTS:
            raise DeviceError(f"at most {MAX_SLOTS} peers on one interface", errno.ENOSPC)
        self.next_slot += 1
        return self.next_slot - 1

    def _send_peer(self, worker: WorkerHandle, peer) -> None:
        self._send(worker, PeerAdd(peer.queue, peer.public_key, peer.endpoint))

    def _to_all(self, message) -> None:
        for worker in self.workers:
            self._send(worker, message)

    def peer_added(self, peer) -> None:
        slot = self._take_slot()
        peer.queue = slot
        self.peer_by_slot[slot] = peer
        if self.policy is not None:
            self.policy.set_peer(slot, peer.source_policy)
        for worker in self.workers:
            self._send_peer(worker, peer)

    def peer_removed(self, peer) -> None:
        slot = peer.queue
        if self.peer_by_slot.pop(slot, None) is None:
            return
        if self.classifier is not None:
            self.classifier.remove_peer(slot)
        if self.policy is not None:
            self.policy.remove_peer(slot)
        if self.nft is not None:
            self.nft.remove_peer(slot)
        for net in self.pushed.pop(slot, ()):
            if self.pushed_owner.get(net) == slot:
                del self.pushed_owner[net]
        self._to_all(PeerRemove(slot))
        self._forget_sessions(peer)
        for worker in self.workers:
            worker.packets.pop(slot, None)
        self.confirmed.pop(slot, None)
        heapq.heappush(self.free_slots, slot)

    # --- slot-keyed kernel state: the classifier's allowed-ips tries, the
    # --- source policy per peer, the nftables sets ---------------------------------

    def allowed_ips_changed(self, peer=None) -> None:
        """Push `peer`'s allowed-ips (None: every peer's) to the classifier and
        the nftables sets, and those of the peers it took a prefix from. One
        peer at a time, so a `wg set` at 10^4 peers costs the peer's own
        prefixes, not everyone's."""
        if peer is None:
            targets = list(self.peer_by_slot.values())
        elif peer.queue not in self.peer_by_slot:
            return
        else:
            networks = self.device.allowed_ips_of(peer)
            losers = {self.pushed_owner.get(net) for net in networks} - {None, peer.queue}
            targets = [peer] + [self.peer_by_slot[s] for s in losers if s in self.peer_by_slot]
        for target in targets:
            self._push_allowed_ips(target)

    def _push_allowed_ips(self, peer) -> None:
        slot = peer.queue
        networks = self.device.allowed_ips_of(peer)
        for net in self.pushed.get(slot, ()):
            if self.pushed_owner.get(net) == slot:
                del self.pushed_owner[net]
        self.pushed[slot] = set(networks)
        self.pushed_owner.update((net, slot) for net in networks)
        if self.classifier is not None:
            self.classifier.set_peer(slot, networks)
        if self.nft is not None:
            self.nft.set_peer(slot, networks, _short(peer.public_key))

    def policy_changed(self) -> None:
        """SourcePolicy (interface default, peer overrides) changed: the
        ingress program takes it at once; the nftables table appears the
        first time any peer's policy is `nftables`."""
        if self.policy is None:
            return
        # Table and sets first, marks second: never a marked packet without
        # its peer's set to judge it.
        wanted = {self.device.source_policy} | {p.source_policy for p in self.peer_by_slot.values()}
        if "nftables" in wanted and self.nft is None and self.nft_factory is not None:
            self.nft = self.nft_factory()
            self.allowed_ips_changed()
        self.policy.set_default(self.device.source_policy)
        for slot, peer in self.peer_by_slot.items():
            self.policy.set_peer(slot, peer.source_policy)

    def sockets_changed(self) -> None:
        """New listen port: hand out the new sockets and wait until every
        worker has closed its old ones (so the old port is free on return)."""
        self._round_trip(lambda worker: ReplaceSockets(), SocketsDone,
                         lambda worker: [s.fileno() for s in self.conn.position(worker.position)])

    # --- the hooks the protocol code calls -------------------------------------------

    def install_keypair(self, peer, keypair) -> None:
        if peer.queue not in self.peer_by_slot:
            return
        state = keypair.export()
        index = keypair.local_index
        try:
            if self.windows is not None:
                state["replay_row"] = self._replay_row(index)
            self._steer(index, peer.queue)
        except OSError as exc:
            # A full map (E2BIG) or no free replay row: the session could
            # receive nothing, so it is not installed; the peer's next
            # handshake tries again.
            log.warning("%s: receive steering refused index %d (%s); session not installed",
                        self.device.name, index, exc.strerror or exc)
            self._release_row(index)
            self.device.drop("index_refused", peer)
            keypair.zero()
            return
        self._to_all(InstallKeypair(peer.queue, state))
        keypair.zero()      # the workers' copies are the only live ones

    def worker_of(self, slot: int) -> int:
        """The position of a peer's own worker (without PeerSpread): the
        one the classifier queues its packets to, and the one that receives
        its sessions (bpf/nexthop.c: 1 + (slot - 1) % W)."""
        return 1 + (slot - 1) % len(self.workers)

    def _steer(self, index: int, slot: int) -> None:
        """Receive steering for session `index` of peer `slot`: with
        PeerSpread, over every worker by counter (they share its replay
        window); otherwise to the peer's own worker, which also sends for
        it. Spreading lets one peer use every core, but the workers deliver
        a flow's packets out of order where a burst crosses from one worker
        to the next, and two workers handling one peer both wake for it; on
        two cores shared by both ends that cost more than it gave (README,
        Queues and workers), so it is off by default."""
        if self.reuseport is None:
            return
        if self.peer_spread and len(self.workers) > 1:
            self.reuseport.set_spread(index, len(self.workers))
        else:
            self.reuseport.set_index(index, self.worker_of(slot))

    def _replay_row(self, index: int) -> int:
        row = self.replay_rows.take(self.clock.monotonic())
        if row is None:
            raise OSError(errno.ENOSPC, "every shared replay window is in use")
        self.windows.reset_row(row)
        self.row_of_index[index] = row
        return row

    def _release_row(self, index: int) -> None:
        row = self.row_of_index.pop(index, None)
        if row is not None:
            self.replay_rows.give_back(row, self.clock.monotonic())

    def send_keepalive(self, peer) -> None:
        # One worker is enough: the peer's own (any would do under PeerSpread:
        # its counters are as good as any other's).
        worker = self.workers[self.worker_of(peer.queue) - 1]
        self._send(worker, SendKeepalive(peer.queue))

    def zero_keys(self, peer) -> None:
        self._to_all(ZeroKeys(peer.queue))

    def endpoint_changed(self, peer) -> None:
        self._to_all(SetEndpoint(peer.queue, peer.endpoint))

    def purge_staged(self, peer) -> None:
        self._to_all(PurgeStaged(peer.queue))

    # --- what workers tell us ---------------------------------------------------------

    def on_readable(self, worker: WorkerHandle) -> type | None:
        """Handle what the worker sent; returns the last message's type."""
        last = None
        try:
            while True:
                item = channel.receive(worker.control)
                if item is None:
                    return last
                message, _ = item
                self.handlers[type(message)](worker, message)
                last = type(message)
        except channel.ChannelClosed:
            self.worker_died(worker)
        return last

    def refresh(self) -> None:
        """Fetch every worker's counters now (the UAPI's `get` must not show
        numbers half a second old)."""
        self._round_trip(lambda worker: StatsRequest(), Stats)

    def _round_trip(self, message, reply: type, fds=lambda worker: (),
                    timeout: float = ROUND_TRIP_TIMEOUT) -> None:
        """Send each live worker a message and wait for its reply. Called
        with the device lock held, so the main loop is not reading the
        channels meanwhile; other messages are handled as they come."""
        live = [w for w in self.workers if w.control is not None]
        for worker in live:
            self._send(worker, message(worker), fds(worker))
        deadline = time.monotonic() + timeout
        for worker in live:
            while worker.control is not None and time.monotonic() < deadline:
                ready = select.select([worker.control], [], [], deadline - time.monotonic())[0]
                if ready and self.on_readable(worker) == reply:
                    break

    def _peer(self, slot: int):
        return self.peer_by_slot.get(slot)

    def _on_events(self, worker, message: TimerEvents) -> None:
        for slot, flags in message.flags_by_slot.items():
            peer = self._peer(slot)
            if peer is None:
                continue
            timers = peer.timers
            for bit in EVENT_ORDER:
                if flags & bit:
                    HOOKS[bit](timers)

    def _on_need_handshake(self, worker, message: NeedHandshake) -> None:
        peer = self._peer(message.slot)
        if peer is not None:
            send.send_handshake_initiation(self.device, peer, retry=False)

    def _on_confirmed(self, worker, message: HandshakeConfirmed) -> None:
        peer = self._peer(message.slot)
        if peer is None or self.confirmed.get(message.slot) == message.index:
            return          # another worker saw the same session's first data too
        self.confirmed[message.slot] = message.index
        peer.stats.handshakes_completed += 1
        peer.timers.handshake_complete()
        for other in self.workers:
            if other is not worker:
                self._send(other, ConfirmKeypair(message.slot, message.index))

    def _on_endpoint(self, worker, message: EndpointLearned) -> None:
        peer = self._peer(message.slot)
        if peer is not None and peer.endpoint != message.endpoint:
            peer.endpoint = message.endpoint          # not set_endpoint: no echo to the sender
            for other in self.workers:
                if other is not worker:
                    self._send(other, SetEndpoint(peer.queue, peer.endpoint))

    def _on_released(self, worker, message: ReleasedIndices) -> None:
        for index in message.indices:
            entry = self.device.indices.get(index)
            if entry is not None and entry[1] is not entry[0].handshake:
                self.device.forget_index(index)
            if self.reuseport is not None:
                self.reuseport.remove_index(index)
            self._release_row(index)

    def _on_sockets_done(self, worker, message: SocketsDone) -> None:
        pass

    def _on_stats(self, worker, stats: Stats) -> None:
        for slot, traffic in stats.traffic_by_slot.items():
            worker.traffic["tx_bytes"] += traffic.tx_bytes
            worker.traffic["rx_bytes"] += traffic.rx_bytes
            worker.traffic["tx_packets"] += traffic.tx_packets
            worker.traffic["rx_packets"] += traffic.rx_packets
            peer = self._peer(slot)
            if peer is None:
                continue
            peer.tx_bytes += traffic.tx_bytes
            peer.rx_bytes += traffic.rx_bytes
            peer.stats.tx_packets += traffic.tx_packets
            peer.stats.rx_packets += traffic.rx_packets
            worker.packets[slot] += traffic.tx_packets + traffic.rx_packets
        self.device.drops.update(stats.drops)
        for slot, counts in stats.drops_by_slot.items():
            # Already in `drops` (the worker's device counts both); here
            # they are attributed to their peer.
            peer = self._peer(slot)
            if peer is not None:
                peer.drops.update(counts)
        worker.busy_seconds = worker.busy_before_restart + stats.busy_seconds
        worker.queue_depth = stats.queue_depth

    # --- status ---------------------------------------------------------------------

    def _peers_handled_by(self, worker: WorkerHandle) -> int:
        """Peers whose packets this worker handles: every peer under
        PeerSpread, else those it is the own worker of."""
        if self.peer_spread or len(self.workers) == 1:
            return len(self.peer_by_slot)
        return sum(1 for slot in self.peer_by_slot if self.worker_of(slot) == worker.position)

    def status(self) -> list[dict]:
        return [{"worker": w.position, "pid": w.process.pid if w.process else None,
                 "peers": self._peers_handled_by(w), "restarts": w.restarts,
                 "busy_seconds": w.busy_seconds, "queue_depth": w.queue_depth,
                 **dict(w.traffic), "alive": w.control is not None,
                 "packets_by_slot": dict(w.packets)} for w in self.workers]


class ReplayRows:
    """Rows of the shared replay windows: one per live session. A row given
    back rests until no worker can accept data of the session that had it
    (a keypair receives for REJECT_AFTER_TIME after its birth, which came
    before the row was given back); reused last-in first-out, so the rows
    ever touched stay few."""

    def __init__(self, rows: int = REPLAY_ROWS):
        self.rows = rows
        self.next_row = 0
        self.free: list[int] = []
        self.resting: collections.deque = collections.deque()   # (free from, row)

    def take(self, now: float) -> int | None:
        while self.resting and self.resting[0][0] <= now:
            self.free.append(self.resting.popleft()[1])
        if self.free:
            return self.free.pop()
        if self.next_row < self.rows:
            self.next_row += 1
            return self.next_row - 1
        return None

    def give_back(self, row: int, now: float) -> None:
        self.resting.append((now + REJECT_AFTER_TIME + ROW_REST_MARGIN, row))


def _short(public_key: bytes) -> str:
    import base64
    return "peer " + base64.b64encode(public_key).decode()[:10]


HOOKS = {
    AUTH_RECEIVED: lambda t: t.any_authenticated_packet_received(),
    DATA_RECEIVED: lambda t: t.data_received(),
    AUTH_SENT: lambda t: t.any_authenticated_packet_sent(),
    DATA_SENT: lambda t: t.data_sent(),
    TRAVERSAL: lambda t: t.any_authenticated_packet_traversal(),
}
