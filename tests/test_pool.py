"""WorkerPool (control plane) and Worker (data plane) in one process, over
real channel socketpairs: each Worker object sits on the far end of the
channel the pool made for it, instead of in a child process.

Host A is the pool's device with its in-process workers; its peers are
memnet Hosts on a MemoryNetwork. What the kernel does in production is
played by small doubles: TUN queues are AF_UNIX datagram socketpairs (the
worker gets real fds, as from a TUN device), and receive steering is a dict
from receiver index to socket position (the reuseport program's map), read
by the network when it delivers a data message to A. No root, no kernel
programs, no sleeping."""

import collections
import errno
import ipaddress
import logging
import os
import pickle
import socket
import struct
import time

from memnet import Host, MemoryConn, MemoryNetwork, ipv4_packet
from wgebpf.dataplane import channel
from wgebpf.dataplane.commands import (Init, InstallKeypair, PeerAdd, PeerRemove, PeerState,
                                       PeerTraffic, Stats)
from wgebpf.dataplane.pool import MAX_BACKOFF, MIN_UPTIME, WorkerPool
from wgebpf.dataplane.worker import Worker
from wgebpf.wireguard.device import Device
from wgebpf.wireguard.keys import generate_private_key, public_key
from wgebpf.wireguard.messages import (MESSAGE_DATA, MESSAGE_HANDSHAKE_INITIATION,
                                       MESSAGE_HANDSHAKE_RESPONSE, message_type)
from wgebpf.wireguard.noise import Keypair
from wgebpf.wireguard.scheduler import FakeClock

A_ADDRESS = ("192.0.2.1", 51820)


# --- doubles for what the kernel does in production ---------------------------------

class FakeSteering:
    """The reuseport program's index map: receiver index -> socket position.
    `full` makes it refuse new indices as the kernel map does (E2BIG)."""

    def __init__(self):
        self.index: dict[int, int] = {}
        self.full = False

    def set_index(self, receiver_index: int, position: int) -> None:
        if self.full and receiver_index not in self.index:
            raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))
        self.index[receiver_index] = position

    def remove_index(self, receiver_index: int) -> None:
        self.index.pop(receiver_index, None)


class QueueTun:
    """TUN queues as datagram socketpairs: the pool hands `fds[slot]` to a
    worker; the test reads and writes `ends[slot]`, the kernel's side."""

    def __init__(self):
        self.fds: list[int] = []
        self.ends: list[socket.socket] = []
        self._ours: list[socket.socket] = []
        self.received: list[bytes] = []          # what the control plane writes

    def add_queue(self) -> None:
        ours, kernel_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        kernel_side.setblocking(False)
        self._ours.append(ours)
        self.ends.append(kernel_side)
        self.fds.append(ours.fileno())

    def write(self, packet: bytes, queue: int = 0) -> None:
        self.received.append(bytes(packet))

    def from_worker(self, slot: int) -> list[bytes]:
        packets = []
        while True:
            try:
                packets.append(self.ends[slot].recv(65536))
            except BlockingIOError:
                return packets

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

    def __init__(self):
        self.pid = None
        self.code = None

    def poll(self):
        return self.code

    def kill(self):
        if self.code is None:
            self.code = -9

    def wait(self, timeout=None):
        return self.code


class RecordingWorker(Worker):
    """A Worker that remembers every control message it handled."""

    def __init__(self, *args):
        super().__init__(*args)
        self.handled: list = []

    def handle(self, message, fds):
        self.handled.append(message)
        super().handle(message, fds)


class Steered:
    """What the network delivers to A's address: data messages go to the
    worker whose position the steering map names (after it has read its
    control channel, as Worker.run does first), the rest to the control
    plane."""

    def __init__(self, harness):
        self.harness = harness

    def on_datagram(self, data: bytes, source: tuple) -> None:
        if message_type(data) == MESSAGE_DATA:
            receiver = struct.unpack_from("<I", data, 4)[0]
            position = self.harness.steering.index.get(receiver, 0)
            worker = self.harness.workers.get(position)
            if worker is not None:
                worker._drain_control()
                worker.device.on_datagram(data, source)
                return
        self.harness.device.on_datagram(data, source)


