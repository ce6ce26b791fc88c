"""WorkerPool (control plane) and Worker (data plane) in one process, over
real channel socketpairs: each Worker object sits on the far end of the
channel the pool made for it, instead of in a child process.

Host A is the pool's device with its in-process workers; its peers are
memnet Hosts on a MemoryNetwork. What the kernel does in production is
played by small doubles: the TAP's queues are AF_UNIX datagram socketpairs
(queue 0 the control plane's, queue k worker k's; the worker gets a real
fd), every frame on them [virtio_net_hdr][Ethernet][IP] as on the TAP, with
the peer's tag in the destination MAC of what a worker reads (the tc
classifier's job) and in the source MAC of what it writes. Receive steering
is a dict from receiver index to socket position (the reuseport program's
map), read by the network when it delivers a data message to A. No root, no
kernel programs, no sleeping."""

import collections
import errno
import ipaddress
import os
import pickle
import socket
import struct
import time

import pytest

from memnet import (DEVICE_MAC, Host, MemoryConn, MemoryNetwork, ipv4_packet, ipv6_packet,
                    tap_frame, untag)
from wgebpf.dataplane import channel, tcpgro
from wgebpf.dataplane.commands import (Init, InstallKeypair, PeerAdd, PeerRemove, PeerTraffic,
                                       SendKeepalive, Stats, StatsRequest, ZeroKeys)
from wgebpf.dataplane.pool import HINT_ROWS, MAX_BACKOFF, MAX_SLOTS, MIN_UPTIME, WorkerPool
from wgebpf.dataplane.tun import ETH_P_IP, tag
from wgebpf.dataplane.worker import Worker
from wgebpf.kernel.reuseport import spread_position
from wgebpf.wireguard import counters
from wgebpf.wireguard.device import Device, DeviceError
from wgebpf.wireguard.keys import generate_private_key, public_key
from wgebpf.wireguard.messages import (DATA_HEADER, MESSAGE_DATA, MESSAGE_HANDSHAKE_INITIATION,
                                       MESSAGE_HANDSHAKE_RESPONSE, message_type)
from wgebpf.wireguard.noise import Keypair
from wgebpf.wireguard.scheduler import FakeClock

A_ADDRESS = ("192.0.2.1", 51820)
A_MAC = DEVICE_MAC


# --- doubles for what the kernel does in production ---------------------------------

class FakeSteering:
    """The reuseport program's index map: receiver index -> a socket
    position, or ("spread", W): by counter over positions 1..W
    (reuseport.spread_position, the program's formula). `full` makes it
    refuse new indices as the kernel map does (E2BIG)."""

    def __init__(self):
        self.index: dict[int, object] = {}
        self.full = False

    def set_index(self, receiver_index: int, position: int) -> None:
        self._set(receiver_index, position)

    def set_spread(self, receiver_index: int, workers: int) -> None:
        self._set(receiver_index, ("spread", workers))

    def _set(self, receiver_index: int, entry) -> None:
        if self.full and receiver_index not in self.index:
            raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))
        self.index[receiver_index] = entry

    def position(self, receiver_index: int, counter: int) -> int:
        entry = self.index.get(receiver_index, 0)
        if isinstance(entry, tuple):
            return spread_position(counter, receiver_index, entry[1])
        return entry

    def remove_index(self, receiver_index: int) -> None:
        self.index.pop(receiver_index, None)


class FakeClassifier:
    """The tc classifier's per-peer allowed-ips, as the pool pushes them."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.spread = None

    def set_spread(self, spread: bool) -> None:
        self.spread = spread

    def set_peer(self, slot: int, networks) -> None:
        self.calls.append(("set", slot, sorted(map(str, networks))))

    def remove_peer(self, slot: int) -> None:
        self.calls.append(("remove", slot))


class QueueTun:
    """The TAP's queues as datagram socketpairs: the pool hands `fds[k]` to
    worker k; the test reads and writes `ends[k]`, the kernel's side."""

    def __init__(self, queues: int):
        self.mac = A_MAC
        self.fds: list[int] = []
        self.ends: list[socket.socket] = []
        self._ours: list[socket.socket] = []
        self.received: list[tuple[bytes, int]] = []   # what the control plane writes
        for _ in range(queues):
            ours, kernel_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            kernel_side.setblocking(False)
            self._ours.append(ours)
            self.ends.append(kernel_side)
            self.fds.append(ours.fileno())

    def write(self, packet: bytes, queue: int = 0) -> None:
        self.received.append((bytes(packet), queue))

    def to_worker(self, queue: int, packet: bytes, slot: int) -> None:
        self.ends[queue].send(tap_frame(packet, slot))

    def frames(self, queue: int) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.ends[queue].recv(65536))
            except BlockingIOError:
                return out

    def from_worker(self, queue: int) -> list[tuple[int, bytes]]:
        """(slot, packet) for each frame worker `queue` wrote."""
        return [untag(f) for f in self.frames(queue)]

    def from_workers(self) -> dict[int, list[tuple[int, bytes]]]:
        """What every worker wrote, by worker (those that wrote anything)."""
        out = {k: self.from_worker(k) for k in range(1, len(self.ends))}
        return {k: v for k, v in out.items() if v}

    def close(self) -> None:
        for sock in self._ours + self.ends:
            sock.close()


