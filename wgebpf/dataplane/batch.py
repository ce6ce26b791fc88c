"""The workers' batched data path: many packets a wake-up, few system calls,
no per-packet allocation of packet bytes.

Send (SendBatch.drain): frames are read from the worker's TAP queue into
one reused buffer; each names its peer in its Ethernet header (tun.py,
"Peer tags"). Consecutive packets of one peer are padded in place and
sealed (encrypt_into) back to back into a second buffer; each run of
equal-size data messages to the endpoint leaves with one sendmsg (UDP GSO,
udp.SegmentSender). A full-size TCP stream is one run, since padding makes
every full segment the same size.

Receive (ReceiveBatch.drain): one recvmsg returns many datagrams (UDP GRO,
udp.receive_coalesced); each data message is checked and opened
(receive.open_into) into a slot of an arena; the packets of each peer are
written to the TAP queue together, tagged with the peer, TCP segments of one
flow coalesced into one super-packet (tcpgro.coalesce).

Per batch, not per packet: the timer events (they are flags), the
counters, the roaming check, the rekey checks. Whatever the fast path does
not expect (a peer without a usable session, a message that is not data,
one too large for a slot) takes the per-packet path of wireguard/send.py
and wireguard/receive.py, so the protocol's rules live in one place.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from ..wireguard import receive, send
from ..wireguard.messages import AEAD_TAG_LEN, DATA_HEADER, MESSAGE_DATA_MIN_LEN
from ..wireguard.noise import KeypairExhausted
from . import tcpgro
from .tun import ETH_HLEN, READ_SIZE, TUN_BATCH, slot_of
from .udp import GRO_BUFFER, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, receive_coalesced

MESSAGE_OVERHEAD = DATA_HEADER.size + AEAD_TAG_LEN      # 32
RECEIVE_CALLS = 16          # recvmsg calls a wake-up, before the other fds get a turn
ARENA_SLOTS = 128           # decrypted packets held before they are written
_DATA_PREFIX = b"\x04\x00\x00\x00"
_COUNTER = struct.Struct("<Q")
_ZEROS = bytes(64)


class TunGone(Exception):
    """The TUN queue's device was deleted (EBADFD): nothing more comes."""