class Harness:
    """Host A (a WorkerPool with `count` in-process workers) and its peers."""

    def __init__(self, count: int = 2):
        self.clock = FakeClock(start=time.monotonic())   # keypair birthdates cross to workers
        self.network = MemoryNetwork()
        self.private_key = generate_private_key()
        self.public_key = public_key(self.private_key)
        self.tun = QueueTun()
        self.conn = PoolConn(self.network, A_ADDRESS)
        self.device = Device("pooltest", self.private_key, clock=self.clock, tun=self.tun,
                             conn=self.conn, addresses=[ipaddress.ip_interface("198.51.100.1/24")])
        self.conn.device = Steered(self)
        self.steering = FakeSteering()
        self.launched: list[socket.socket] = []        # worker ends not yet booted
        self.processes: dict[int, FakeProcess] = {}
        self.workers: dict[int, RecordingWorker] = {}
        self.pool = WorkerPool(self.device, self.tun, self.conn, count, reuseport=self.steering,
                               launcher=self._launch)
        self.device.dataplane = self.pool
        self.tun.add_queue()                           # queue 0: the control plane's
        self.pool.start()
        self.peers: dict[int, Host] = {}
        self.pump()

    def _launch(self, theirs: socket.socket) -> FakeProcess:
        self.launched.append(theirs)
        return FakeProcess()

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
            handle = self.pool.workers[init.worker_id - 1]
            self.processes[init.worker_id] = handle.process
        self.launched.clear()

    def _uplink(self, worker):
        # A worker's own UDP socket sends from A's address too (SO_REUSEPORT).
        def send(data: bytes, endpoint: tuple) -> None:
            item = (bytes(data), A_ADDRESS, tuple(endpoint))
            self.network.in_flight.append(item)
            self.network.sent_log.append(item)
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
                for slot in list(worker.by_slot):
                    worker._drain_tun(slot)
                moved |= len(worker.handled) != before or bool(worker.outbox or worker.events)
                worker.flush(force=True)
            for handle in self.pool.workers:
                if handle.control is not None:
                    moved |= self.pool.on_readable(handle) is not None
            moved |= self.network.pump() > 0
            quiet = 0 if moved else quiet + 1

    def add_peer(self, n: int) -> Host:
        """Peer host n (198.51.100.n, 192.0.2.n), peered with A both ways."""
        host = Host(self.network, self.clock, f"198.51.100.{n}/24", (f"192.0.2.{n}", 51820))
        peer = self.device.add_peer(host.public_key)
        self.device.add_allowed_ip(peer, f"198.51.100.{n}/32")
        peer.set_endpoint(host.conn.address)
        a_on_host = host.device.add_peer(self.public_key)
        host.device.add_allowed_ip(a_on_host, "198.51.100.1/32")
        a_on_host.set_endpoint(A_ADDRESS)
        self.peers[peer.queue] = host
        self.pump()
        return host

    def peer(self, host: Host):
        return self.device.peers[host.public_key]

    def send_from(self, host: Host) -> bytes:
        """A packet from the host to A, through the tunnel."""
        packet = ipv4_packet(host.address, "198.51.100.1", os.urandom(24))
        host.device.on_tun_packet(packet)
        self.pump()
        return packet

    def send_to(self, host: Host) -> bytes:
        """A packet from A to the host: into its TUN queue, as tc steers it."""
        packet = ipv4_packet("198.51.100.1", host.address, os.urandom(24))
        self.tun.ends[self.peer(host).queue].send(packet)
        self.pump()
        return packet

    def kill(self, position: int) -> None:
        """The worker process dies: its channel end closes."""
        worker = self.workers.pop(position)
        self.processes[position].code = 1
        worker.control.close()
        self.pump()

    def handshakes_sent(self, since: int = 0) -> list[int]:
        return [message_type(d) for d, s, t in self.network.sent_log[since:]
                if message_type(d) in (MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE)]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.control.close()
        for theirs in self.launched:
            theirs.close()
        for handle in self.pool.workers:
            self.pool._close_control(handle)
        self.tun.close()
        self.conn.close()


def harness(count: int = 2) -> Harness:
    return Harness(count)


def connected(h: Harness, n: int) -> Host:
    """Add peer n and let it handshake (it initiates, A answers)."""
    host = h.add_peer(n)
    packet = h.send_from(host)
    slot = h.peer(host).queue
    assert h.tun.from_worker(slot) == [packet]
    return host


# --- keypair hand-over ---------------------------------------------------------------

def test_the_pool_hands_each_new_keypair_to_the_owning_worker():
    h = harness(2)
    try:
        host = h.add_peer(2)
        slot = h.peer(host).queue
        owner = h.pool.worker_of[slot]
        assert slot in h.workers[owner.position].by_slot

        packet = h.send_from(host)                # handshake, then data
        assert h.tun.from_worker(slot) == [packet]

        installs = [m for m in h.workers[owner.position].handled if isinstance(m, InstallKeypair)]
        assert len(installs) == 1 and installs[0].slot == slot
        index = installs[0].state["local_index"]
        assert h.steering.index[index] == owner.position
        worker_peer = h.workers[owner.position].by_slot[slot]
        assert worker_peer.keypairs.current.local_index == index
        # The control plane kept no usable copy of the session keys.
        _, pool_keypair = h.device.indices[index]
        assert not pool_keypair.valid
        # No other worker heard of the peer or its session.
        other = h.workers[3 - owner.position]
        assert not any(getattr(m, "slot", None) == slot for m in other.handled)

        reply = h.send_to(host)                   # encrypted by the worker
        assert host.tun.received == [reply]
    finally:
        h.close()