class PoolConn(MemoryConn):
    """A's UDP side: the control plane sends from it; `position(k)` are the
    sockets worker k gets (real, unbound: the worker only needs fds)."""

    def __init__(self, network, address):
        super().__init__(network, address)
        self.positions: dict[int, list[socket.socket]] = {}

    def position(self, k: int) -> list[socket.socket]:
        if k not in self.positions:
            self.positions[k] = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                                 socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)]
        return self.positions[k]

    def close(self) -> None:
        for sockets in self.positions.values():
            for sock in sockets:
                sock.close()


class FakeProcess:
    """What WorkerPool keeps of a worker process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.code = None

    def poll(self):
        return self.code

    def kill(self):
        if self.code is None:
            self.code = -9

    def wait(self, timeout=None):
        return self.code


class RecordingWorker(Worker):
    """A Worker that remembers every control message it handled and the fds
    it was given (closed with the harness)."""

    def __init__(self, control, init, fds):
        self.init_fds = list(fds)
        super().__init__(control, init, fds)
        self.init = init
        self.handled: list = []

    def handle(self, message, fds):
        self.handled.append(message)
        super().handle(message, fds)

    def of(self, kind: type, slot: int | None = None) -> list:
        return [m for m in self.handled
                if isinstance(m, kind) and (slot is None or m.slot == slot)]

    def close(self) -> None:
        self.selector.close()
        self.control.close()
        os.close(self.tun.fd)
        for sock in self.conn.sockets:
            sock.close()
        if self.hints is not None:
            self.hints.close()


class Steered:
    """What the network delivers to A's address: data messages go to the
    worker whose position the steering map names (after it has read its
    control channel, as Worker.run does first), the rest to the control
    plane."""

    def __init__(self, harness):
        self.harness = harness

    def on_datagram(self, data: bytes, source: tuple) -> None:
        if message_type(data) == MESSAGE_DATA:
            _, receiver, counter = DATA_HEADER.unpack_from(data)
            position = self.harness.steering.position(receiver, counter)
            self.harness.steered.append(position)
            worker = self.harness.workers.get(position)
            if worker is not None:
                worker._drain_control()
                worker.device.on_datagram(data, source)
                return
        self.harness.device.on_datagram(data, source)


class Harness:
    """Host A (a WorkerPool with `count` in-process workers) and its peers."""

    def __init__(self, count: int = 2, peer_spread: bool = True):
        self.clock = FakeClock(start=time.monotonic())   # keypair birthdates cross to workers
        self.network = MemoryNetwork()
        self.private_key = generate_private_key()
        self.public_key = public_key(self.private_key)
        self.tun = QueueTun(count + 1)
        self.conn = PoolConn(self.network, A_ADDRESS)
        self.device = Device("pooltest", self.private_key, clock=self.clock, tun=self.tun,
                             conn=self.conn, addresses=[ipaddress.ip_interface("198.51.100.1/24")])
        self.conn.device = Steered(self)
        self.steering = FakeSteering()
        self.classifier = FakeClassifier()
        self.launched: list = []        # worker ends not yet booted
        self.workers: dict[int, RecordingWorker] = {}
        self.dead: list[RecordingWorker] = []
        self.sent_by: list[tuple[int, bytes, tuple]] = []   # (worker, datagram, endpoint)
        self.steered: list[int] = []    # the position each data message to A was steered to
        self.pids = iter(range(1000, 100000))
        self.pool = WorkerPool(self.device, self.tun, self.conn, count, reuseport=self.steering,
                               classifier=self.classifier, launcher=self._launch,
                               peer_spread=peer_spread)
        self.device.dataplane = self.pool
        self.pool.start()
        self.peers: dict[int, Host] = {}
        self.pump()

    def _launch(self, theirs: socket.socket) -> FakeProcess:
        self.launched.append(theirs)
        return FakeProcess(next(self.pids))

    def _boot(self) -> None:
        """Start the Worker objects on the channel ends the pool launched,
        reading Init as worker.main does."""
        for theirs in self.launched:
            init, fds = channel.receive(theirs)
            assert isinstance(init, Init)
            theirs.setblocking(False)
            worker = RecordingWorker(theirs, init, fds)
            worker.conn.send = self._uplink(worker)
            worker.conn.send_run = self._uplink_run(worker)
            self.workers[init.worker_id] = worker
        self.launched.clear()

    def _uplink(self, worker):
        # A worker's own UDP socket sends from A's address too (SO_REUSEPORT).
        def send(data: bytes, endpoint: tuple) -> None:
            item = (bytes(data), A_ADDRESS, tuple(endpoint))
            self.network.in_flight.append(item)
            self.network.sent_log.append(item)
            self.sent_by.append((worker.id, item[0], item[2]))
        return send

    def _uplink_run(self, worker):
        # A run of equal-size datagrams (one GSO send on a real socket).
        def send_run(sock, view, size: int, endpoint: tuple) -> None:
            for start in range(0, len(view), size):
                worker.conn.send(view[start:start + size], endpoint)
        return send_run

    def pump(self, rounds: int = 20) -> None:
        """Run workers, pool and network until nothing moves."""
        quiet = 0
        while quiet < 2 and rounds:
            rounds -= 1
            self._boot()
            moved = False
            for worker in self.workers.values():
                before = len(worker.handled)
                worker._drain_control()
                worker._drain_tun()
                moved |= len(worker.handled) != before or bool(worker.outbox or worker.events)
                worker.flush(force=True)
            for handle in self.pool.workers:
                if handle.control is not None:
                    moved |= self.pool.on_readable(handle) is not None
            moved |= self.network.pump() > 0
            quiet = 0 if moved else quiet + 1

    def add_peer(self, n: int) -> Host:
        """Peer host n (198.51.100.n, 2001:db8:100::n, 192.0.2.n), peered with A both ways."""
        host = Host(self.network, self.clock, f"198.51.100.{n}/24", (f"192.0.2.{n}", 51820))
        peer = self.device.add_peer(host.public_key)
        self.device.add_allowed_ip(peer, f"198.51.100.{n}/32")
        self.device.add_allowed_ip(peer, f"2001:db8:100::{n}/128")
        peer.set_endpoint(host.conn.address)
        host.add_peer_a = host.device.add_peer(self.public_key)
        host.device.add_allowed_ip(host.add_peer_a, "198.51.100.1/32")
        host.device.add_allowed_ip(host.add_peer_a, "2001:db8:100::1/128")
        host.add_peer_a.set_endpoint(A_ADDRESS)
        self.peers[peer.queue] = host
        self.pump()
        return host

    def peer(self, host: Host):
        return self.device.peers[host.public_key]

    def slot(self, host: Host) -> int:
        return self.peer(host).queue

    def send_from(self, host: Host, v6: bool = False) -> bytes:
        """A packet from the host to A, through the tunnel."""
        if v6:
            packet = ipv6_packet(f"2001:db8:100::{host.address.rsplit('.', 1)[1]}",
                                 "2001:db8:100::1", os.urandom(24))
        else:
            packet = ipv4_packet(host.address, "198.51.100.1", os.urandom(24))
        host.device.on_tun_packet(packet)
        self.pump()
        return packet

    def send_to(self, host: Host, queue: int = 1) -> bytes:
        """A packet from A to the host, as the kernel queues it: tagged with
        the host's slot, on the queue of the worker its flow hashed to."""
        packet = ipv4_packet("198.51.100.1", host.address, os.urandom(24))
        self.tun.to_worker(queue, packet, self.slot(host))
        self.pump()
        return packet

    def collect_stats(self) -> None:
        """Every worker reports its counters (as it does every STATS_INTERVAL)."""
        for handle in self.pool.workers:
            self.pool._send(handle, StatsRequest())
        self.pump()

    def kill(self, position: int) -> None:
        """The worker process dies: its channel end closes."""
        worker = self.workers.pop(position)
        self.pool.workers[position - 1].process.code = 1
        worker.close()
        self.dead.append(worker)
        self.pump()

    def handshakes_sent(self, since: int = 0) -> list[int]:
        return [message_type(d) for d, s, t in self.network.sent_log[since:]
                if message_type(d) in (MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE)]

    def initiations_to(self, since: int = 0) -> list[tuple]:
        """Where A sent handshake initiations, in order."""
        return [t for d, s, t in self.network.sent_log[since:]
                if s == A_ADDRESS and message_type(d) == MESSAGE_HANDSHAKE_INITIATION]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        for theirs in self.launched:
            theirs.close()
        for handle in self.pool.workers:
            self.pool._close_control(handle)
        if self.pool.hints is not None:
            self.pool.hints.close()
        self.tun.close()
        self.conn.close()