class SendBatch:
    """One worker's send buffers, shared by all peers."""

    def __init__(self, mtu: int, conn, on_write_error=None):
        self.mtu = mtu
        self.conn = conn
        self.inbuf = bytearray(READ_SIZE + 64)
        self.header = bytearray(tcpgro.VNET_HDR_LEN + ETH_HLEN)
        self.out = bytearray(GSO_MAX_BYTES + READ_SIZE + 2 * MESSAGE_OVERHEAD)
        self._in = memoryview(self.inbuf)
        self._out = memoryview(self.out)
        self._tag = memoryview(self.header)[tcpgro.VNET_HDR_LEN:]   # the destination MAC
        self._iov = [self.header, self._in[:READ_SIZE]]

    def read(self, fd: int) -> int | None:
        """One frame from fd: the packet into inbuf, the headers into header;
        the packet's length, or None if none waits."""
        try:
            size = os.readv(fd, self._iov)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno == errno.EBADFD:
                raise TunGone(fd) from exc
            raise
        # No offloads are enabled for reading (tun.py): the virtio header is
        # all zeros and the packet complete, checksums included.
        return size - len(self.header)

    def drain(self, device, peers: dict, fd: int, budget: int = TUN_BATCH) -> None:
        """Up to `budget` frames from fd, each sealed for the peer its tag names."""
        now = device.clock.monotonic()
        batch = None
        try:
            for _ in range(budget):
                size = self.read(fd)
                if size is None:
                    break
                slot = slot_of(self._tag)
                if batch is None or batch.slot != slot:
                    self._finish(device, batch, now)
                    batch = _PeerBatch(slot, peers.get(slot), now, self.conn)
                self._one(device, batch, size)
        finally:
            self._finish(device, batch, now)

    def _one(self, device, batch: "_PeerBatch", size: int) -> None:
        peer, keypair = batch.peer, batch.keypair
        if peer is None:
            # The classifier named a peer this worker has not heard of (yet:
            # the peer was added a moment ago, or removed).
            device.drop("unknown_peer")
            return
        if keypair is not None:
            padded = send.padded_length(size, self.mtu)
            if padded > size:
                self.inbuf[size:padded] = _ZEROS[:padded - size]
            message = MESSAGE_OVERHEAD + padded
            run = batch.run
            if not run.fits(message):
                self.conn.send_run(batch.sock, self._out[:run.end], run.size, peer.endpoint)
                run = batch.run = _Run()
            try:
                send.seal_into(keypair, self._in[:padded], self._out[run.end:run.end + message])
            except KeypairExhausted:
                batch.keypair = keypair = None   # used up: the rest stage for the next session
        if keypair is None:
            send.packet_for_peer(device, peer, bytes(self._in[:size]))
            return
        run.add(message)
        batch.sent += 1
        batch.size_sent += message
        batch.data = batch.data or size > 0

    def _finish(self, device, batch: "_PeerBatch | None", now: float) -> None:
        if batch is None or batch.peer is None:
            return
        run = batch.run
        if run.count:
            self.conn.send_run(batch.sock, self._out[:run.end], run.size, batch.peer.endpoint)
            batch.run = _Run()
        if batch.sealed_with is not None:
            batch.sealed_with.end_batch()
        if batch.sent:
            send.sealed_batch(device, batch.peer, batch.sealed_with, batch.sent, batch.size_sent,
                              batch.data, now)
            batch.sent = 0


class _PeerBatch:
    """The packets of one peer sealed in a row, between frames of others."""

    __slots__ = ("slot", "peer", "keypair", "sealed_with", "sock", "run", "sent", "size_sent",
                 "data")

    def __init__(self, slot: int, peer, now: float, conn):
        self.slot = slot
        self.peer = peer
        self.keypair = send.sendable_keypair(peer, now) if peer is not None else None
        self.sealed_with = self.keypair
        self.sock = conn.socket_for(peer.endpoint) if self.keypair is not None else None
        self.run = _Run()
        self.sent = self.size_sent = 0
        self.data = False


class _Run:
    """Data messages laid back to back in SendBatch.out for one sendmsg:
    all `size` long but the last, which may be shorter (then it ends the run)."""

    __slots__ = ("size", "count", "end", "closed")

    def __init__(self):
        self.size = self.count = self.end = 0
        self.closed = False

    def fits(self, message: int) -> bool:
        if not self.count:
            return True
        return (not self.closed and message <= self.size and self.count < GSO_MAX_SEGMENTS
                and self.end + message <= GSO_MAX_BYTES)

    def add(self, message: int) -> None:
        if not self.count:
            self.size = message
        elif message < self.size:
            self.closed = True
        self.count += 1
        self.end += message