def test_a_full_steering_map_refuses_the_session():
    h = harness(1)
    try:
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
        assert not any(isinstance(m, InstallKeypair) for m in h.workers[1].handled)
        assert h.workers[1].by_slot[peer.queue].keypairs.current is None
    finally:
        h.close()


# --- rebalance: a peer moves with its sessions ------------------------------------------

def three_peers_on_two_workers(h: Harness):
    """Peers 2, 3, 4 in slots 1, 2, 3: worker 1 has slots 1 and 3, worker 2 has slot 2."""
    hosts = [connected(h, n) for n in (2, 3, 4)]
    assert {s: w.position for s, w in h.pool.worker_of.items()} == {1: 1, 2: 2, 3: 1}
    return hosts


def test_removing_a_peer_moves_another_with_its_sessions_and_no_handshake():
    h = harness(2)
    try:
        b, c, d = three_peers_on_two_workers(h)
        old_data = [item for item in h.network.sent_log
                    if item[1] == d.conn.address and message_type(item[0]) == MESSAGE_DATA]
        h.send_to(d)                              # A's send counter to D moves on
        index = h.workers[1].by_slot[3].keypairs.current.local_index
        sent_before = len(h.network.sent_log)

        h.device.remove_peer(c.public_key)        # worker 2 is now empty: slot 3 moves
        h.pump()

        assert h.pool.worker_of[3].position == 2 and 3 not in h.workers[1].by_slot
        assert [w.slots for w in h.pool.workers] == [{1}, {3}]
        moved = h.workers[2].by_slot[3]
        assert moved.keypairs.current.local_index == index
        assert h.steering.index[index] == 2
        assert h.workers[2].device.indices[index][1] is moved.keypairs.current
        assert index not in h.workers[1].device.indices

        # Data both ways on the old session: no handshake, counters carried
        # over (D's replay window would drop a reused counter).
        packet = h.send_from(d)
        assert h.tun.from_worker(3) == [packet]
        reply = h.send_to(d)
        assert d.tun.received[-1] == reply and d.device.drops["replay"] == 0
        assert h.handshakes_sent(sent_before) == []

        # The replay window moved too: an old message from D is refused.
        h.workers[2].device.on_datagram(old_data[0][0], d.conn.address)
        assert h.workers[2].device.drops["replay"] == 1
        assert h.tun.from_worker(3) == []
    finally:
        h.close()


def test_removing_a_peer_while_it_is_moved_sends_no_second_peer_remove(caplog):
    """Regression (commit 08cae18): the old worker has already let the peer
    go; a second peer_remove made it crash with KeyError and restart."""
    h = harness(2)
    try:
        b, c, d = three_peers_on_two_workers(h)
        h.device.remove_peer(c.public_key)        # starts moving slot 3 off worker 1
        assert 3 in h.pool.pending_moves
        h.device.remove_peer(d.public_key)        # before worker 1 answered
        with caplog.at_level(logging.WARNING, logger="wgebpf"):
            h.pump()

        removes = [m for m in h.workers[1].handled if isinstance(m, PeerRemove) and m.slot == 3]
        assert removes == [PeerRemove(3, export=True)]
        assert "does not have" not in caplog.text
        # Its state came back to a pool that no longer has the peer: dropped.
        assert not any(isinstance(m, PeerAdd) and m.slot == 3 for m in h.workers[2].handled)
        assert h.pool.pending_moves == {} and 3 not in h.pool.worker_of
        assert all(w.restarts == 0 for w in h.pool.workers)
        packet = h.send_from(b)                   # the others carry on
        assert h.tun.from_worker(1) == [packet]
    finally:
        h.close()


def test_a_worker_dying_while_it_hands_a_peer_over_keeps_the_peer():
    """Its state never comes: the move is called off, and the peer
    re-handshakes on the restarted worker instead of being lost."""
    h = harness(2)
    try:
        b, c, d = three_peers_on_two_workers(h)
        h.clock.advance(MIN_UPTIME + 1)
        h.device.remove_peer(c.public_key)        # slot 3 is on its way to worker 2
        h.kill(1)                                 # before worker 1 answered

        assert h.pool.pending_moves == {} and h.pool.worker_of[3].position == 1
        assert sorted(h.workers[1].by_slot) == [1, 3]
        packet = h.send_from(d)
        assert h.tun.from_worker(3) == [packet]
    finally:
        h.close()


# --- event order ---------------------------------------------------------------------