@pytest.fixture
def h(request):
    harness = Harness(getattr(request, "param", 2))
    yield harness
    harness.close()


def connected(h: Harness, n: int) -> Host:
    """Add peer n and let it handshake (it initiates, A answers)."""
    host = h.add_peer(n)
    packet = h.send_from(host)
    assert [p for _, got in h.tun.from_workers().items() for p in got] == [(h.slot(host), packet)]
    return host


def initiated_by_a(h: Harness, n: int) -> Host:
    """Add peer n; A's first packet for it makes A initiate."""
    host = h.add_peer(n)
    packet = h.send_to(host, queue=1)
    assert host.tun.received == [packet]
    host.tun.received.clear()
    return host


def data_counters(h: Harness, host: Host | None = None,
                  since: int = 0) -> list[tuple[int, int, int]]:
    """(worker, receiver index, counter) of each data message a worker sent
    (to `host` only, if given)."""
    out = []
    for worker, data, endpoint in h.sent_by[since:]:
        if (host is None or endpoint == host.conn.address) and message_type(data) == MESSAGE_DATA:
            _, receiver, counter = DATA_HEADER.unpack_from(data)
            out.append((worker, receiver, counter))
    return out


# --- every worker serves every peer -------------------------------------------------------

def test_each_worker_gets_its_own_queue_the_device_mac_and_the_counter_hints(h):
    assert sorted(h.workers) == [1, 2]
    for k, worker in h.workers.items():
        init = worker.init
        assert (init.worker_id, init.name, init.mtu, init.mac, init.workers) == \
            (k, "pooltest", h.device.mtu, A_MAC, 2)
        # Its queue first: the same queue as the pool's queue k (a dup of it).
        assert os.fstat(worker.init_fds[0]).st_ino == os.fstat(h.tun.fds[k]).st_ino
        assert worker.hints is not None
        assert (worker.hints.rows, worker.hints.workers) == (HINT_ROWS, 2)
    # They share the region: what one publishes the other reads.
    h.workers[1].hints.publish(5, 0, 777)
    assert h.workers[2].hints.highest(5) == 777 == h.pool.hints.cell(5, 0)


