"""The workers' batched data path (wgebpf/dataplane/batch.py) over real
kernel objects: UDP sockets on loopback (UDP GSO and GRO work there), AF_UNIX
datagram socketpairs standing in for a peer's TUN queue, real cryptography.

The sessions come from in-memory Devices (tests/memnet.py) that handshake
over a MemoryNetwork; the data messages are then carried by real sockets.
Where a message must be made independently of the code under test, it is
sealed by the per-packet reference path (send.encrypt_and_send) and opened
by it (Device.on_datagram). No root-only features, no namespaces, no sleeping
beyond waiting for loopback delivery.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import struct
import time
import types

import pytest
from hypothesis import given, strategies as st

from memnet import (DEVICE_MAC, Host, MemoryNetwork, frame_source, ipv4_packet, ipv6_packet,
                    tap_frame, untag)
from wgebpf.dataplane import channel, tcpgro
from wgebpf.dataplane import worker as worker_mod
from wgebpf.dataplane.batch import MESSAGE_OVERHEAD, RECEIVE_CALLS, ReceiveBatch, SendBatch, _Run
from wgebpf.dataplane.commands import Init, InstallKeypair, PeerAdd, ReleasedIndices, TimerEvents
from wgebpf.dataplane.tun import TUN_BATCH
from wgebpf.dataplane.udp import (GSO_MAX_BYTES, GSO_MAX_SEGMENTS, SOL_UDP, UDP_GRO, UDP_SEGMENT,
                                  SegmentSender, UDPConn, enable_gro, receive_coalesced)
from wgebpf.dataplane.worker import (AUTH_RECEIVED, AUTH_SENT, DATA_RECEIVED, DATA_SENT,
                                     EVENT_INTERVAL, STATS_INTERVAL, TRAVERSAL, EventRecorder,
                                     Worker, WorkerConn, WorkerTun)
from wgebpf.wireguard import counters, send
from wgebpf.wireguard.messages import (DATA_HEADER, MESSAGE_DATA, MESSAGE_HANDSHAKE_INITIATION,
                                       REJECT_AFTER_MESSAGES, message_type)
from wgebpf.wireguard.scheduler import FakeClock

MTU = 1420
FULL = MTU + MESSAGE_OVERHEAD            # a full packet's data message: 1452 bytes
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_NO_CHECK = 11
BUFFER = 8 << 20
WAIT = 3.0


# --- kernel objects ------------------------------------------------------------------------

def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER)


def _loopback(family: int) -> str:
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


class CountingSocket(socket.socket):
    """A UDP socket that counts the datagrams its recvmsg_into calls return
    (a coalesced read counts every datagram in it), so a test can wait for
    exactly what it sent, whatever the loopback's timing."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.datagrams = 0
        self.calls: list[tuple[int, int]] = []          # (bytes, datagram size) per read

    def recvmsg_into(self, buffers, ancbufsize=0, flags=0):
        result = super().recvmsg_into(buffers, ancbufsize, flags)
        nbytes, size = result[0], result[0]
        for level, kind, data in result[1]:
            if level == SOL_UDP and kind == UDP_GRO:
                size = struct.unpack("=i", data[:4])[0] or nbytes
        self.calls.append((nbytes, size))
        self.datagrams += -(-nbytes // size) if size else 1
        return result


class Kernel:
    """Every socket a test opens, closed at the end."""

    def __init__(self):
        self.sockets: list[socket.socket] = []

    def udp(self, family=socket.AF_INET, gro=False, bind=True, cls=socket.socket):
        sock = cls(family, socket.SOCK_DGRAM)
        self.sockets.append(sock)
        _big_buffers(sock)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if bind:
            sock.bind((_loopback(family), 0))
        sock.setblocking(False)
        if gro:
            assert enable_gro(sock)
        return sock

    def queue(self) -> tuple[socket.socket, socket.socket]:
        """A TUN queue: (the worker's end, the kernel's end), both non-blocking."""
        ours, kernel_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for sock in (ours, kernel_side):
            _big_buffers(sock)
            sock.setblocking(False)
            self.sockets.append(sock)
        return ours, kernel_side

    def conn(self) -> WorkerConn:
        """A WorkerConn on its own pair of loopback sockets (it takes the fds)."""
        fds = []
        for family in (socket.AF_INET, socket.AF_INET6):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            _big_buffers(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((_loopback(family), 0))
            fds.append(sock.detach())
        conn = WorkerConn(fds)
        self.sockets.extend(conn.sockets)
        return conn

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def kernel():
    k = Kernel()
    yield k
    k.close()


def address(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return name[0], name[1]


def wait_readable(sock: socket.socket) -> None:
    select.select([sock], [], [], WAIT)


def receive_all(sock: socket.socket, count: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """`count` datagrams (split from coalesced reads) and (bytes, size) per read."""
    buf = bytearray(65536)
    datagrams, reads = [], []
    deadline = time.monotonic() + WAIT
    while len(datagrams) < count and time.monotonic() < deadline:
        try:
            nbytes, ancillary, _, _ = sock.recvmsg_into([buf], socket.CMSG_SPACE(4))
        except BlockingIOError:
            wait_readable(sock)
            continue
        size = nbytes
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO:
                size = struct.unpack("=i", data[:4])[0] or nbytes
        reads.append((nbytes, size))
        datagrams.extend(bytes(buf[i:min(i + size, nbytes)]) for i in range(0, nbytes, size))
    return datagrams, reads


def nothing_waits(sock: socket.socket, settle: float = 0.05) -> bool:
    return not select.select([sock], [], [], settle)[0]


def read_queue(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


def gso_send(sock: socket.socket, datagrams: list[bytes], destination: tuple) -> None:
    """One sendmsg of back-to-back datagrams (all of the first's size but the
    last), as a GSO sender does; a single datagram goes as it is."""
    if len(datagrams) == 1:
        sock.sendto(datagrams[0], destination)
        return
    size = len(datagrams[0])
    assert all(len(d) == size for d in datagrams[:-1]) and len(datagrams[-1]) <= size
    sock.sendmsg([b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0,
                 destination)


def gso_groups(datagrams: list[bytes]) -> list[list[bytes]]:
    """Consecutive datagrams cut into what one GSO send can carry."""
    groups: list[list[bytes]] = []
    for d in datagrams:
        g = groups[-1] if groups else None
        if (g and len(d) <= len(g[0]) and len(g[-1]) == len(g[0]) and len(g) < GSO_MAX_SEGMENTS
                and sum(map(len, g)) + len(d) <= GSO_MAX_BYTES):
            g.append(d)
        else:
            groups.append([d])
    return groups


# --- sessions ---------------------------------------------------------------------------

class Net:
    """B (198.51.100.2) with two peers, A (.1, B's TUN queue 1) and C (.3,
    queue 2); A and C have each handshaken with B (they initiated) over a
    MemoryNetwork, so all four directions have a confirmed current keypair.
    The clock starts at the real monotonic time, so keypairs can cross to a
    real Worker."""

    def __init__(self):
        self.clock = FakeClock(start=time.monotonic())
        self.network = MemoryNetwork()
        self.b = Host(self.network, self.clock, "198.51.100.2/24", ("192.0.2.2", 51821))
        self.a = self._connect(1, queue=1)
        self.c = self._connect(3, queue=2)

    def _connect(self, n: int, queue: int) -> Host:
        host = Host(self.network, self.clock, f"198.51.100.{n}/24", (f"192.0.2.{n}", 51820))
        host.add_peer(self.b, ["198.51.100.2/32", "2001:db8:100::2/128"])
        on_b = self.b.add_peer(host, [f"198.51.100.{n}/32", f"2001:db8:100::{n}/128"],
                               endpoint=False)
        on_b.queue = queue
        first = ipv4_packet(host.address, "198.51.100.2")
        host.device.on_tun_packet(first)
        self.network.pump()
        assert self.b.tun.received == [first]
        self.b.tun.received.clear()
        # B answers, so the session is used both ways.
        self.b.device.on_tun_packet(ipv4_packet("198.51.100.2", host.address))
        self.network.pump()
        assert len(host.tun.received) == 1
        self.network.sent_log.clear()
        return host

    def to_b(self, host: Host):
        """host's peer entry for B."""
        return host.device.peers[self.b.public_key]

    def on_b(self, host: Host):
        """B's peer entry for host."""
        return self.b.device.peers[host.public_key]

    def seal(self, host: Host, packets: list[bytes]) -> list[bytes]:
        """Data messages from host to B, by the per-packet reference path."""
        peer = self.to_b(host)
        keypair = peer.keypairs.current
        conn = host.device.conn
        sent = []
        host.device.conn = types.SimpleNamespace(send=lambda data, endpoint: sent.append(bytes(data)))
        try:
            for packet in packets:
                send.encrypt_and_send(host.device, peer, keypair, packet)
        finally:
            host.device.conn = conn
        return sent

    def keepalive(self, host: Host) -> bytes:
        return self.seal(host, [b""])[0]


def packet(host_n: int, size: int, v6: bool = False, tag: int = 0) -> bytes:
    """An IPv4/IPv6 UDP packet of exactly `size` bytes from 198.51.100.n (or
    2001:db8:100::n) to B, its payload unique by `tag`."""
    head = 40 if v6 else 20
    payload = (struct.pack("!I", tag) + os.urandom(max(0, size - head - 4)))[:size - head]
    if v6:
        return ipv6_packet(f"2001:db8:100::{host_n}", "2001:db8:100::2", payload)
    return ipv4_packet(f"198.51.100.{host_n}", "198.51.100.2", payload)


def open_all(device, datagrams: list[bytes], source: tuple) -> None:
    for d in datagrams:
        device.on_datagram(d, source)


def counter_of(message: bytes) -> int:
    return DATA_HEADER.unpack_from(message)[2]


# --- _Run --------------------------------------------------------------------------------

def test_run_takes_equal_messages_and_a_shorter_one_ends_it():
    run = _Run()
    assert run.fits(FULL) and run.count == 0
    for _ in range(3):
        assert run.fits(FULL)
        run.add(FULL)
    assert not run.fits(FULL + 16)              # longer: a new run
    assert run.fits(144)                        # shorter: the last of this one
    run.add(144)
    assert (run.size, run.count, run.end, run.closed) == (FULL, 4, 3 * FULL + 144, True)
    for size in (16, 144, FULL, FULL + 16):
        assert not run.fits(size)


def test_run_holds_at_most_64_segments():
    run = _Run()
    for _ in range(GSO_MAX_SEGMENTS):
        assert run.fits(64)
        run.add(64)
    assert run.count == GSO_MAX_SEGMENTS == 64
    assert not run.fits(64) and not run.fits(32)


def test_run_holds_at_most_65507_bytes():
    assert GSO_MAX_BYTES == 65507
    run = _Run()
    for _ in range(45):
        assert run.fits(FULL)
        run.add(FULL)
    assert run.end == 45 * FULL <= GSO_MAX_BYTES < 46 * FULL
    assert not run.fits(FULL)
    # The cap is on bytes, exactly: the last message may end on it, not beyond.
    edge = _Run()
    edge.add(GSO_MAX_BYTES - 1000)
    assert edge.fits(1000) and not edge.fits(1001)
    edge2 = _Run()
    edge2.add(GSO_MAX_BYTES - 1001)
    assert edge2.fits(1001) and not edge2.fits(1002)


# --- send ------------------------------------------------------------------------------

# (inner packet size, IPv6?) and the data message it becomes at MTU 1420:
# 1420 -> 1452 (no padding beyond the MTU), 100 -> 144, 60 -> 96, 500 -> 544,
# 200 -> 240, 1300 -> 1344, 20 -> 64.
MIXED = ([(1420, False)] * 5 + [(100, True)] + [(1420, True)] * 3 + [(60, False)]
         + [(500, True), (200, False)] + [(1300, False), (1300, True)]
         + [(1420, False), (1420, True), (20, False)])
# The sendmsg calls they take: (datagrams, segment size).
MIXED_RUNS = [(6, FULL), (4, FULL), (2, 544), (2, 1344), (3, FULL)]


SLOT_B = 7                               # A's slot for B: the tag on B's frames


def by_slot(*peers) -> dict:
    """The worker's peers by slot, as SendBatch.drain takes them."""
    return {peer.queue: peer for peer in peers}


def _sender(net: Net, kernel: Kernel, family: int, gro: bool):
    """A's side as a worker has it (device.conn is the WorkerConn), A's peer
    B (slot SLOT_B) pointed at a loopback receiver; the SendBatch's
    send_run recorded."""
    conn = kernel.conn()
    net.a.device.conn = conn
    receiver = kernel.udp(family, gro=gro)
    peer = net.to_b(net.a)
    peer.queue = SLOT_B
    peer.endpoint = address(receiver)
    batch = SendBatch(MTU, conn)
    runs = []
    real = conn.send_run

    def send_run(sock, view, size, endpoint):
        runs.append((-(-len(view) // size), size))
        real(sock, view, size, endpoint)
    conn.send_run = send_run
    ours, tun = kernel.queue()
    return conn, receiver, peer, batch, runs, ours, tun


def _write_tun(tun: socket.socket, packets: list[bytes], slot: int = SLOT_B) -> None:
    """Frames as the kernel queues them on the TAP: tagged with the peer's slot."""
    for p in packets:
        tun.send(tap_frame(p, slot))


@pytest.mark.parametrize("gro", [False, True], ids=["nogro", "gro"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_send_batch_seals_in_order_in_runs(kernel, family, gro):
    net = Net()
    conn, receiver, peer, batch, runs, ours, tun = _sender(net, kernel, family, gro)
    packets = [packet(1, size, v6, tag) for tag, (size, v6) in enumerate(MIXED)]
    _write_tun(tun, packets)
    keypair = peer.keypairs.current
    counter, tx_bytes, tx_packets = keypair.send_counter, peer.tx_bytes, peer.stats.tx_packets

    batch.drain(net.a.device, by_slot(peer), ours.fileno())

    assert runs == MIXED_RUNS
    datagrams, reads = receive_all(receiver, len(packets))
    assert len(datagrams) == len(packets) and nothing_waits(receiver)
    sizes = [MESSAGE_OVERHEAD + send.padded_length(len(p), MTU) for p in packets]
    assert [len(d) for d in datagrams] == sizes
    assert all(message_type(d) == MESSAGE_DATA for d in datagrams)
    assert [counter_of(d) for d in datagrams] == list(range(counter, counter + len(packets)))
    if gro:
        # One sendmsg, one coalesced receive: the runs are what went out.
        assert [(-(-n // s), s) for n, s in reads] == MIXED_RUNS
    else:
        assert all(n == s for n, s in reads) and len(reads) == len(packets)
    # The other side opens them, in order, to exactly the packets (padding gone).
    open_all(net.b.device, datagrams, address(conn.socket_for(peer.endpoint)))
    assert net.b.tun.received == packets
    assert not net.b.device.drops
    assert keypair.send_counter == counter + len(packets)
    assert peer.tx_bytes - tx_bytes == sum(sizes)
    assert peer.stats.tx_packets - tx_packets == len(packets)
    assert read_queue(tun) == [] and conn.take_send_errors() == 0


def test_send_batch_caps_runs_and_respects_the_budget(kernel):
    net = Net()
    conn, receiver, peer, batch, runs, ours, tun = _sender(net, kernel, socket.AF_INET, True)
    full = [packet(1, MTU, tag=i) for i in range(100)]
    _write_tun(tun, full)
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    # One wake-up reads TUN_BATCH packets; 45 full messages fill 65507 bytes.
    assert TUN_BATCH == 64
    assert runs == [(45, FULL), (19, FULL)]
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert runs[2:] == [(36, FULL)]
    small = [packet(1, 20, tag=i) for i in range(100)]
    _write_tun(tun, small)
    batch.drain(net.a.device, by_slot(peer), ours.fileno(), budget=200)
    assert runs[3:] == [(64, 64), (36, 64)]          # 64 segments at most
    datagrams, reads = receive_all(receiver, 200)
    assert len(datagrams) == 200
    assert [(-(-n // s), s) for n, s in reads] == runs
    open_all(net.b.device, datagrams, address(conn.sockets[0]))
    assert net.b.tun.received == full + small
    assert peer.stats.tx_packets >= 200


def test_send_batch_zero_length_read_is_a_keepalive(kernel):
    net = Net()
    conn, receiver, peer, batch, runs, ours, tun = _sender(net, kernel, socket.AF_INET, False)
    seen = []
    peer.timers = types.SimpleNamespace(
        any_authenticated_packet_traversal=lambda: seen.append("traversal"),
        any_authenticated_packet_sent=lambda: seen.append("auth_sent"),
        data_sent=lambda: seen.append("data_sent"))
    tun.send(tap_frame(b"", SLOT_B))                      # headers and no packet
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    datagrams, _ = receive_all(receiver, 1)
    assert [len(d) for d in datagrams] == [MESSAGE_OVERHEAD]
    assert seen == ["traversal", "auth_sent"]              # no data_sent for an empty one
    seen.clear()
    _write_tun(tun, [packet(1, 100), packet(1, 100)])
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert seen == ["traversal", "auth_sent", "data_sent"]  # once a batch, not per packet



class TwoPeers:
    """B's side as a worker has it, sending: B's peers A (slot 1) and C
    (slot 2) each pointed at its own loopback receiver; every send_run
    recorded as (slot, datagrams, segment size)."""

    def __init__(self, net: Net, kernel: Kernel):
        self.net = net
        self.conn = kernel.conn()
        net.b.device.conn = self.conn
        self.peers = by_slot(net.on_b(net.a), net.on_b(net.c))
        assert sorted(self.peers) == [1, 2]
        self.receivers = {slot: kernel.udp() for slot in self.peers}
        for slot, peer in self.peers.items():
            peer.endpoint = address(self.receivers[slot])
        self.batch = SendBatch(MTU, self.conn)
        self.runs = []
        real = self.conn.send_run

        def send_run(sock, view, size, endpoint):
            slot = next(s for s, p in self.peers.items() if p.endpoint == endpoint)
            self.runs.append((slot, -(-len(view) // size), size))
            real(sock, view, size, endpoint)
        self.conn.send_run = send_run
        self.ours, self.tun = kernel.queue()

    def drain(self) -> None:
        self.batch.drain(self.net.b.device, self.peers, self.ours.fileno())

    def arrived(self, slot: int, host: Host, count: int) -> list[bytes]:
        """What `count` data messages to the peer in `slot` open to at `host`
        (the per-packet reference path); their counters checked consecutive
        from the keypair's before the drain, their receiver index its own."""
        got, _ = receive_all(self.receivers[slot], count)
        assert len(got) == count and nothing_waits(self.receivers[slot])
        keypair = self.peers[slot].keypairs.current
        assert [DATA_HEADER.unpack_from(g)[1] for g in got] == [keypair.remote_index] * count
        counters_seen = [counter_of(g) for g in got]
        assert counters_seen == list(range(keypair.send_counter - count, keypair.send_counter))
        host.tun.received.clear()
        open_all(host.device, got, address(self.conn.sockets[0]))
        assert not host.device.drops
        return list(host.tun.received)


def test_send_batch_seals_interleaved_peers_each_with_its_own_session(kernel):
    """One queue carries every peer's frames: each is sealed with its
    peer's keypair and sent to its endpoint, in order; a run ends where
    the peer changes."""
    net = Net()
    s = TwoPeers(net, kernel)
    order = [1, 1, 1, 2, 2, 1, 2, 1, 1]
    frames = [(slot, packet(2, MTU if i % 4 else 300, tag=i)) for i, slot in enumerate(order)]
    for slot, p in frames:
        s.tun.send(tap_frame(p, slot))
    s.drain()
    small = MESSAGE_OVERHEAD + 304
    # 300 then 1420 bytes: a longer message cannot join a run.
    assert s.runs == [(1, 1, small), (1, 2, FULL), (2, 2, FULL), (1, 1, FULL), (2, 1, FULL),
                      (1, 2, FULL)]
    assert s.arrived(1, net.a, 6) == [p for slot, p in frames if slot == 1]
    assert s.arrived(2, net.c, 3) == [p for slot, p in frames if slot == 2]
    for slot, count in ((1, 6), (2, 3)):
        assert s.peers[slot].stats.tx_packets >= count
    assert not net.b.device.drops and read_queue(s.tun) == []


def test_send_batch_drops_a_frame_of_an_unknown_slot_and_goes_on(kernel):
    net = Net()
    s = TwoPeers(net, kernel)
    a1, a2, c1 = packet(2, 400, tag=1), packet(2, 400, tag=2), packet(2, 400, tag=3)
    tx = {slot: peer.stats.tx_packets for slot, peer in s.peers.items()}
    s.tun.send(tap_frame(a1, 1))
    s.tun.send(tap_frame(packet(2, 400, tag=4), 9))              # a slot the worker lacks
    s.tun.send(tap_frame(a2, 1))
    # Not a tag at all (the device's own MAC): no peer either.
    s.tun.send(tcpgro.PLAIN_HDR + DEVICE_MAC + DEVICE_MAC + b"\x08\x00" + packet(2, 400, tag=5))
    s.tun.send(tap_frame(c1, 2))
    s.drain()
    assert net.b.device.drops == {"unknown_peer": 2}
    assert all(not peer.drops for peer in s.peers.values())
    assert [(slot, n) for slot, n, _ in s.runs] == [(1, 1), (1, 1), (2, 1)]
    assert s.arrived(1, net.a, 2) == [a1, a2]
    assert s.arrived(2, net.c, 1) == [c1]
    assert {slot: peer.stats.tx_packets - tx[slot] for slot, peer in s.peers.items()} == \
        {1: 2, 2: 1}

# --- SegmentSender ------------------------------------------------------------------------

class RefusingSocket(socket.socket):
    """A socket whose sendmsg fails with `error` (the kernel refusing GSO, or
    losing the datagrams); sendto works. Counts both."""

    error = errno.EIO
    sendto_error = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sendmsg_calls = 0
        self.sendto_calls = 0

    def sendmsg(self, *args):
        self.sendmsg_calls += 1
        raise OSError(self.error, os.strerror(self.error))

    def sendto(self, *args):
        self.sendto_calls += 1
        if self.sendto_error is not None and self.sendto_calls % 2 == 0:
            raise OSError(self.sendto_error, os.strerror(self.sendto_error))
        return super().sendto(*args)


def _datagrams(n: int, size: int, last: int | None = None) -> list[bytes]:
    out = [bytes([i]) * size for i in range(n)]
    if last is not None:
        out[-1] = out[-1][:last]
    return out


@pytest.mark.parametrize("refusal", [errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT])
def test_segment_sender_falls_back_for_good_where_gso_is_refused(kernel, refusal):
    receiver = kernel.udp()
    sock = kernel.udp(bind=False, cls=RefusingSocket)
    sock.error = refusal
    sender = SegmentSender()
    data = _datagrams(5, 300, last=120)
    sender.send(sock, memoryview(b"".join(data)), 300, address(receiver))
    assert sock.sendmsg_calls == 1 and sock.sendto_calls == 5
    assert sock.fileno() in sender.refused and sender.errors == 0
    sender.send(sock, memoryview(b"".join(data)), 300, address(receiver))
    assert sock.sendmsg_calls == 1 and sock.sendto_calls == 10     # for good: no more tries
    got, _ = receive_all(receiver, 10)
    assert got == data + data
    # Another socket still gets GSO.
    other = kernel.udp(bind=False)
    gro = kernel.udp(gro=True)
    sender.send(other, memoryview(b"".join(data)), 300, address(gro))
    got, reads = receive_all(gro, 5)
    assert got == data and reads == [(1320, 300)]


def test_segment_sender_real_kernel_refusal(kernel):
    """SO_NO_CHECK makes the kernel refuse UDP GSO (EINVAL): the real thing."""
    receiver = kernel.udp()
    sock = kernel.udp(bind=False)
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    with pytest.raises(OSError):
        gso_send(sock, _datagrams(2, 100), address(receiver))
    sender = SegmentSender()
    data = _datagrams(4, 200, last=50)
    sender.send(sock, memoryview(b"".join(data)), 200, address(receiver))
    assert sock.fileno() in sender.refused and sender.errors == 0
    got, _ = receive_all(receiver, 4)
    assert got == data


def test_segment_sender_counts_lost_datagrams_without_raising(kernel):
    receiver = kernel.udp()
    sock = kernel.udp(bind=False, cls=RefusingSocket)
    sock.error = errno.ENOBUFS
    sender = SegmentSender()
    sender.send(sock, memoryview(b"".join(_datagrams(7, 100, last=10))), 100, address(receiver))
    assert sender.errors == 7 and sock.sendto_calls == 0
    assert sock.fileno() not in sender.refused           # a lost send is not a refusal
    sender.send(sock, memoryview(b"".join(_datagrams(3, 100))), 100, address(receiver))
    assert sender.errors == 10 and sock.sendmsg_calls == 2
    assert nothing_waits(receiver)
    # The fallback counts its own losses, one per datagram, and goes on.
    sock.error = errno.EIO
    sock.sendto_error = errno.ENOBUFS
    sender.errors = 0
    data = _datagrams(4, 100)
    sender.send(sock, memoryview(b"".join(data)), 100, address(receiver))
    assert sender.errors == 2                             # the 2nd and 4th sendto failed
    got, _ = receive_all(receiver, 2)
    assert got == [data[0], data[2]]
    # A single datagram never tries GSO.
    fresh = kernel.udp(bind=False, cls=RefusingSocket)
    SegmentSender().send(fresh, memoryview(b"z" * 80), 100, address(receiver))
    assert fresh.sendmsg_calls == 0 and fresh.sendto_calls == 1


def test_worker_conn_counts_send_errors_of_runs(kernel):
    conn = kernel.conn()
    unreachable = ("127.0.0.1", 9)
    conn.segments.errors = 5
    conn.send_errors = 2
    assert conn.take_send_errors() == 7 and conn.take_send_errors() == 0
    assert conn.socket_for(("::1", 1)) is conn.sockets[1]
    assert conn.socket_for(unreachable) is conn.sockets[0]


# --- send without a usable session --------------------------------------------------------

def test_send_without_a_session_stages_and_sends_nothing(kernel):
    net = Net()
    # A fresh peer D of A: no handshake yet.
    d = Host(net.network, net.clock, "198.51.100.4/24", ("192.0.2.4", 51820))
    conn = kernel.conn()
    net.a.device.conn = conn
    receiver = kernel.udp()
    peer = net.a.add_peer(d, ["198.51.100.4/32"])
    peer.endpoint = address(receiver)
    peer.queue = 4
    batch = SendBatch(MTU, conn)
    runs = []
    conn.send_run = lambda *args: runs.append(args)
    ours, tun = kernel.queue()
    packets = [packet(1, 100 + i, tag=i) for i in range(10)]
    _write_tun(tun, packets, slot=4)
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert runs == []
    assert list(peer.staged) == packets
    assert peer.stats.tx_packets == 0 and peer.tx_bytes == 0
    assert net.a.device.drops["no_session"] == 0
    got, _ = receive_all(receiver, 1)
    # Only a handshake initiation leaves, no data.
    assert [message_type(g) for g in got] == [MESSAGE_HANDSHAKE_INITIATION]
    assert nothing_waits(receiver)


def test_send_with_staged_packets_goes_the_per_packet_path_in_order(kernel):
    net = Net()
    conn, receiver, peer, batch, runs, ours, tun = _sender(net, kernel, socket.AF_INET, False)
    early = packet(1, 300, tag=999)
    peer.staged.append(early)
    packets = [packet(1, MTU, tag=i) for i in range(4)]
    _write_tun(tun, packets)
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert runs == [] and not peer.staged
    got, _ = receive_all(receiver, 5)
    open_all(net.b.device, got, address(conn.sockets[0]))
    assert net.b.tun.received == [early] + packets


def test_send_without_endpoint_drops(kernel):
    net = Net()
    conn, receiver, peer, batch, runs, ours, tun = _sender(net, kernel, socket.AF_INET, False)
    peer.endpoint = None
    _write_tun(tun, [packet(1, 100), packet(1, 200)])
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert runs == [] and not peer.staged
    assert net.a.device.drops["no_endpoint"] == 2
    assert nothing_waits(receiver)


@pytest.mark.parametrize("counters_from", ["keypair", "share"])
def test_keypair_used_up_mid_batch_stages_the_rest(kernel, counters_from):
    """take_counter raises KeypairExhausted on the 4th packet: the keypair's
    own counter at REJECT_AFTER_MESSAGES, or (in a pool) the worker's share
    of the counter space at its limit."""
    net = Net()
    conn, receiver, peer, batch, runs, ours, tun = _sender(net, kernel, socket.AF_INET, False)
    keypair = peer.keypairs.current
    if counters_from == "keypair":
        keypair.send_counter = first = REJECT_AFTER_MESSAGES - 3
        last = REJECT_AFTER_MESSAGES
    else:
        hints = counters.CounterHints.in_process(1, 1)
        first = 256                                # past what the session used already
        hints.publish(0, 0, first)
        keypair.share_counters(counters.SendCounter(hints, 0, 0, block=128, limit=first + 3))
        last = first + 3
    tx_packets = peer.stats.tx_packets
    initiations = []
    net.a.device.actions.send_handshake_initiation = lambda p, retry: initiations.append(p)
    packets = [packet(1, MTU, tag=i) for i in range(8)]
    _write_tun(tun, packets)
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert runs == [(3, FULL)]
    assert keypair.send_counter == last
    assert peer.stats.tx_packets - tx_packets == 3
    assert initiations and initiations[0] is peer
    # The rest of the batch is staged in order for the next session (the
    # queue carries other peers' frames too: the drain goes on).
    assert list(peer.staged) == packets[3:] and read_queue(tun) == []
    # Later frames of the peer join them; nothing is sent.
    later = [packet(1, 200, tag=8 + i) for i in range(2)]
    _write_tun(tun, later)
    batch.drain(net.a.device, by_slot(peer), ours.fileno())
    assert list(peer.staged) == packets[3:] + later
    assert runs == [(3, FULL)] and peer.stats.tx_packets - tx_packets == 3
    got, _ = receive_all(receiver, 3)
    assert [counter_of(g) for g in got] == [first + i for i in range(3)]
    assert nothing_waits(receiver)


# --- receive ------------------------------------------------------------------------------

class Receiver:
    """B's side as a worker has it: a ReceiveBatch on a loopback socket,
    B's device.tun the WorkerTun whose TAP queue is a socketpair; what it
    writes is read back by the source tag: slot 1 is A, slot 2 is C."""

    def __init__(self, net: Net, kernel: Kernel, gro: bool = True, family=socket.AF_INET):
        self.net = net
        self.sock = kernel.udp(family, gro=gro, cls=CountingSocket)
        ours, self.queue = kernel.queue()
        self.tun = WorkerTun(ours.fileno(), DEVICE_MAC)
        self.backlog: list[bytes] = []               # frames read, not yet asked for
        net.b.device.tun = self.tun
        self.batch = ReceiveBatch(MTU, self.tun)
        self.a_sock = kernel.udp(family)
        self.c_sock = kernel.udp(family)
        self.sent = 0

    @property
    def address(self):
        return address(self.sock)

    def send(self, sock, datagrams, gso=False):
        if gso:
            for group in gso_groups(datagrams):
                gso_send(sock, group, self.address)
        else:
            for d in datagrams:
                sock.sendto(d, self.address)
        self.sent += len(datagrams)

    def drain(self) -> int:
        """Drain until everything sent was read; the number of drain calls."""
        calls = 0
        deadline = time.monotonic() + WAIT
        while self.sock.datagrams < self.sent and time.monotonic() < deadline:
            wait_readable(self.sock)
            self.batch.drain(self.net.b.device, self.sock)
            calls += 1
        assert self.sock.datagrams == self.sent
        return calls

    def written(self, slot: int) -> list[bytes]:
        """The frames written with peer `slot`'s tag as source, in order."""
        self.backlog += read_queue(self.queue)
        mine = [f for f in self.backlog if frame_source(f) == slot]
        self.backlog = [f for f in self.backlog if frame_source(f) != slot]
        return mine

    def delivered(self, slot: int) -> list[bytes]:
        """The packets written for peer `slot` (plain frames: virtio and
        Ethernet headers checked and stripped; super-packets not expected)."""
        out = []
        for frame in self.written(slot):
            source, packet = untag(frame)
            assert source == slot
            out.append(packet)
        return out


@pytest.mark.parametrize("gro", [False, True], ids=["nogro", "gro"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_receive_batch_delivers_each_peer_in_order(kernel, family, gro):
    net = Net()
    r = Receiver(net, kernel, gro, family)
    from_a = [packet(1, MTU, tag=i) for i in range(70)] + [packet(1, 333, v6=True, tag=70)]
    from_c = [packet(3, size, v6=bool(i % 2), tag=i) for i, size in enumerate((20, 600, 1420, 41))]
    a_msgs, c_msgs = net.seal(net.a, from_a), net.seal(net.c, from_c)
    peer_a, peer_c = net.on_b(net.a), net.on_b(net.c)
    before = peer_a.stats.rx_packets, peer_a.rx_bytes, peer_c.stats.rx_packets
    r.send(r.a_sock, a_msgs[:40], gso=True)
    r.send(r.c_sock, c_msgs[:2])
    r.send(r.a_sock, a_msgs[40:], gso=True)
    r.send(r.c_sock, c_msgs[2:])
    r.drain()
    assert r.delivered(1) == from_a
    assert r.delivered(2) == from_c
    assert peer_a.stats.rx_packets - before[0] == len(from_a)
    assert peer_a.rx_bytes - before[1] == sum(map(len, a_msgs))
    assert peer_c.stats.rx_packets - before[2] == len(from_c)
    assert peer_a.endpoint == address(r.a_sock) and peer_c.endpoint == address(r.c_sock)
    assert not net.b.device.drops and r.tun.take_write_errors() == 0
    if gro:
        assert max(n // s for n, s in r.sock.calls) > 1          # reads were coalesced
    # Nothing is delivered twice: replaying the lot delivers nothing more.
    r.send(r.a_sock, a_msgs, gso=True)
    r.drain()
    assert r.written(1) == [] and net.b.device.drops["replay"] == len(a_msgs)


def test_receive_batch_arena_fills_and_flushes_in_order(kernel):
    net = Net()
    r = Receiver(net, kernel)
    packets = [packet(1, 200, tag=i) for i in range(300)]
    r.send(r.a_sock, net.seal(net.a, packets), gso=True)
    calls = r.drain()
    assert r.delivered(1) == packets
    # 300 datagrams in runs of 64: 5 coalesced reads, fewer than RECEIVE_CALLS.
    assert len(r.sock.calls) == 5 <= RECEIVE_CALLS and calls == 1


def test_receive_batch_stops_after_receive_calls(kernel):
    net = Net()
    r = Receiver(net, kernel, gro=False)
    packets = [packet(1, 100, tag=i) for i in range(RECEIVE_CALLS + 4)]
    r.send(r.a_sock, net.seal(net.a, packets))
    wait_readable(r.sock)
    time.sleep(0.05)                      # loopback delivers at once; a margin all the same
    r.batch.drain(net.b.device, r.sock)
    assert r.delivered(1) == packets[:RECEIVE_CALLS]
    r.drain()
    assert r.delivered(1) == packets[RECEIVE_CALLS:]


def test_receive_batch_replay_tamper_unknown_keepalive_and_junk(kernel):
    net = Net()
    r = Receiver(net, kernel)
    device, peer_a = net.b.device, net.on_b(net.a)
    a_packets = [packet(1, 500, tag=i) for i in range(6)]
    a_msgs = net.seal(net.a, a_packets)
    keepalive = net.keepalive(net.a)
    c_packets = [packet(3, 700, tag=i) for i in range(3)]
    c_msgs = net.seal(net.c, c_packets)
    tampered = bytearray(a_msgs[3])
    tampered[-1] ^= 1
    unknown = bytearray(a_msgs[4])
    struct.pack_into("<I", unknown, 4, (DATA_HEADER.unpack_from(a_msgs[4])[1] ^ 0x5A5A5A5A))
    junk_short = b"\x04\x00\x00\x00" + bytes(20)                 # data type, < 32 bytes
    junk_type = b"\x09" + os.urandom(len(a_msgs[0]) - 1)           # no such type
    junk_random = b"\xff" + os.urandom(99)
    rx_before, bytes_before = peer_a.stats.rx_packets, peer_a.rx_bytes
    sequence = [a_msgs[0], junk_short, a_msgs[1], a_msgs[0], c_msgs[0], bytes(tampered),
                junk_type, a_msgs[2], bytes(unknown), keepalive, c_msgs[1], junk_random,
                a_msgs[3], a_msgs[4], a_msgs[1], c_msgs[2], a_msgs[5]]
    r.send(r.a_sock, sequence)
    r.drain()
    assert r.delivered(1) == a_packets
    assert r.delivered(2) == c_packets
    assert device.drops["replay"] == 2 and peer_a.drops["replay"] == 2
    assert device.drops["auth_failed"] == 1 and peer_a.drops["auth_failed"] == 1
    assert device.drops["unknown_index"] == 1
    assert device.drops["malformed"] == 3
    assert sum(device.drops.values()) == 7
    # Counted: the 6 packets and the keepalive (authenticated), nothing else.
    assert peer_a.stats.rx_packets - rx_before == 7
    assert peer_a.rx_bytes - bytes_before == sum(map(len, a_msgs)) + len(keepalive)


@pytest.mark.parametrize("gro", [False, True], ids=["nogro", "gro"])
def test_junk_inside_a_coalesced_read_disturbs_nothing(kernel, gro):
    net = Net()
    r = Receiver(net, kernel, gro=gro)
    packets = [packet(1, MTU, tag=i) for i in range(6)]
    msgs = net.seal(net.a, packets)
    junk = [b"\xff" * FULL, b"\x05" + bytes(FULL - 1), b"\x04\x00\x00\x00" + os.urandom(FULL - 4)]
    tail = b"\x04\x00\x00\x00" + bytes(8)
    datagrams = [msgs[0], junk[0], msgs[1], msgs[2], junk[1], msgs[3], junk[2], msgs[4], msgs[5],
                 tail]
    gso_send(r.a_sock, datagrams, r.address)
    r.sent += len(datagrams)
    r.drain()
    assert r.delivered(1) == packets
    if gro:
        assert r.sock.calls == [(9 * FULL + len(tail), FULL)]
    assert net.b.device.drops["malformed"] == 3
    assert net.b.device.drops["unknown_index"] + net.b.device.drops["auth_failed"] == 1


def test_every_socket_of_the_listen_port_coalesces():
    """GRO picks a flow's socket by hash before the reuseport program runs,
    and merges only if that one has UDP_GRO: so every member has it, the
    control plane's (position 0) too."""
    conn = UDPConn(0, group=3)
    try:
        members = conn.groups[0] + conn.groups[1]
        assert len(members) == 6
        assert [sock.getsockopt(SOL_UDP, UDP_GRO) for sock in members] == [1] * 6
    finally:
        conn.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_control_plane_reads_each_datagram_of_a_coalesced_read(kernel, family):
    conn = UDPConn(0)           # the control plane's sockets alone: each gets all
    try:
        sock = conn.sockets[0 if family == socket.AF_INET else 1]
        sender = kernel.udp(family)
        to = (_loopback(family), conn.listen_port)
        burst = [bytes([i]) * 148 for i in range(5)] + [b"\x09" * 32]
        gso_send(sender, burst, to)
        gso_send(sender, burst, to)
        sender.sendto(b"", to)
        deadline = time.monotonic() + 2
        while not select.select([sock], [], [], 0.1)[0] and time.monotonic() < deadline:
            pass
        # The kernel merged the first burst: the path that splits is taken.
        buf = bytearray(GSO_MAX_BYTES)
        nbytes, size, _ = receive_coalesced(sock, buf)
        assert (nbytes, size) == (5 * 148 + 32, 148)
        got = conn.receive(sock)
        assert [data for data, _ in got] == burst + [b""]
        assert {source[1] for _, source in got} == {sender.getsockname()[1]}
    finally:
        conn.close()


def test_a_message_too_large_for_a_slot_takes_the_per_packet_path_in_order(kernel):
    net = Net()
    r = Receiver(net, kernel)
    big = packet(1, 1500, tag=1)                 # from a peer with a larger MTU
    packets = [packet(1, 200, tag=0), big, packet(1, 200, tag=2)]
    msgs = net.seal(net.a, packets)
    assert len(msgs[1]) - MESSAGE_OVERHEAD > r.batch.slot
    r.send(r.a_sock, msgs)
    r.drain()
    assert r.delivered(1) == packets
    assert not net.b.device.drops


def _tcp4(seq: int, payload: bytes, ident: int, flags: int = 0x10) -> bytes:
    """An IPv4 TCP segment 198.51.100.1:40000 -> 198.51.100.2:5001, checksums right."""
    src = ipaddress.IPv4Address("198.51.100.1").packed
    dst = ipaddress.IPv4Address("198.51.100.2").packed

    def csum(data: bytes) -> int:
        if len(data) % 2:
            data += b"\0"
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 77, 5 << 4, flags, 500, 0, 0) + payload
    check = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), ident, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp


def test_tcp_segments_of_one_flow_arrive_coalesced_and_tagged(kernel):
    net = Net()
    r = Receiver(net, kernel, gro=True)
    payloads = [os.urandom(1000) for _ in range(8)]
    segments = [_tcp4(5000 + 1000 * i, p, 40 + i) for i, p in enumerate(payloads)]
    other = packet(1, 120, tag=9)                  # UDP: passes with a plain header
    msgs = net.seal(net.a, segments + [other])
    assert len({len(m) for m in msgs[:8]}) == 1
    gso_send(r.a_sock, msgs, r.address)            # back to back: one coalesced read
    r.sent += len(msgs)
    r.drain()
    assert r.sock.calls == [(sum(map(len, msgs)), len(msgs[0]))]
    written = r.written(1)
    assert len(written) == 2
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from(
        "=BBHHHH", written[0])
    assert (flags, gso_type) == (tcpgro.VIRTIO_NET_HDR_F_NEEDS_CSUM, tcpgro.VIRTIO_NET_HDR_GSO_TCPV4)
    # Offsets count from the frame's start: the Ethernet header's 14 bytes first.
    assert (hdr_len, gso_size, csum_start, csum_offset) == (14 + 40, 1000, 14 + 20, 16)
    ethernet = written[0][tcpgro.VNET_HDR_LEN:tcpgro.VNET_HDR_LEN + 14]
    assert ethernet == DEVICE_MAC + b"\x02\x77\x00\x00\x00\x01" + b"\x08\x00"
    super_packet = written[0][tcpgro.VNET_HDR_LEN + 14:]
    assert struct.unpack_from("!H", super_packet, 2)[0] == len(super_packet) == 40 + 8000
    assert struct.unpack_from("!I", super_packet, 24)[0] == 5000          # the first's seq
    assert super_packet[40:] == b"".join(payloads)
    assert super_packet[:20] != segments[0][:20]                          # lengths made new
    assert untag(written[1]) == (1, other)


def test_small_ipv6_packets_are_written_with_the_ipv6_ethertype(kernel):
    """An IPv6 packet shorter than a TCP header's worth (an empty UDP
    datagram is 48 bytes, an ICMPv6 echo 48 and up) is still IPv6: written
    with EtherType IPv4 the kernel would parse it as IPv4 and drop it."""
    net = Net()
    r = Receiver(net, kernel)
    packets = [packet(1, size, v6=True, tag=size) for size in (48, 59, 60, 100)]
    r.send(r.a_sock, net.seal(net.a, packets))
    r.drain()
    frames = r.written(1)
    assert [f[tcpgro.VNET_HDR_LEN + 12:tcpgro.VNET_HDR_LEN + 14] for f in frames] == \
        [b"\x86\xdd"] * 4
    assert [untag(f) for f in frames] == [(1, p) for p in packets]


def test_keepalive_delivers_nothing_but_counts(kernel):
    net = Net()
    r = Receiver(net, kernel)
    peer = net.on_b(net.a)
    seen = []
    peer.timers = types.SimpleNamespace(
        any_authenticated_packet_received=lambda: seen.append("auth_received"),
        any_authenticated_packet_traversal=lambda: seen.append("traversal"),
        data_received=lambda: seen.append("data_received"),
        handshake_complete=lambda: seen.append("handshake_complete"))
    rx, nbytes = peer.stats.rx_packets, peer.rx_bytes
    r.send(r.a_sock, [net.keepalive(net.a)])
    r.drain()
    assert r.written(1) == [] and not net.b.device.drops
    assert peer.stats.rx_packets == rx + 1 and peer.rx_bytes == nbytes + MESSAGE_OVERHEAD
    assert seen == ["auth_received", "traversal"]
    seen.clear()
    # Many data messages in one read: the timer hooks once, data_received too.
    r.send(r.a_sock, net.seal(net.a, [packet(1, MTU, tag=i) for i in range(10)]), gso=True)
    r.drain()
    assert len(r.written(1)) == 10
    assert seen == ["auth_received", "traversal", "data_received"]


def test_an_empty_datagram_is_dropped_and_disturbs_nothing(kernel):
    net = Net()
    r = Receiver(net, kernel, gro=True)
    packets = [packet(1, 100, tag=i) for i in range(2)]
    msgs = net.seal(net.a, packets)
    r.send(r.a_sock, [msgs[0], b"", msgs[1]])
    r.drain()
    assert r.delivered(1) == packets
    assert net.b.device.drops["malformed"] == 1


# --- property: junk never disturbs valid messages ------------------------------------

_JUNK_LENGTHS = [1, 3, 4, 20, 31, 32, 33, 64, 92, 144, 148, 1452, 1500]
_VALID_SIZES = [20, 100, 1420]


def test_random_datagrams_never_disturb_valid_ones(kernel):
    net = Net()
    r = Receiver(net, kernel, gro=True)
    device = net.b.device
    index = net.on_b(net.a).keypairs.current.local_index

    item = st.one_of(
        st.tuples(st.just("valid"), st.sampled_from(_VALID_SIZES)),
        st.tuples(st.just("junk"),
                  st.sampled_from(_JUNK_LENGTHS).flatmap(lambda n: st.binary(min_size=n, max_size=n))),
        st.tuples(st.just("data_junk"), st.integers(0, 2 ** 64 - 1),
                  st.sampled_from([32, 64, 144, 1452]).flatmap(
                      lambda n: st.binary(min_size=n - 16, max_size=n - 16))),
        st.tuples(st.just("replay"), st.integers(0, 1000)),
    )

    @given(items=st.lists(item, max_size=24), gso=st.booleans())
    def check(items, gso):
        valid, datagrams = [], []
        for entry in items:
            kind = entry[0]
            if kind == "valid":
                p = packet(1, entry[1], tag=len(valid))
                valid.append(p)
                datagrams.append(net.seal(net.a, [p])[0])
            elif kind == "junk":
                datagrams.append(entry[1])
            elif kind == "data_junk":
                datagrams.append(struct.pack("<IIQ", MESSAGE_DATA, index, entry[1]) + entry[2])
            elif kind == "replay":
                sealed = [d for d in datagrams if d[:8] == struct.pack("<II", 4, index)
                          and len(d) in (64, 144, 1452)]
                if sealed:
                    datagrams.append(sealed[entry[1] % len(sealed)])
        if not datagrams:
            return
        r.send(r.a_sock, datagrams, gso=gso)
        r.drain()
        assert r.delivered(1) == valid
        assert r.written(2) == []
        assert r.tun.take_write_errors() == 0

    check()
    assert device.drops                      # the junk was counted


# --- worker: timer events -----------------------------------------------------------------

class ControlClock:
    def __init__(self, now: float = 5000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now


def _make_worker(monkeypatch, kernel: Kernel):
    """A real Worker (as worker.main builds it) on a control channel whose
    other end the test reads, its module's clock a ControlClock."""
    clock = ControlClock()
    monkeypatch.setattr(worker_mod, "time",
                        types.SimpleNamespace(monotonic=clock.monotonic,
                                              process_time=time.process_time))
    control, theirs = channel.pair()
    kernel.sockets.extend([control, theirs])
    theirs.setblocking(False)
    control.setblocking(False)
    ours, queue = kernel.queue()
    fds = [os.dup(ours.fileno())]                  # its TAP queue first, then its sockets
    for family in (socket.AF_INET, socket.AF_INET6):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((_loopback(family), 0))
        fds.append(sock.detach())
    w = Worker(theirs, Init(1, "batchtest", MTU, DEVICE_MAC), fds)
    w.kernel_side = queue                          # the test's end of its queue
    kernel.sockets.extend(w.conn.sockets)
    return w, clock, control


def _close_worker(w) -> None:
    w.selector.close()
    os.close(w.tun.fd)


@pytest.fixture
def worker_with_clock(monkeypatch, kernel):
    w, clock, control = _make_worker(monkeypatch, kernel)
    yield w, clock, control
    _close_worker(w)


def _messages(control: socket.socket) -> list:
    out = []
    while True:
        item = channel.receive(control)
        if item is None:
            return out
        out.append(item[0])


class Loop:
    """What Worker.run does between wake-ups with nothing to read: sleep
    _timeout(), flush; every TimerEvents read back with the time it left."""

    def __init__(self, w, clock, control):
        self.w, self.clock, self.control = w, clock, control
        self.sent: list[tuple[float, object]] = []

    def flush(self, force: bool = False) -> list:
        self.w.flush(force)
        got = _messages(self.control)
        self.sent += [(self.clock.now, m) for m in got]
        return got

    def until(self, until: float) -> list:
        """Run the loop up to time `until`; the messages sent meanwhile."""
        mark = len(self.sent)
        while True:
            timeout = self.w._timeout()
            assert 0.0 <= timeout <= STATS_INTERVAL
            if self.clock.now + timeout > until:
                self.clock.now = until
                return [m for _, m in self.sent[mark:]]
            self.clock.now += timeout
            self.flush()


def test_worker_sends_timer_events_in_one_message_per_interval(worker_with_clock):
    w, clock, control = worker_with_clock
    loop = Loop(w, clock, control)
    a, b = EventRecorder(w, 3), EventRecorder(w, 4)
    assert w._timeout() == STATS_INTERVAL               # nothing withheld
    start = clock.now
    a.data_sent()
    first = loop.flush()
    # The first of a quiet spell goes at once (or is withheld at most an interval).
    if not first:
        assert 0 < w._timeout() <= EVENT_INTERVAL + 1e-9
    clock.now += EVENT_INTERVAL / 5
    a.data_received()
    b.any_authenticated_packet_sent()
    assert loop.flush() == []                           # withheld within the interval
    assert 0 < w._timeout() <= start + EVENT_INTERVAL - clock.now + 1e-9
    clock.now += EVENT_INTERVAL / 2
    a.any_authenticated_packet_received()
    a.any_authenticated_packet_traversal()
    w.remove_index(77)                                  # other messages are not withheld
    assert loop.flush() == [ReleasedIndices((77,))]
    assert 0 < w._timeout() <= start + EVENT_INTERVAL - clock.now + 1e-9
    withheld = {3: DATA_RECEIVED | AUTH_RECEIVED | TRAVERSAL, 4: AUTH_SENT}
    if first:
        assert first == [TimerEvents({3: DATA_SENT})]
    else:
        withheld[3] |= DATA_SENT
    assert loop.until(start + EVENT_INTERVAL + 1e-6) == [TimerEvents(withheld)]   # ONE message
    assert w.events == {} and w._timeout() == STATS_INTERVAL
    # flush(force=True) sends at once.
    clock.now += 0.001
    b.data_sent()
    assert loop.flush() == []
    assert loop.flush(force=True) == [TimerEvents({4: DATA_SENT})]
    assert w._timeout() == STATS_INTERVAL


_BITS = (AUTH_RECEIVED, DATA_RECEIVED, AUTH_SENT, DATA_SENT, TRAVERSAL)


@given(steps=st.lists(st.tuples(st.floats(0, 3 * EVENT_INTERVAL), st.integers(0, 4),
                                st.integers(0, 3)), min_size=1, max_size=30))
def test_worker_timer_events_property(steps):
    """Events at arbitrary times, the loop waking when _timeout() says:
    every event reaches the control plane within EVENT_INTERVAL of being
    recorded, its flag intact, and TimerEvents messages leave at least
    EVENT_INTERVAL apart."""
    kernel = Kernel()
    with pytest.MonkeyPatch.context() as mp:
        w, clock, control = _make_worker(mp, kernel)
        try:
            loop = Loop(w, clock, control)
            pending: list[tuple[float, int, int]] = []          # (recorded at, slot, bit)
            seen = 0

            def settle():
                nonlocal pending, seen
                for at, m in loop.sent[seen:]:
                    for slot, flags in m.flags_by_slot.items():
                        late = [t for t, s, b in pending if s == slot and b & flags and at - t > EVENT_INTERVAL + 1e-9]
                        assert not late, (at, late)
                        pending = [(t, s, b) for t, s, b in pending if not (s == slot and b & flags)]
                seen = len(loop.sent)
                assert all(clock.now - t <= EVENT_INTERVAL + 1e-9 for t, _, _ in pending)

            for gap, bit, slot in steps:
                loop.until(clock.now + gap)
                settle()
                EventRecorder(w, slot)._flag(_BITS[bit])
                pending.append((clock.now, slot, _BITS[bit]))
                loop.flush()
                settle()
            loop.until(clock.now + EVENT_INTERVAL + 1e-6)
            settle()
            assert pending == [] and w.events == {}
            times = [at for at, _ in loop.sent]
            assert all(t2 - t1 >= EVENT_INTERVAL - 1e-9 for t1, t2 in zip(times, times[1:]))
        finally:
            _close_worker(w)
            kernel.close()


def test_worker_batches_end_to_end(worker_with_clock, kernel):
    """A real Worker serving peer B in slot 5 (a keypair restored from A's
    session, as the control plane sends it) on loopback sockets: its TAP
    queue read and sent, its socket read and written."""
    w, clock, control = worker_with_clock
    net = Net()
    b_sock = kernel.udp()
    tun = w.kernel_side
    w.handle(PeerAdd(5, net.b.public_key, address(b_sock)), [])
    w.handle(InstallKeypair(5, net.to_b(net.a).keypairs.current.export()), [])
    # An initiator's keypair confirms itself with a keepalive at once.
    keepalive, _ = receive_all(b_sock, 1)
    assert [len(k) for k in keepalive] == [MESSAGE_OVERHEAD]
    packets = [packet(1, MTU, tag=i) for i in range(5)] + [packet(1, 90, tag=5)]
    _write_tun(tun, packets, slot=5)
    w._drain_tun()
    got, reads = receive_all(b_sock, len(packets))
    assert len(got) == len(packets)
    assert [counter_of(g) for g in keepalive + got] == \
        list(range(counter_of(keepalive[0]), counter_of(keepalive[0]) + 7))
    open_all(net.b.device, keepalive + got, address(w.conn.sockets[0]))
    assert net.b.tun.received == packets and not net.b.device.drops
    # And back: B seals, the worker's socket receives, its queue gets them.
    replies = [packet(2, 300, tag=i) for i in range(3)]
    sent = []
    net.b.device.conn = types.SimpleNamespace(send=lambda d, e: sent.append(bytes(d)))
    peer_b = net.on_b(net.a)
    for p in replies:
        send.encrypt_and_send(net.b.device, peer_b, peer_b.keypairs.current, p)
    for d in sent:
        b_sock.sendto(d, address(w.conn.sockets[0]))
    wait_readable(w.conn.sockets[0])
    deadline = time.monotonic() + WAIT
    out = []
    while len(out) < 3 and time.monotonic() < deadline:
        w.receiving.drain(w.device, w.conn.sockets[0])
        out += read_queue(tun)
    assert [untag(frame) for frame in out] == [(5, p) for p in replies]      # tagged as B's
    w.flush(force=True)
    events = [m for m in _messages(control) if isinstance(m, TimerEvents)]
    assert events == [TimerEvents({5: AUTH_SENT | DATA_SENT | TRAVERSAL | AUTH_RECEIVED
                                   | DATA_RECEIVED})]
    stats = w.stats()
    assert stats.traffic_by_slot[5].tx_packets == 7 and stats.traffic_by_slot[5].rx_packets == 3


def test_a_deleted_tun_is_tun_gone_not_a_crash(monkeypatch):
    """EBADFD from a TUN queue (its interface was deleted, as by wg-quick
    down) is TunGone, which a worker answers by no longer polling the fd."""
    import errno as _errno
    from wgebpf.dataplane.batch import SendBatch, TunGone

    def readv(fd, buffers):
        raise OSError(_errno.EBADFD, "File descriptor in bad state")
    monkeypatch.setattr(os, "readv", readv)
    with pytest.raises(TunGone):
        SendBatch(1420, conn=None).read(99)