class ReceiveBatch:
    """One worker's receive buffers: the recvmsg buffer and an arena of
    decrypted packets waiting to be written, by peer."""

    def __init__(self, mtu: int, tun):
        self.tun = tun                   # worker.WorkerTun: the TAP queue, error count
        self.slot = -(-(max(mtu, 1280) + MESSAGE_OVERHEAD) // 64) * 64
        self.buf = bytearray(GRO_BUFFER)
        self.arena = bytearray(ARENA_SLOTS * self.slot)
        self._buf = memoryview(self.buf)
        self._arena = memoryview(self.arena)
        self.used = 0
        self.pending: dict = {}                  # peer -> [plaintext views]
        self.opened: dict = {}                   # keypair -> [peer, messages, bytes, data]
        # keypair -> [(counter, its peer's pending list or None, position,
        # size)]: messages of sessions whose replay window other workers
        # share, opened but not yet recorded in it (settle).
        self.deferred: dict = {}
        self.holes = False                       # a rejected packet left None in pending

    def drain(self, device, sock: socket.socket) -> None:
        for _ in range(RECEIVE_CALLS):
            got = receive_coalesced(sock, self.buf)
            if got is None:
                break
            nbytes, size, source = got
            now = device.clock.monotonic()
            if not nbytes:
                device.on_datagram(b"", source)           # counted as malformed
                continue
            view = self._buf
            for start in range(0, nbytes, size):
                self.datagram(device, view[start:min(start + size, nbytes)], source, now)
            self._authenticated(device, source, now)
        self.flush()

    def datagram(self, device, message: memoryview, source: tuple, now: float) -> None:
        length = len(message) - MESSAGE_OVERHEAD
        if length < 0 or message[:4] != _DATA_PREFIX or length > self.slot:
            # Not a data message, or too large for a slot: the per-packet
            # path, in order after what is already waiting.
            self._authenticated(device, source, now)
            self.flush()
            device.on_datagram(bytes(message), source)
            return
        if self.used == ARENA_SLOTS:
            self._authenticated(device, source, now)
            self.flush()
        start = self.used * self.slot
        out = self._arena[start:start + length]
        keypair = receive.open_into(device, message, out, now, accept=False)
        if keypair is None:
            return
        replay = keypair.replay
        counter = _COUNTER.unpack_from(message, 8)[0]
        if not replay.shared and not replay.accept(counter):
            device.drop("replay", keypair.peer)
            return
        opened = self.opened.get(keypair)
        if opened is None:
            opened = self.opened[keypair] = [keypair.peer, 0, 0, 0]
        opened[1] += 1
        opened[2] += len(message)
        packets = None
        if length:
            opened[3] += 1
            packets = self._deliver(device, keypair.peer, out)
        if replay.shared:
            self.deferred.setdefault(keypair, []).append(
                (counter, packets, len(packets) - 1 if packets else 0, len(message)))

    def _deliver(self, device, peer, plaintext: memoryview) -> list | None:
        """Queue the packet for the TAP; the peer's pending list it joined."""
        length = receive.inner_length(plaintext)
        if not length:
            device.drop("malformed_inner", peer)
            return None
        self.used += 1
        packets = self.pending.get(peer)
        if packets is None:
            packets = self.pending[peer] = [plaintext[:length]]
        else:
            packets.append(plaintext[:length])
        return packets

    def _settle(self, device) -> None:
        """Record the deferred counters in their shared windows, one lock per
        session and burst; a counter some worker already recorded is a
        replay: its packet is taken back before anything sees it."""
        for keypair, entries in self.deferred.items():
            opened = self.opened[keypair]
            replay = keypair.replay
            with replay.locked():
                rejected = [entry for entry in entries if not replay.accept(entry[0])]
            for counter, packets, position, size in rejected:
                device.drop("replay", keypair.peer)
                opened[1] -= 1
                opened[2] -= size
                if packets is not None:
                    packets[position] = None
                    opened[3] -= 1
                    self.holes = True
        self.deferred.clear()

    def _authenticated(self, device, source: tuple, now: float) -> None:
        """Once per keypair and batch: what receive.authenticated changes."""
        self._settle(device)
        for keypair, (peer, messages, size, data) in self.opened.items():
            if not messages:
                continue               # every one a replay: nothing authenticated
            receive.authenticated(device, peer, keypair, source, size, now, messages)
            if data:
                peer.timers.data_received()
        self.opened.clear()

    def flush(self) -> None:
        # _authenticated (and so _settle) always runs first: nothing deferred is left.
        for peer, packets in self.pending.items():
            if self.holes:
                packets = [packet for packet in packets if packet is not None]
            self.tun.write_many(packets, peer.queue)
        self.pending.clear()
        self.holes = False
        self.used = 0