def test_one_worker_gets_no_counter_hints():
    h = Harness(1)
    try:
        assert h.pool.hints is None
        worker = h.workers[1]
        assert worker.hints is None
        assert len(worker.init_fds) == 3              # its queue, its IPv4 and IPv6 sockets
        host = connected(h, 2)
        assert h.send_to(host) == host.tun.received[-1]
    finally:
        h.close()


def test_without_peer_spread_a_peer_has_one_worker_both_ways():
    """The default: the classifier queues all of a peer's packets to its own
    worker (1 + (slot - 1) % W) and that worker receives its sessions, so
    peers, not flows or counters, spread over the workers; every worker
    still holds every peer (a move is a matter of steering)."""
    h = Harness(2, peer_spread=False)
    try:
        assert h.classifier.spread is False
        assert h.pool.windows is None                  # no shared windows needed
        hosts = [connected(h, n) for n in (2, 3, 4, 5)]
        for host in hosts:
            peer = h.peer(host)
            own = h.pool.worker_of(peer.queue)
            assert own == 1 + (peer.queue - 1) % 2
            [index] = [i for i, (owner, thing) in h.device.indices.items()
                       if owner is peer and thing is not peer.handshake]
            assert h.steering.index[index] == own
            before = len(h.steered)
            for _ in range(5):
                h.send_from(host)
            assert set(h.steered[before:]) == {own}
            assert h.send_to(host, queue=own) == host.tun.received[-1]
        assert {h.pool.worker_of(h.peer(host).queue) for host in hosts} == {1, 2}
        assert [w["peers"] for w in h.pool.status()] == [2, 2]     # each its own two
    finally:
        h.close()


def test_every_worker_gets_every_peer_and_every_keypair(h):
    b, c = connected(h, 2), connected(h, 3)
    slots = [h.slot(b), h.slot(c)]
    assert slots == [1, 2]
    for worker in h.workers.values():
        assert sorted(worker.by_slot) == slots
        assert [m.slot for m in worker.of(PeerAdd)] == slots
        assert worker.by_slot[1].public_key == b.public_key
        assert worker.by_slot[1].endpoint == b.conn.address
    for slot in slots:
        installs = {k: w.of(InstallKeypair, slot) for k, w in h.workers.items()}
        assert all(len(m) == 1 for m in installs.values())
        index = installs[1][0].state["local_index"]
        same = ("sending_key", "receiving_key", "initiator", "remote_index", "send_counter")
        assert [installs[2][0].state[k] for k in same] == [installs[1][0].state[k] for k in same]
        assert installs[2][0].state["local_index"] == index
        # Its data is spread over both workers by counter; they share its replay window.
        assert h.steering.index[index] == ("spread", 2)
        row = installs[1][0].state["replay_row"]
        assert installs[2][0].state["replay_row"] == row
        for k, worker in h.workers.items():
            pairs = worker.by_slot[slot].keypairs
            held = [kp for kp in (pairs.current, pairs.next) if kp is not None]
            assert [kp.local_index for kp in held] == [index]
            # Sealing takes counters from this worker's share.
            assert isinstance(held[0].share, counters.SendCounter)
            assert worker.device.indices[index][1] is held[0]
        # The control plane kept no usable copy of the session keys.
        _, pool_keypair = h.device.indices[index]
        assert not pool_keypair.valid


