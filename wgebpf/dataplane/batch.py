"""The workers' batched data path: many packets a wake-up, few system calls,
no per-packet allocation of packet bytes.

Send (SendBatch.drain): packets are read from a peer's TUN queue into one
reused buffer, padded in place and sealed (encrypt_into) back to back into
a second buffer; each run of equal-size data messages to the endpoint
leaves with one sendmsg (UDP GSO, udp.SegmentSender). A full-size TCP
stream is one run, since padding makes every full segment the same size.

Receive (ReceiveBatch.drain): one recvmsg returns many datagrams (UDP GRO,
udp.receive_coalesced); each data message is checked and opened
(receive.open_into) into a slot of an arena; the packets of each peer are
written to its TUN queue together, TCP segments of one flow coalesced into
one super-packet when the TUN takes virtio-net headers (tcpgro.coalesce).

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

from ..wireguard import receive, send
from ..wireguard.messages import (AEAD_TAG_LEN, DATA_HEADER, MESSAGE_DATA_MIN_LEN,
                                  REJECT_AFTER_MESSAGES)
from . import tcpgro
from .tun import READ_SIZE, TUN_BATCH
from .udp import GRO_BUFFER, GSO_MAX_BYTES, GSO_MAX_SEGMENTS, receive_coalesced

MESSAGE_OVERHEAD = DATA_HEADER.size + AEAD_TAG_LEN      # 32
RECEIVE_CALLS = 16          # recvmsg calls a wake-up, before the other fds get a turn
ARENA_SLOTS = 128           # decrypted packets held before they are written
_DATA_PREFIX = b"\x04\x00\x00\x00"
_ZEROS = bytes(64)


class TunGone(Exception):
    """The TUN queue's device was deleted (EBADFD): nothing more comes."""


class SendBatch:
    """One worker's send buffers, shared by all its peers."""

    def __init__(self, mtu: int, conn, vnet_hdr: bool, on_write_error=None):
        self.mtu = mtu
        self.conn = conn
        self.vnet_hdr = vnet_hdr
        self.inbuf = bytearray(READ_SIZE + 64)
        self.header = bytearray(tcpgro.VNET_HDR_LEN)
        self.out = bytearray(GSO_MAX_BYTES + READ_SIZE + 2 * MESSAGE_OVERHEAD)
        self._in = memoryview(self.inbuf)
        self._out = memoryview(self.out)
        self._iov = [memoryview(self.header), self._in[:READ_SIZE]] if vnet_hdr else [self._in[:READ_SIZE]]

    def read(self, fd: int) -> int | None:
        """One packet from fd into inbuf; its length, or None if none waits."""
        try:
            size = os.readv(fd, self._iov)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            if exc.errno == errno.EBADFD:
                raise TunGone(fd) from exc
            raise
        if self.vnet_hdr:
            # No offloads are enabled for reading (tun.py): the header is
            # all zeros and the packet complete, checksums included.
            size -= tcpgro.VNET_HDR_LEN
        return size

    def drain(self, device, peer, fd: int, budget: int = TUN_BATCH) -> None:
        now = device.clock.monotonic()
        keypair = send.sendable_keypair(peer, now)
        if keypair is None:
            self._drain_slowly(device, peer, fd, budget)
            return
        sock = self.conn.socket_for(peer.endpoint)
        run = _Run()
        sent = size_sent = 0
        data = False
        for _ in range(budget):
            size = self.read(fd)
            if size is None:
                break
            if keypair.send_counter >= REJECT_AFTER_MESSAGES:
                # The keypair is used up: this packet (and the rest) stage
                # for the next session, as packet_for_peer decides.
                send.packet_for_peer(device, peer, bytes(self._in[:size]))
                break
            padded = send.padded_length(size, self.mtu)
            if padded > size:
                self.inbuf[size:padded] = _ZEROS[:padded - size]
            message = MESSAGE_OVERHEAD + padded
            if not run.fits(message):
                self.conn.send_run(sock, self._out[:run.end], run.size, peer.endpoint)
                run = _Run()
            send.seal_into(keypair, self._in[:padded], self._out[run.end:run.end + message])
            run.add(message)
            sent += 1
            size_sent += message
            data = data or size > 0
        if run.count:
            self.conn.send_run(sock, self._out[:run.end], run.size, peer.endpoint)
        if sent:
            send.sealed_batch(device, peer, keypair, sent, size_sent, data, now)

    def _drain_slowly(self, device, peer, fd: int, budget: int) -> None:
        for _ in range(budget):
            size = self.read(fd)
            if size is None:
                return
            send.packet_for_peer(device, peer, bytes(self._in[:size]))


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

    def __init__(self, mtu: int, tun, vnet_hdr: bool):
        self.tun = tun                   # worker.WorkerTun: fds by slot, error count
        self.vnet_hdr = vnet_hdr
        self.slot = -(-(max(mtu, 1280) + MESSAGE_OVERHEAD) // 64) * 64
        self.buf = bytearray(GRO_BUFFER)
        self.arena = bytearray(ARENA_SLOTS * self.slot)
        self._buf = memoryview(self.buf)
        self._arena = memoryview(self.arena)
        self.used = 0
        self.pending: dict = {}                  # peer -> [plaintext views]
        self.opened: dict = {}                   # keypair -> [peer, messages, bytes]

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
        keypair = receive.open_into(device, message, out, now)
        if keypair is None:
            return
        opened = self.opened.get(keypair)
        if opened is None:
            opened = self.opened[keypair] = [keypair.peer, 0, 0, False]
        opened[1] += 1
        opened[2] += len(message)
        if length:
            opened[3] = True
            self._deliver(device, keypair.peer, out)

    def _deliver(self, device, peer, plaintext: memoryview) -> None:
        length = receive.inner_length(plaintext)
        if not length:
            device.drop("malformed_inner", peer)
            return
        self.used += 1
        packets = self.pending.get(peer)
        if packets is None:
            self.pending[peer] = [plaintext[:length]]
        else:
            packets.append(plaintext[:length])

    def _authenticated(self, device, source: tuple, now: float) -> None:
        """Once per keypair and batch: what receive.authenticated changes."""
        for keypair, (peer, messages, size, data) in self.opened.items():
            receive.authenticated(device, peer, keypair, source, size, now, messages)
            if data:
                peer.timers.data_received()
        self.opened.clear()

    def flush(self) -> None:
        for peer, packets in self.pending.items():
            self.tun.write_many(packets, peer.queue)
        self.pending.clear()
        self.used = 0