def test_a_keypair_made_while_its_peer_moves_follows_it_to_the_new_worker():
    """The old worker has let the peer go and the new one does not have it
    yet: the keypair waits, and arrives after the peer itself."""
    h = harness(2)
    try:
        b, c, d = three_peers_on_two_workers(h)
        seen_by_old_worker = len(h.workers[1].handled)
        h.device.remove_peer(c.public_key)        # slot 3 is on its way to worker 2
        peer = h.peer(d)
        keypair = Keypair(os.urandom(32), os.urandom(32), False, 0xabcd, 0x4321,
                          h.clock.monotonic(), peer)
        h.pool.install_keypair(peer, keypair)
        assert h.steering.index[0xabcd] == 2      # steered to where the peer is going
        h.pump()

        since = h.workers[1].handled[seen_by_old_worker:]
        assert since == [PeerRemove(3, export=True)]
        kinds = [type(m) for m in h.workers[2].handled if getattr(m, "slot", None) == 3]
        assert kinds == [PeerAdd, InstallKeypair]
        assert h.workers[2].by_slot[3].keypairs.next.local_index == 0xabcd
        assert 0xabcd in h.workers[2].device.indices
    finally:
        h.close()


def test_a_keypair_for_a_slot_the_worker_lacks_is_ignored():
    h = harness(1)
    try:
        worker = h.workers[1]
        state = Keypair(b"\x01" * 32, b"\x02" * 32, True, 7, 8, time.monotonic()).export()
        worker.handle(InstallKeypair(9, state), [])
        assert 7 not in worker.device.indices and worker.outbox == []
    finally:
        h.close()


def test_worker_timer_events_reach_the_peer_timers_in_order():
    h = harness(1)
    try:
        host = connected(h, 2)
        peer = h.peer(host)
        seen = []
        peer.timers.any_authenticated_packet_received = lambda: seen.append("auth_received")
        peer.timers.data_received = lambda: seen.append("data_received")
        peer.timers.any_authenticated_packet_traversal = lambda: seen.append("traversal")
        h.send_from(host)
        assert seen == ["auth_received", "data_received", "traversal"]
    finally:
        h.close()


# --- stats ---------------------------------------------------------------------------

def test_stats_travel_as_a_typed_record_and_add_up():
    h = harness(1)
    try:
        host = connected(h, 2)
        peer = h.peer(host)
        h.send_to(host)
        worker = h.workers[1]
        stats = worker.stats()
        assert isinstance(stats, Stats)
        traffic = stats.traffic_by_slot[peer.queue]
        assert isinstance(traffic, PeerTraffic) and traffic.tx_packets == 1
        assert traffic.rx_packets == 1               # connected() sent one packet to A
        channel.send(worker.control, stats)
        h.pool.on_readable(h.pool.workers[0])
        assert (peer.stats.tx_packets, peer.stats.rx_packets) == (1, 1)
        assert peer.tx_bytes == traffic.tx_bytes and peer.rx_bytes == traffic.rx_bytes
        assert h.pool.workers[0].traffic["tx_packets"] == 1
    finally:
        h.close()


# --- restarts -------------------------------------------------------------------------

def test_a_dead_worker_is_restarted_with_back_off_and_its_peers_rehandshake():
    h = harness(2)
    try:
        b, c = connected(h, 2), connected(h, 3)
        handle = h.pool.workers[0]
        launches = []
        original = h.pool.launcher
        h.pool.launcher = lambda theirs: launches.append(theirs) or original(theirs)

        # Up for long enough: restarted at once, no back-off.
        h.clock.advance(MIN_UPTIME + 1)
        h.kill(1)
        assert handle.restarts == 1 and handle.backoff == 0 and len(launches) == 1
        assert 1 in h.workers and 1 in h.workers[1].by_slot
        assert h.tun.from_worker(1) == []
        packet = h.send_from(b)                   # B's old session died with the worker
        assert h.handshakes_sent()[-2:] == [MESSAGE_HANDSHAKE_INITIATION,
                                            MESSAGE_HANDSHAKE_RESPONSE]
        assert h.tun.from_worker(1) == [packet]

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
        # The other worker's peer never noticed.
        assert h.pool.workers[1].restarts == 0
        packet = h.send_from(c)
        assert h.tun.from_worker(2) == [packet]
    finally:
        h.close()


# --- the channel -----------------------------------------------------------------------

def test_the_channel_carries_typed_messages_and_fds():
    ours, theirs = channel.pair()
    reader, writer = os.pipe()
    try:
        message = PeerState(3, (), (b"staged",))
        channel.send(ours, message, [reader])
        received, fds = channel.receive(theirs)
        assert received == message and len(fds) == 1
        os.write(writer, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
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
            try:
                channel.receive(theirs)
            except pickle.UnpicklingError:
                continue
            raise AssertionError("unpickled a class that is not a channel message")
    finally:
        ours.close()
        theirs.close()