def test_a_message_one_worker_accepted_is_a_replay_at_the_other(h):
    """The workers of a spread session share its replay window: a message
    that reaches another worker than the steering picked (UDP GRO steers a
    merged burst by its first message) is still accepted only once."""
    host = connected(h, 2)
    data = [d for d, s, t in h.network.sent_log
            if s == host.conn.address and message_type(d) == MESSAGE_DATA][-1]
    first = h.steered[-1]
    other = h.workers[3 - first]
    before = other.device.drops["replay"]
    other.device.on_datagram(data, host.conn.address)
    assert other.device.drops["replay"] == before + 1
    assert h.tun.from_workers() == {}


def test_a_full_steering_map_refuses_the_session(h):
    host = h.add_peer(2)
    peer = h.peer(host)
    h.steering.full = True
    keypair = Keypair(b"\x01" * 32, b"\x02" * 32, False, 0x1234, 0x5678, h.clock.monotonic(),
                      peer)
    h.pool.install_keypair(peer, keypair)
    h.pump()

    assert h.device.drops["index_refused"] == 1
    assert peer.drops["index_refused"] == 1
    assert not keypair.valid                   # zeroed, not installed anywhere
    assert 0x1234 not in h.steering.index
    for worker in h.workers.values():
        assert worker.of(InstallKeypair) == []
        pairs = worker.by_slot[peer.queue].keypairs
        assert pairs.current is None and pairs.next is None


def test_a_keypair_for_a_slot_the_worker_lacks_is_ignored(h):
    worker = h.workers[1]
    state = Keypair(b"\x01" * 32, b"\x02" * 32, True, 7, 8, time.monotonic()).export()
    worker.handle(InstallKeypair(9, state), [])
    assert 7 not in worker.device.indices and worker.outbox == []


def test_commands_for_a_peer_go_to_every_worker_and_a_keepalive_to_one():
    h = Harness(3)
    try:
        hosts = [initiated_by_a(h, n) for n in (2, 3, 4)]
        for host in hosts:
            peer = h.peer(host)
            before = {k: len(w.of(SendKeepalive)) for k, w in h.workers.items()}
            h.pool.send_keepalive(peer)
            h.pump()
            got = {k: len(w.of(SendKeepalive)) - before[k] for k, w in h.workers.items()}
            chosen = h.pool.worker_of(peer.queue)            # the peer's own worker
            assert got == {k: int(k == chosen) for k in (1, 2, 3)}
            # The keepalive left, sealed by that worker.
            assert data_counters(h)[-1][0] == chosen
        gone = h.peer(hosts[1])
        h.device.remove_peer(hosts[1].public_key)
        h.pump()
        for worker in h.workers.values():
            assert worker.of(ZeroKeys, gone.queue) and worker.of(PeerRemove, gone.queue)
            assert sorted(worker.by_slot) == [1, 3]
    finally:
        h.close()


# --- send: any worker, any peer -------------------------------------------------------------

@pytest.mark.parametrize("initiator", ["peer", "a"])
def test_one_peer_sends_through_both_workers_with_counters_from_each_share(h, initiator):
    """Flows of one peer hashed to both workers: every packet arrives, on the
    one session, and no counter is used twice: each worker takes its own
    blocks of the keypair's counter space (counters.py)."""
    host = connected(h, 2) if initiator == "peer" else initiated_by_a(h, 2)
    slot = h.slot(host)
    # Confirmed (by the peer's first data, which one worker received): every
    # worker may send on it now.
    index = h.workers[1].of(InstallKeypair, slot)[-1].state["local_index"]
    for worker in h.workers.values():
        current = worker.by_slot[slot].keypairs.current
        assert current is not None and current.local_index == index, \
            f"worker {worker.id} cannot send on the confirmed session"
    since, handshakes = len(h.sent_by), len(h.network.sent_log)
    sent = []
    for round_ in range(4):                       # several batches: each takes anew
        for queue in (1, 2, 2, 1):
            for _ in range(round_ + 1):
                packet = ipv4_packet("198.51.100.1", host.address, os.urandom(30))
                h.tun.to_worker(queue, packet, slot)
                sent.append(packet)
        h.pump()

    assert sorted(host.tun.received) == sorted(sent)
    assert not host.device.drops
    assert h.handshakes_sent(handshakes) == []            # the session made before serves
    seen = data_counters(h, host, since)
    assert len(seen) == len(sent)
    assert {worker for worker, _, _ in seen} == {1, 2}
    assert len({index for _, index, _ in seen}) == 1
    numbers = [counter for _, _, counter in seen]
    assert len(set(numbers)) == len(numbers)              # never one counter twice
    block = counters.block_size(2)
    for worker in (1, 2):
        mine = [counter for w, _, counter in seen if w == worker]
        assert mine == sorted(mine)                       # a worker never goes back
        assert all(counter // block % 2 == worker - 1 for counter in mine)


def test_a_frame_naming_an_unknown_slot_is_dropped_and_the_others_go_on(h):
    host = initiated_by_a(h, 2)
    slot = h.slot(host)
    h.collect_stats()
    first, second = (ipv4_packet("198.51.100.1", host.address, os.urandom(20)) for _ in "ab")
    h.tun.to_worker(1, first, slot)
    h.tun.to_worker(1, ipv4_packet("198.51.100.1", "198.51.100.77"), 77)     # no such peer
    h.tun.ends[1].send(tcpgro.PLAIN_HDR + A_MAC + A_MAC + ETH_P_IP + first)   # no tag at all
    h.tun.to_worker(1, second, slot)
    h.pump()

    assert host.tun.received == [first, second]
    assert h.workers[1].device.drops["unknown_peer"] == 2
    h.collect_stats()
    assert h.device.drops["unknown_peer"] == 2
    assert h.peer(host).drops["unknown_peer"] == 0        # not the peer's: it has no peer


def test_allowed_ips_are_pushed_for_the_peer_that_changed_and_the_one_it_took_from(h):
    b, c = h.add_peer(2), h.add_peer(3)
    sb, sc = h.slot(b), h.slot(c)
    h.classifier.calls.clear()
    h.device.add_allowed_ip(h.peer(c), "203.0.113.0/24")
    assert h.classifier.calls == [("set", sc, ["198.51.100.3/32", "2001:db8:100::3/128",
                                               "203.0.113.0/24"])]
    h.classifier.calls.clear()
    h.device.add_allowed_ip(h.peer(b), "203.0.113.0/24")            # B takes it from C
    assert sorted(h.classifier.calls) == [
        ("set", sb, ["198.51.100.2/32", "2001:db8:100::2/128", "203.0.113.0/24"]),
        ("set", sc, ["198.51.100.3/32", "2001:db8:100::3/128"])]
    h.classifier.calls.clear()
    h.device.remove_peer(b.public_key)
    assert h.classifier.calls == [("remove", sb)]


# --- receive ---------------------------------------------------------------------------------

def test_packets_a_worker_receives_carry_the_peers_tag_as_source(h):
    b, c = connected(h, 2), connected(h, 3)
    got = []
    for host, v6 in ((b, False), (c, False), (b, True), (c, True)):
        packet = h.send_from(host, v6=v6)
        written = h.tun.from_workers()
        assert len(written) == 1                   # the one worker its session is steered to
        (queue, frames), = written.items()
        assert queue == h.steered[-1]
        got += frames
        assert frames == [(h.slot(host), packet)]   # untag checked dst, EtherType
    assert [slot for slot, _ in got] == [1, 2, 1, 2]
    assert h.tun.frames(0) == [] and h.tun.received == []


# --- slots -----------------------------------------------------------------------------------

def test_slots_are_reused_lowest_first_after_removal(h):
    hosts = {n: h.add_peer(n) for n in (2, 3, 4, 5)}
    assert [h.slot(hosts[n]) for n in (2, 3, 4, 5)] == [1, 2, 3, 4]
    h.device.remove_peer(hosts[4].public_key)            # slot 3
    h.device.remove_peer(hosts[3].public_key)            # slot 2
    h.pump()
    for worker in h.workers.values():
        assert sorted(worker.by_slot) == [1, 4]
        assert [m.slot for m in worker.of(PeerRemove)] == [3, 2]
    assert [h.slot(h.add_peer(n)) for n in (6, 7, 8)] == [2, 3, 5]
    # The new holder of a reused slot is served under it, by every worker.
    new = h.peers[2]
    for worker in h.workers.values():
        assert worker.by_slot[2].public_key == new.public_key
    packet = h.send_from(new)
    (receiver, got), = h.tun.from_workers().items()
    assert got == [(2, packet)]
    assert h.send_to(new, queue=receiver) == new.tun.received[-1]


def test_slots_end_at_65535(h):
    assert MAX_SLOTS == 65535
    h.pool.next_slot = MAX_SLOTS
    last = h.device.add_peer(public_key(generate_private_key()))
    assert last.queue == 65535 and tag(65535) == b"\x02\x77\x00\x00\xff\xff"
    with pytest.raises(DeviceError) as refused:
        h.device.add_peer(public_key(generate_private_key()))
    assert refused.value.errno == errno.ENOSPC
    assert len(h.device.peers) == 1
    h.device.remove_peer(last.public_key)
    assert h.device.add_peer(public_key(generate_private_key())).queue == 65535


# --- event order -------------------------------------------------------------------------------

def test_worker_timer_events_reach_the_peer_timers_in_order(h):
    host = connected(h, 2)
    peer = h.peer(host)
    seen = []
    peer.timers.any_authenticated_packet_received = lambda: seen.append("auth_received")
    peer.timers.data_received = lambda: seen.append("data_received")
    peer.timers.any_authenticated_packet_traversal = lambda: seen.append("traversal")
    h.send_from(host)
    assert seen == ["auth_received", "data_received", "traversal"]


# --- stats -------------------------------------------------------------------------------------

def test_stats_travel_as_a_typed_record_with_only_the_peers_that_had_traffic(h):
    busy, idle = initiated_by_a(h, 2), h.add_peer(3)
    h.collect_stats()
    h.send_to(busy, queue=1)
    stats = h.workers[1].stats()
    assert isinstance(stats, Stats)
    assert list(stats.traffic_by_slot) == [h.slot(busy)]            # not the idle peer
    traffic = stats.traffic_by_slot[h.slot(busy)]
    assert isinstance(traffic, PeerTraffic) and (traffic.tx_packets, traffic.rx_packets) == (1, 0)
    assert h.workers[1].stats().traffic_by_slot == {}               # since the last report
    assert h.slot(idle) not in h.workers[2].stats().traffic_by_slot


def test_stats_add_up_across_workers(h):
    b, c = initiated_by_a(h, 2), initiated_by_a(h, 3)
    h.collect_stats()
    pb, pc = h.peer(b), h.peer(c)
    before = {"b": (pb.stats.tx_packets, pb.stats.rx_packets, pb.tx_bytes, pb.rx_bytes),
              "c": (pc.stats.tx_packets, pc.stats.rx_packets)}
    traffic_before = [collections.Counter(w.traffic) for w in h.pool.workers]
    packets_before = [collections.Counter(w.packets) for w in h.pool.workers]
    since = len(h.sent_by)
    for _ in range(3):
        h.send_to(b, queue=1)
    for _ in range(2):
        h.send_to(b, queue=2)
    h.send_to(c, queue=2)
    for _ in range(4):
        h.send_from(b)
    h.collect_stats()

    assert pb.stats.tx_packets - before["b"][0] == 5
    assert pb.stats.rx_packets - before["b"][1] == 4
    assert pc.stats.tx_packets - before["c"][0] == 1 and pc.stats.rx_packets == before["c"][1]
    sent_bytes = sum(len(d) for _, d, e in h.sent_by[since:] if e == b.conn.address)
    assert pb.tx_bytes - before["b"][2] == sent_bytes
    tx = {1: 3, 2: 3}
    rx = {k: h.steered[-4:].count(k) for k in (1, 2)}           # B's four, by counter
    for k, handle in enumerate(h.pool.workers, 1):
        assert handle.traffic["tx_packets"] - traffic_before[k - 1]["tx_packets"] == tx[k]
        assert handle.traffic["rx_packets"] - traffic_before[k - 1]["rx_packets"] == rx[k]
    by_slot = [w.packets - packets_before[k] for k, w in enumerate(h.pool.workers)]
    assert by_slot[0] == {pb.queue: 3 + rx[1]}
    assert by_slot[1] == {pb.queue: 2 + rx[2], pc.queue: 1}
    status = h.pool.status()
    assert [s["peers"] for s in status] == [2, 2]
    assert all("worker" in s and s["alive"] for s in status)


# --- restarts -----------------------------------------------------------------------------------

def test_a_dead_worker_makes_the_peers_with_sessions_rehandshake_and_restarts_with_back_off(h):
    b, c = connected(h, 2), initiated_by_a(h, 3)
    d = h.add_peer(4)                                      # no session
    survivor = h.workers[2]
    pid = h.pool.workers[1].process.pid
    handle = h.pool.workers[0]
    old_indices = {h.slot(x): survivor.of(InstallKeypair, h.slot(x))[-1].state["local_index"]
                   for x in (b, c)}
    since = len(h.network.sent_log)

    # Up for long enough: restarted at once, no back-off.
    h.clock.advance(MIN_UPTIME + 1)
    h.kill(1)
    assert handle.restarts == 1 and handle.backoff == 0 and 1 in h.workers
    assert h.pool.workers[1].restarts == 0 and h.pool.workers[1].process.pid == pid
    assert h.workers[2] is survivor
    # Every session had a share in the dead worker: all dropped, everywhere.
    for slot, index in old_indices.items():
        assert survivor.of(ZeroKeys, slot)
        assert index not in h.steering.index and index not in h.device.indices
    assert not survivor.of(ZeroKeys, h.slot(d))
    # The peers that had one re-handshake (A initiates); the one without does not.
    assert sorted(h.initiations_to(since)) == sorted([b.conn.address, c.conn.address])
    assert sorted(h.workers[1].by_slot) == [1, 2, 3]
    for host in (b, c):
        peer_of_a = h.workers[1].by_slot[h.slot(host)]
        index = peer_of_a.keypairs.current.local_index
        assert index not in old_indices.values()
        assert survivor.by_slot[h.slot(host)].keypairs.current.local_index == index
        for queue in (1, 2):
            assert h.send_to(host, queue) == host.tun.received[-1]
        packet = h.send_from(host)
        assert [p for got in h.tun.from_workers().values() for p in got] == \
            [(h.slot(host), packet)]

    # Dying again at once: each restart waits twice as long, up to MAX_BACKOFF.
    waits = []
    for _ in range(7):
        h.clock.advance(0.1)
        h.kill(1)
        waits.append(handle.backoff)
        assert handle.control is None
        h.clock.advance(handle.backoff - 0.01)
        h.device.scheduler.run_due()
        assert handle.control is None         # not before its time
        h.clock.advance(0.01)
        h.device.scheduler.run_due()
        h.pump()
        assert handle.control is not None and 1 in h.workers
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, MAX_BACKOFF, MAX_BACKOFF]
    assert handle.restarts == 8
    assert h.pool.workers[1].restarts == 0 and h.workers[2] is survivor
    assert h.send_to(c, queue=2) == c.tun.received[-1]


def test_without_peer_spread_a_dead_worker_costs_only_its_own_peers_their_sessions():
    """A peer has one worker: when it dies, only the sessions of the peers it
    was the own worker of are dropped and re-made; the other worker's peers
    keep theirs (no re-handshake) and go on carrying traffic."""
    h = Harness(2, peer_spread=False)
    try:
        hosts = {n: connected(h, n) for n in (2, 3, 4, 5)}
        own = {n: h.pool.worker_of(h.slot(host)) for n, host in hosts.items()}
        mine = [n for n in hosts if own[n] == 1]
        theirs = [n for n in hosts if own[n] == 2]
        assert mine and theirs
        indices = {n: h.workers[2].by_slot[h.slot(host)].keypairs.current.local_index
                   for n, host in hosts.items()}
        since = len(h.network.sent_log)
        h.clock.advance(MIN_UPTIME + 1)
        h.kill(1)
        survivor = h.workers[2]
        for n in theirs:
            assert survivor.by_slot[h.slot(hosts[n])].keypairs.current.local_index == indices[n]
            assert indices[n] in h.device.indices
            assert h.send_to(hosts[n], queue=2) == hosts[n].tun.received[-1]
        for n in mine:
            assert indices[n] not in h.device.indices
        assert sorted(h.initiations_to(since)) == sorted(hosts[n].conn.address for n in mine)
        for n in mine:
            assert h.send_to(hosts[n], queue=1) == hosts[n].tun.received[-1]
    finally:
        h.close()


# --- the channel -------------------------------------------------------------------------------

def test_the_channel_carries_typed_messages_and_fds():
    ours, theirs = channel.pair()
    reader, writer = os.pipe()
    try:
        message = Init(2, "wg0", 1420, A_MAC, 2, HINT_ROWS)
        channel.send(ours, message, [reader])
        received, fds = channel.receive(theirs)
        assert received == message and received.mac == A_MAC and len(fds) == 1
        os.write(writer, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
        channel.send(ours, InstallKeypair(3, {"local_index": 7, "replay": None}))
        assert channel.receive(theirs) == (InstallKeypair(3, {"local_index": 7, "replay": None}),
                                           [])
        theirs.setblocking(False)
        assert channel.receive(theirs) is None          # nothing more waits
    finally:
        for fd in (reader, writer):
            os.close(fd)
        ours.close()
        theirs.close()


def test_the_channel_refuses_to_unpickle_other_classes():
    ours, theirs = channel.pair()
    try:
        ours.send(pickle.dumps(collections.OrderedDict()))
        ours.send(pickle.dumps(os.system))
        for _ in range(2):
            with pytest.raises(pickle.UnpicklingError):
                channel.receive(theirs)
    finally:
        ours.close()
        theirs.close()
