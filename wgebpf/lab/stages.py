"""Per-stage microbenchmark of the data plane: `python -m wgebpf.lab.stages`.

    python -m wgebpf.lab.stages [--packets N] [--size 1420] [--json FILE]

Each stage a packet goes through in a wgebpf worker is timed alone, on this
kernel, in two network namespaces of its own (built with wgebpf.lab.netns,
removed at the end; the root namespace is never touched):

      netns tx (the measuring process runs here)       netns rx
   +---------------------------------------+       +--------------------+
   | TUN   198.51.100.1/24                 |       |                    |
   |  (UDP to 198.51.100.2 fills it)       |       |                    |
   | blackhole 203.0.113.0/24, forwarding  |       |                    |
   |  (packets written to the TUN end here)|       |                    |
   | veth  192.0.2.1  ---------------------+-------+- 192.0.2.2  veth   |
   |                                       |       |  UDP :9001 plain   |
   |                                       |       |  UDP :9002 UDP_GRO |
   +---------------------------------------+       |  [XDP_PASS, native]|
                                                   +--------------------+

The parent builds the namespaces and starts `ip netns exec <tx> python -m
wgebpf.lab.stages --child ...`; the child opens the receiving sockets and
attaches the XDP program in rx with setns(2) and comes back to tx.

How to read the figures
-----------------------

- `us/pkt` is wall-clock microseconds per packet of the timed loop only:
  the filling of a queue that a stage then drains (TUN read, UDP receive,
  channel receive) and the draining after a stage that fills one (UDP send,
  channel send) are outside the clock. Each variant runs chunks of at most
  CHUNK packets until --packets are done or VARIANT_SECONDS of timed work
  have passed, after one untimed warm-up chunk.
- `pkts/s` is 1e6 / (us/pkt): what one CPU running only this stage in a
  Python loop could do.
- `Gbit/s` is pkts/s x --size x 8, for every stage: the tunnel payload (the
  inner packet of --size bytes) this stage alone would allow. On the wire a
  data message is --size + 32 bytes of UDP payload (16-byte header, 16-byte
  tag); the TUN stages move --size-byte IP packets.
- `us/batch` and `pkts/batch` are per system call where a call moves several
  packets (UDP_SEGMENT sends, UDP_GRO receives); for the UDP_GRO rows
  pkts/batch is the datagrams one recvmsg returned on average, i.e. how
  much coalescing really happened.
- Kernel work that runs in softirq on the calling CPU is inside the figure:
  a veth hands the packet to the other namespace on the sending CPU, so
  "UDP send" includes the receiving side's IP/UDP processing up to the
  socket queue (and the XDP program and GRO, when XDP is attached); "TUN
  write" includes routing the packet into the blackhole.
- The UDP send rows send to the UDP_GRO socket, so a UDP_SEGMENT packet
  that stays whole is queued whole; "delivered" in the note is the share
  of datagrams that reached that socket.
- The "gro" and "xdp" lines above the table say whether the receiving
  veth has its GRO feature on (ETHTOOL_GGRO) and how XDP is attached. A
  UDP_SEGMENT packet crosses a veth whole unless an XDP program (one
  without frags support) is attached at the other end: then the sender
  segments it in software, and with the veth's GRO off nothing coalesces
  the segments again, so a UDP_GRO socket reads one datagram per call
  (pkts/batch 1.0).
- A row whose system call the kernel refused shows the errno instead of
  figures (e.g. 64 segments of 1452 bytes exceed UDP's 65507-byte limit:
  EMSGSIZE).

Figures from one run are noisy (a few %); compare variants within a run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from . import netns

# -- Parameters ---------------------------------------------------------------

DEFAULT_PACKETS = 50_000
DEFAULT_SIZE = 1420
MIN_SIZE, MAX_SIZE = 64, 1440       # inner packet; MAX keeps a data message in a 1500 MTU
CHUNK = 2048                        # packets per timed chunk (fits every queue used)
WARMUP = 64                         # packets of the untimed first chunk
VARIANT_SECONDS = 1.5               # timed work per variant, at most
SETTLE_SECONDS = 0.005              # after filling a queue, for softirq work in flight
CHILD_TIMEOUT = 240

SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
UDP_MAX_PAYLOAD = 65507
CLONE_NEWNET = 0x40000000
GSO_SEGMENTS = (16, 32, 64)
RECV_FILL_SEGMENTS = 32             # segments per sendmsg when filling a GRO socket
SOCKET_BUFFER = 32 << 20            # SO_RCVBUFFORCE / SO_SNDBUFFORCE (root)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33     # <asm-generic/socket.h>; not in Python's socket

WG_OVERHEAD = 32                    # data header (16) + Poly1305 tag (16)
IP_UDP_HEADERS = 28
DATA_HEADER = struct.Struct("<IIQ") # type 4, receiver index, 64-bit counter
NONCE = struct.Struct("<4xQ")       # 32 zero bits, 64-bit little-endian counter
MESSAGE_DATA, RECEIVER_INDEX = 4, 0x1234_5678

TX_ADDR, RX_ADDR = "192.0.2.1", "192.0.2.2"
TUN_ADDR, TUN_PEER = "198.51.100.1", "198.51.100.2"
SINK_NET, SINK_ADDR = "203.0.113.0/24", "203.0.113.9"
TUN_PORT, PLAIN_PORT, GRO_PORT = 9, 9001, 9002
TUN_QUEUE_LEN = 10_000

XDP_PASS_PROGRAM = """
int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
"""

# The stages, in the order a packet meets them (send path, then receive path).
STAGES = ("TUN read", "TSO split", "encrypt", "UDP send", "UDP receive", "replay window",
          "decrypt", "TCP GRO", "TUN write", "channel")

clock = time.perf_counter_ns


# -- Timing -------------------------------------------------------------------

# chunk(first, k) -> (timed nanoseconds, packets, calls): runs about k
# packets starting at packet number `first`, timing only the stage itself.
Chunk = Callable[[int, int], "tuple[int, int, int]"]


@dataclass
class Tally:
    ns: int = 0
    packets: int = 0
    calls: int = 0


def measure(chunk: Chunk, total: int) -> Tally:
    """Run chunk until `total` packets or VARIANT_SECONDS of timed work."""
    chunk(0, min(WARMUP, total))
    tally = Tally()
    wall_limit = time.monotonic() + 3 * VARIANT_SECONDS
    while (tally.packets < total and tally.ns < VARIANT_SECONDS * 1e9
           and time.monotonic() < wall_limit):
        ns, packets, calls = chunk(tally.packets, min(CHUNK, total - tally.packets))
        if packets <= 0:
            break
        tally.ns += ns
        tally.packets += packets
        tally.calls += calls
    return tally


def make_row(stage: str, variant: str, tally: Tally | None, size: int,
             note: str = "", error: str | None = None, batched: bool = False) -> dict:
    """One table row; figures are None when the variant failed. A batched
    variant (several packets per system call possible) also gets per-call figures."""
    row = {"stage": stage, "variant": variant, "packets": 0, "us_per_packet": None,
           "pps": None, "gbps": None, "calls": 0, "us_per_call": None,
           "packets_per_call": None, "note": note, "error": error}
    if error is None and (tally is None or tally.packets == 0):
        row["error"] = "no packet was measured"
    if row["error"] is not None:
        return row
    us = tally.ns / 1e3
    row.update(packets=tally.packets, us_per_packet=us / tally.packets,
               pps=tally.packets / (us / 1e6), calls=tally.calls)
    row["gbps"] = row["pps"] * size * 8 / 1e9
    if batched and tally.calls:
        row.update(us_per_call=us / tally.calls,
                   packets_per_call=tally.packets / tally.calls)
    return row


def measured_row(stage: str, variant: str, chunk: Chunk, lab: "Lab",
                 note: Callable[[Tally], str] = lambda t: "", batched: bool = False) -> dict:
    """measure() one variant; a refused system call becomes the row's error."""
    try:
        tally = measure(chunk, lab.packets)
    except OSError as exc:
        return make_row(stage, variant, None, lab.size, error=describe_error(exc))
    return make_row(stage, variant, tally, lab.size, note(tally), batched=batched)


def describe_error(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"kernel refused: {name} ({exc.strerror})"


# -- Packets ------------------------------------------------------------------


def ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_udp_packet(src: str, dst: str, size: int) -> bytes:
    """A `size`-byte IPv4/UDP packet (UDP checksum 0: none)."""
    payload = bytes(size - IP_UDP_HEADERS)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    header = header[:10] + struct.pack("!H", ip_checksum(header)) + header[12:]
    udp = struct.pack("!HHHH", 40000, TUN_PORT, size - 20, 0)
    return header + udp + payload


def nonce_bytes(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


# -- The child's environment --------------------------------------------------


def setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class Lab:
    """What the child measures with: the TUN, the sockets, the namespaces."""

    def __init__(self, args: argparse.Namespace):
        self.packets, self.size = args.packets, args.size
        self.wire = args.size + WG_OVERHEAD          # UDP payload of a data message
        self.rx_dev = args.rx_dev
        self.tx_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.rx_fd = os.open(f"/var/run/netns/{args.rx_ns}", os.O_RDONLY)
        self.tun_fd = self._make_tun(args.tun)
        self.sender = self._udp_socket()
        with self.in_rx():
            self.rx_plain = self._receiver(PLAIN_PORT, gro=False)
            self.rx_gro = self._receiver(GRO_PORT, gro=True)

    @contextlib.contextmanager
    def in_rx(self) -> Iterator[None]:
        """Switch this (single-threaded) process into rx, and back to tx."""
        setns(self.rx_fd)
        try:
            yield
        finally:
            setns(self.tx_fd)

    def _make_tun(self, name: str) -> int:
        from ..dataplane.tun import Tun
        tun = Tun.create(name)
        mtu = str(max(1500, self.size))
        netns.run(["ip", "link", "set", name, "mtu", mtu, "txqueuelen", str(TUN_QUEUE_LEN)])
        # No IPv6 on it: nothing but our packets lands in its queue.
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        netns.run(["ip", "addr", "add", f"{TUN_ADDR}/24", "dev", name])
        netns.run(["ip", "link", "set", name, "up"])
        self.tun = tun
        return tun.fds[0]

    @staticmethod
    def _udp_socket() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
        return sock

    @staticmethod
    def _receiver(port: int, gro: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        if gro:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        sock.bind((RX_ADDR, port))
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for sock in (self.sender, self.rx_plain, self.rx_gro):
            sock.close()
        self.tun.close()
        os.close(self.tx_fd)
        os.close(self.rx_fd)


# -- Draining queues ----------------------------------------------------------


def drain_read(fd: int) -> int:
    """os.read until the queue is empty; packets read."""
    n, read = 0, os.read
    try:
        while True:
            read(fd, 65536)
            n += 1
    except BlockingIOError:
        return n


def drain_readv(fd: int, buffers: list) -> int:
    """os.readv into one preallocated buffer until the queue is empty."""
    n, readv = 0, os.readv
    try:
        while True:
            readv(fd, buffers)
            n += 1
    except BlockingIOError:
        return n


def drain_recvfrom(sock: socket.socket) -> tuple[int, int]:
    """recvfrom until empty: (datagrams, calls)."""
    n, recvfrom = 0, sock.recvfrom
    try:
        while True:
            recvfrom(65535)
            n += 1
    except BlockingIOError:
        return n, n


GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


def drain_gro(sock: socket.socket, buffers: list) -> tuple[int, int]:
    """recvmsg_into with UDP_GRO until empty: (datagrams, calls).

    A coalesced read carries a UDP_GRO cmsg with the segment size (an int);
    the datagrams in it are its length divided by that, rounded up.
    """
    datagrams = calls = 0
    recv = sock.recvmsg_into
    try:
        while True:
            nbytes, ancillary, _, _ = recv(buffers, GRO_CMSG_SPACE)
            calls += 1
            datagrams += segments_in(nbytes, ancillary)
    except BlockingIOError:
        return datagrams, calls


def segments_in(nbytes: int, ancillary: list) -> int:
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            segment = struct.unpack("=i", data[:4])[0]
            return max(1, -(-nbytes // segment))
    return 1


# -- Stages -------------------------------------------------------------------


def tun_read_rows(lab: Lab) -> list[dict]:
    buffers = [bytearray(65536)]
    variants = (("os.read per packet", lambda: drain_read(lab.tun_fd)),
                ("os.readv into a preallocated buffer",
                 lambda: drain_readv(lab.tun_fd, buffers)))
    return [measured_row("TUN read", name, tun_read_chunk(lab, drain), lab)
            for name, drain in variants]


def tun_read_chunk(lab: Lab, drain: Callable[[], int]) -> Chunk:
    payload = bytes(lab.size - IP_UDP_HEADERS)

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        for _ in range(k):                              # untimed: fill the TUN
            lab.sender.sendto(payload, (TUN_PEER, TUN_PORT))
        t0 = clock()
        got = drain()
        return clock() - t0, got, got
    return chunk


def encrypt_rows(lab: Lab) -> list[dict]:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    aead, packet = ChaCha20Poly1305(os.urandom(32)), os.urandom(lab.size)
    return [measured_row("encrypt", "encrypt (allocating) + header bytes",
                         encrypt_allocating(aead, packet), lab),
            measured_row("encrypt", "encrypt_into + pack_into (preallocated)",
                         encrypt_preallocated(aead, packet), lab)]


def encrypt_allocating(aead, packet: bytes) -> Chunk:
    """What send.encrypt_and_send does: header + encrypt(), two new objects."""
    def chunk(first: int, k: int) -> tuple[int, int, int]:
        pack, seal = DATA_HEADER.pack, aead.encrypt
        t0 = clock()
        for counter in range(first, first + k):
            pack(MESSAGE_DATA, RECEIVER_INDEX, counter) + seal(
                nonce_bytes(counter), packet, None)
        return clock() - t0, k, k
    return chunk


def encrypt_preallocated(aead, packet: bytes) -> Chunk:
    """The message assembled in place: header and nonce packed, body sealed into it."""
    message = bytearray(DATA_HEADER.size + len(packet) + 16)
    body, nonce = memoryview(message)[DATA_HEADER.size:], bytearray(NONCE.size)

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        pack_header, pack_nonce, seal = DATA_HEADER.pack_into, NONCE.pack_into, aead.encrypt_into
        t0 = clock()
        for counter in range(first, first + k):
            pack_header(message, 0, MESSAGE_DATA, RECEIVER_INDEX, counter)
            pack_nonce(nonce, 0, counter)
            seal(nonce, packet, None, body)
        return clock() - t0, k, k
    return chunk


def decrypt_rows(lab: Lab) -> list[dict]:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    aead, packet = ChaCha20Poly1305(os.urandom(32)), os.urandom(lab.size)
    return [measured_row("decrypt", "decrypt (allocating) of message[16:]",
                         decrypt_chunk(aead, packet, decrypt_allocating), lab),
            measured_row("decrypt", "decrypt_into a preallocated buffer",
                         decrypt_chunk(aead, packet, decrypt_preallocated), lab)]


def sealed_messages(aead, packet: bytes, first: int, k: int) -> list[bytes]:
    return [DATA_HEADER.pack(MESSAGE_DATA, RECEIVER_INDEX, c)
            + aead.encrypt(nonce_bytes(c), packet, None) for c in range(first, first + k)]


def decrypt_chunk(aead, packet: bytes, open_all: Callable) -> Chunk:
    def chunk(first: int, k: int) -> tuple[int, int, int]:
        messages = sealed_messages(aead, packet, first, k)   # untimed
        t0 = clock()
        open_all(aead, messages, len(packet))
        return clock() - t0, k, k
    return chunk


def decrypt_allocating(aead, messages: list[bytes], size: int) -> None:
    unpack, open_ = DATA_HEADER.unpack_from, aead.decrypt
    for message in messages:
        counter = unpack(message)[2]
        open_(nonce_bytes(counter), message[DATA_HEADER.size:], None)


def decrypt_preallocated(aead, messages: list[bytes], size: int) -> None:
    unpack, pack_nonce, open_into = DATA_HEADER.unpack_from, NONCE.pack_into, aead.decrypt_into
    plaintext, nonce = bytearray(size), bytearray(NONCE.size)
    for message in messages:
        pack_nonce(nonce, 0, unpack(message)[2])
        open_into(nonce, memoryview(message)[DATA_HEADER.size:], None, plaintext)


def send_variants(lab: Lab) -> list[tuple[str, int]]:
    """(variant, segments per call) of the UDP send stage."""
    return [("sendto per datagram", 1)] + [
        (f"sendmsg UDP_SEGMENT x{s}", s) for s in GSO_SEGMENTS]


def udp_send_rows(lab: Lab, xdp: str) -> list[dict]:
    return [send_row(lab, name + xdp, segments) for name, segments in send_variants(lab)]


def send_row(lab: Lab, variant: str, segments: int) -> dict:
    payload = os.urandom(lab.wire)
    send = send_each(lab, payload) if segments == 1 else send_segmented(lab, payload, segments)
    try:
        send(1)                                     # the kernel may refuse it outright
    except OSError as exc:
        return make_row("UDP send", variant, None, lab.size, error=gso_error(exc, lab, segments))
    time.sleep(SETTLE_SECONDS)
    drain_gro(lab.rx_gro, [bytearray(65536)])      # the probe is not counted
    counts = {"sent": 0, "delivered": 0}
    return measured_row("UDP send", variant, udp_send_chunk(lab, send, segments, counts), lab,
                        lambda tally: delivered_note(counts), batched=segments > 1)


def gso_error(exc: OSError, lab: Lab, segments: int) -> str:
    text = describe_error(exc)
    if exc.errno == errno.EMSGSIZE:
        text += (f": {segments} x {lab.wire} B = {segments * lab.wire} B "
                 f"> {UDP_MAX_PAYLOAD} B UDP maximum")
    return text


def delivered_note(counts: dict) -> str:
    return f"delivered {100 * counts['delivered'] / max(1, counts['sent']):.0f} %"


def send_each(lab: Lab, payload: bytes) -> Callable[[int], None]:
    def send(calls: int) -> None:
        sendto, address = lab.sender.sendto, (RX_ADDR, GRO_PORT)
        for _ in range(calls):
            sendto(payload, address)
    return send


def send_segmented(lab: Lab, payload: bytes, segments: int) -> Callable[[int], None]:
    """sendmsg of `segments` equal datagrams in one buffer, UDP_SEGMENT in a cmsg."""
    buffers = [payload * segments]
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(payload)))]

    def send(calls: int) -> None:
        sendmsg, address = lab.sender.sendmsg, (RX_ADDR, GRO_PORT)
        for _ in range(calls):
            sendmsg(buffers, cmsg, 0, address)
    return send


def udp_send_chunk(lab: Lab, send: Callable[[int], None], segments: int,
                   counts: dict) -> Chunk:
    """Time the sends; then (untimed) empty the receiving socket, counting."""
    buffers = [bytearray(65536)]

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        calls = max(1, k // segments)
        t0 = clock()
        send(calls)
        elapsed = clock() - t0
        time.sleep(SETTLE_SECONDS)
        counts["sent"] += calls * segments
        counts["delivered"] += drain_gro(lab.rx_gro, buffers)[0]
        return elapsed, calls * segments, calls
    return chunk


def receive_variants(lab: Lab) -> list[tuple[str, bool, int]]:
    """(variant, UDP_GRO socket?, segments per sendmsg that fill it) of UDP receive."""
    fill = max(1, min(RECV_FILL_SEGMENTS, UDP_MAX_PAYLOAD // lab.wire))
    return [("recvfrom per datagram", False, 1),
            ("recvmsg_into + UDP_GRO, sender sendto", True, 1),
            (f"recvmsg_into + UDP_GRO, sender UDP_SEGMENT x{fill}", True, fill)]


def udp_recv_rows(lab: Lab, xdp: str) -> list[dict]:
    buffers = [bytearray(65536)]
    rows = []
    for name, gro, segments in receive_variants(lab):
        sock = lab.rx_gro if gro else lab.rx_plain
        drain = (lambda: drain_gro(lab.rx_gro, buffers)) if gro else (
            lambda: drain_recvfrom(lab.rx_plain))
        rows.append(measured_row("UDP receive", name + xdp,
                                 udp_recv_chunk(lab, sock, segments, drain), lab,
                                 batched=gro))
    return rows


def udp_recv_chunk(lab: Lab, sock: socket.socket, segments: int,
                   drain: Callable[[], tuple[int, int]]) -> Chunk:
    payload = os.urandom(lab.wire)
    buffers = [payload * segments]
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", lab.wire))] if segments > 1 else []
    address = (RX_ADDR, sock.getsockname()[1])

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        for _ in range(max(1, k // segments)):          # untimed: fill the socket
            lab.sender.sendmsg(buffers, cmsg, 0, address)
        time.sleep(SETTLE_SECONDS)
        t0 = clock()
        datagrams, calls = drain()
        return clock() - t0, datagrams, calls
    return chunk


def tun_write_rows(lab: Lab) -> list[dict]:
    packet = ipv4_udp_packet(TUN_PEER, SINK_ADDR, lab.size)

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        write, fd = os.write, lab.tun_fd
        t0 = clock()
        for _ in range(k):
            write(fd, packet)
        return clock() - t0, k, k
    return [measured_row("TUN write", "os.write per packet (forwarded to a blackhole)",
                         chunk, lab)]


def checksum_rows(lab: Lab) -> list[dict]:
    """What reading TSO super-packets from the TUN would add: a TCP checksum
    per segment, in Python (the ones' complement sum of 16-bit words is the
    number mod 0xffff, the fastest way found without a C extension)."""
    payload = os.urandom(lab.size)

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        from_bytes = int.from_bytes
        t0 = clock()
        for _ in range(k):
            from_bytes(payload, "big") % 0xFFFF
        return clock() - t0, k, k
    return [measured_row("TSO split", "checksum of one segment in Python", chunk, lab)]


def coalesce_rows(lab: Lab) -> list[dict]:
    """tcpgro.coalesce on 44 back-to-back segments of one flow (one 64 KiB
    super-packet), per segment."""
    from ..dataplane.tcpgro import coalesce
    segments = tcp_segments(44, lab.size)

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        calls = max(1, k // len(segments))
        t0 = clock()
        for _ in range(calls):
            coalesce(segments)
        return clock() - t0, calls * len(segments), calls
    return [measured_row("TCP GRO", "coalesce 44 segments of one flow", chunk, lab)]


def tcp_segments(count: int, size: int) -> list[bytes]:
    """`count` consecutive full segments of one IPv4 TCP flow, ACK only."""
    payload = size - 40
    out = []
    for i in range(count):
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000 + i * payload, 1, 5 << 4, 0x10,
                          512, 0, 0)
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 7 + i, 0x4000, 64, 6, 0,
                                       socket.inet_aton(TUN_PEER), socket.inet_aton(SINK_ADDR)))
        struct.pack_into("!H", header, 10, ip_checksum(bytes(header)))
        out.append(bytes(header) + tcp + bytes(payload))
    return out


def replay_rows(lab: Lab) -> list[dict]:
    from ..wireguard.replay import ReplayWindow
    window = ReplayWindow()

    def chunk(first: int, k: int) -> tuple[int, int, int]:
        would, accept = window.would_accept, window.accept
        t0 = clock()
        for counter in range(first + 1_000_000, first + 1_000_000 + k):
            if would(counter):
                accept(counter)
        return clock() - t0, k, k
    return [measured_row("replay window", "would_accept + accept, in order", chunk, lab)]


def channel_rows(lab: Lab) -> list[dict]:
    from ..dataplane import channel
    from ..dataplane.commands import TimerEvents
    a, b = channel.pair()
    b.setblocking(False)
    message = TimerEvents({0: 8})
    try:
        return [measured_row("channel", "send TimerEvents (pickle + send)",
                             channel_send_chunk(channel, a, b, message), lab),
                measured_row("channel", "receive TimerEvents (recv_fds + unpickle)",
                             channel_receive_chunk(channel, a, b, message), lab)]
    finally:
        a.close()
        b.close()


def drain_channel(channel, sock: socket.socket) -> int:
    n = 0
    while channel.receive(sock) is not None:
        n += 1
    return n


def channel_send_chunk(channel, a, b, message) -> Chunk:
    def chunk(first: int, k: int) -> tuple[int, int, int]:
        send = channel.send
        t0 = clock()
        for _ in range(k):
            send(a, message)
        elapsed = clock() - t0
        drain_channel(channel, b)
        return elapsed, k, k
    return chunk


def channel_receive_chunk(channel, a, b, message) -> Chunk:
    def chunk(first: int, k: int) -> tuple[int, int, int]:
        for _ in range(k):
            channel.send(a, message)
        t0 = clock()
        got = drain_channel(channel, b)
        return clock() - t0, got, got
    return chunk


# -- XDP on the receiving veth --------------------------------------------------


class Xdp:
    """A trivial XDP_PASS program attached natively (driver mode) to rx's veth."""

    def __init__(self, lab: Lab):
        from bcc import BPF
        self.lab, self.BPF = lab, BPF
        with lab.in_rx():
            self.bpf = BPF(text=XDP_PASS_PROGRAM)
            fn = self.bpf.load_func("xdp_pass", BPF.XDP)
            BPF.attach_xdp(lab.rx_dev, fn, BPF.XDP_FLAGS_DRV_MODE)
            self.mode = xdp_mode(lab.rx_dev)
            self.gro = gro_feature(lab.rx_dev)

    def close(self) -> None:
        with self.lab.in_rx():
            self.BPF.remove_xdp(self.lab.rx_dev, self.BPF.XDP_FLAGS_DRV_MODE)
        self.bpf.cleanup()


SIOCETHTOOL, ETHTOOL_GGRO = 0x8946, 0x2B


def gro_feature(dev: str) -> str:
    """The device's generic-receive-offload flag (ETHTOOL_GGRO), in this namespace."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_GGRO, 0))
    ifreq = struct.pack("16sP", dev.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock, SIOCETHTOOL, ifreq)
    except OSError as exc:
        return f"unknown ({describe_error(exc)})"
    return "on" if struct.unpack_from("II", value.raw)[1] else "off"


def xdp_mode(dev: str) -> str:
    """How `ip` sees the XDP attachment of dev (in this process's namespace)."""
    out = netns.run(["ip", "-j", "-d", "link", "show", "dev", dev], check=False).stdout
    try:
        mode = json.loads(out)[0].get("xdp", {}).get("mode")
    except (ValueError, IndexError, AttributeError):
        return "unknown"
    return {1: "native (driver)", 2: "generic (skb)", 3: "offload"}.get(mode, f"mode {mode}")


def xdp_rows(lab: Lab, observations: dict) -> list[dict]:
    """The UDP send and receive rows again with XDP attached, or their error rows."""
    suffix = ", XDP"
    try:
        xdp = Xdp(lab)
    except Exception as exc:            # bcc missing, no headers, attach refused
        error = f"XDP not attached: {type(exc).__name__}: {exc}"
        observations["xdp"] = error
        return ([make_row("UDP send", name + suffix, None, lab.size, error=error)
                 for name, _ in send_variants(lab)]
                + [make_row("UDP receive", name + suffix, None, lab.size, error=error)
                   for name, _, _ in receive_variants(lab)])
    observations["xdp"] = (f"attached to {lab.rx_dev}: {xdp.mode}; its GRO feature "
                           f"(ETHTOOL_GGRO) with XDP: {xdp.gro}")
    try:
        return udp_send_rows(lab, suffix) + udp_recv_rows(lab, suffix)
    finally:
        xdp.close()


# -- The child: every stage, in the namespaces ---------------------------------


def _log(text: str) -> None:
    print(f"stages: {text}", file=sys.stderr, flush=True)


def in_namespace(name: str | None) -> bool:
    """Whether this process is in network namespace `name` (of `ip netns`)."""
    if not name:
        return False
    here, there = os.stat("/proc/self/ns/net"), os.stat(f"/var/run/netns/{name}")
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def child_steps(observations: dict) -> list[tuple[str, Callable[[Lab], list[dict]]]]:
    return [("TUN read", tun_read_rows), ("TSO split", checksum_rows),
            ("encrypt", encrypt_rows),
            ("UDP send", lambda lab: udp_send_rows(lab, "")),
            ("UDP receive", lambda lab: udp_recv_rows(lab, "")),
            ("UDP send and receive with XDP", lambda lab: xdp_rows(lab, observations)),
            ("replay window", replay_rows), ("decrypt", decrypt_rows),
            ("TCP GRO", coalesce_rows), ("TUN write", tun_write_rows),
            ("channel", channel_rows)]


def run_child(args: argparse.Namespace) -> int:
    """Measure every stage; print {"rows": [...], "observations": {...}} as JSON."""
    if not in_namespace(args.tx_ns):
        print("stages --child must run inside its --tx-ns (ip netns exec)", file=sys.stderr)
        return 2
    lab, observations, rows = Lab(args), {}, []
    with lab.in_rx():
        observations["gro"] = f"{lab.rx_dev} GRO feature (ETHTOOL_GGRO) without XDP: " \
                              f"{gro_feature(lab.rx_dev)}"
    try:
        for name, step in child_steps(observations):
            started = time.monotonic()
            rows += step(lab)
            _log(f"{name}: {time.monotonic() - started:.1f} s")
    finally:
        lab.close()
    rows.sort(key=lambda row: STAGES.index(row["stage"]))    # stable: XDP after plain
    json.dump({"rows": rows, "observations": observations}, sys.stdout)
    return 0


# -- The parent: the namespaces, the report ------------------------------------


class Topology:
    """Namespaces tx and rx joined by a veth pair; a blackhole route in tx."""

    def __init__(self):
        self.tx = netns.Namespace("stx")
        try:
            self.rx = netns.Namespace("srx")
            self.tx_dev, self.rx_dev = netns.veth(
                self.tx, self.rx, [f"{TX_ADDR}/24"], [f"{RX_ADDR}/24"],
                prefix_a="st", prefix_b="sr")
            self.tx.sysctl("net.ipv4.ip_forward", 1)
            self.tx.ip("route", "add", "blackhole", SINK_NET)
            self.tun = netns.unique_ifname("stun")
        except BaseException:
            self.close()
            raise

    def child_argv(self, packets: int, size: int) -> list[str]:
        return ["ip", "netns", "exec", self.tx.name, sys.executable, "-m",
                "wgebpf.lab.stages", "--child", "--packets", str(packets), "--size", str(size),
                "--tx-ns", self.tx.name, "--rx-ns", self.rx.name, "--rx-dev", self.rx_dev,
                "--tun", self.tun]

    @property
    def names(self) -> list[str]:
        return [ns.name for ns in (self.tx, getattr(self, "rx", None)) if ns is not None]

    def close(self) -> None:
        for attr in ("rx", "tx"):
            ns = getattr(self, attr, None)
            if ns is not None:
                ns.close()


def run_stages(packets: int, size: int) -> dict:
    """Build the namespaces, run the child in them, remove them; the result."""
    topo = Topology()
    try:
        proc = subprocess.run(topo.child_argv(packets, size), stdout=subprocess.PIPE,
                              text=True, timeout=CHILD_TIMEOUT)
    finally:
        topo.close()
    if proc.returncode != 0:
        raise RuntimeError(f"the measuring process exited {proc.returncode}")
    result = json.loads(proc.stdout)
    result.update(parameters={"packets": packets, "size": size, "chunk": CHUNK,
                              "variant_seconds": VARIANT_SECONDS},
                  machine={"kernel": platform.release(), "cpus": os.cpu_count(),
                           "python": platform.python_version()},
                  namespaces=topo.names)
    return result


COLUMNS = (("stage", "stage", "{}"), ("variant", "variant", "{}"),
           ("us_per_packet", "us/pkt", "{:.3f}"), ("pps", "pkts/s", "{:,.0f}"),
           ("gbps", "Gbit/s", "{:.2f}"), ("us_per_call", "us/batch", "{:.2f}"),
           ("packets_per_call", "pkts/batch", "{:.1f}"))


def format_table(rows: list[dict]) -> str:
    """The rows as a plain-text table; a failed row shows its error."""
    cells = [[label for _, label, _ in COLUMNS] + ["note"]]
    for row in rows:
        line = [fmt.format(row[key]) if row[key] is not None else "-"
                for key, _, fmt in COLUMNS]
        cells.append(line + [row["error"] or row["note"]])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    out = []
    for line in cells:
        left = [line[i].ljust(widths[i]) for i in range(2)]
        right = [line[i].rjust(widths[i]) for i in range(2, len(COLUMNS))]
        out.append("  ".join(left + right + [line[-1]]).rstrip())
    return "\n".join(out) + "\n"


def print_report(result: dict) -> None:
    size, packets = result["parameters"]["size"], result["parameters"]["packets"]
    print(f"{size}-byte inner packets ({size + WG_OVERHEAD} B UDP payload on the wire), "
          f"up to {packets} packets per variant; kernel {result['machine']['kernel']}, "
          f"{result['machine']['cpus']} CPUs")
    for key, value in result["observations"].items():
        print(f"{key}: {value}")
    print(format_table(result["rows"]), end="")


def complete(rows: list[dict]) -> bool:
    """Every stage has at least one row with a positive figure."""
    return all(any((row["us_per_packet"] or 0) > 0 for row in rows if row["stage"] == stage)
               for stage in STAGES)


# -- Entry point ----------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wgebpf.lab.stages",
        description="Time each stage of wgebpf's data plane alone (needs root).")
    parser.add_argument("--packets", type=int, default=DEFAULT_PACKETS,
                        help=f"packets per variant (default {DEFAULT_PACKETS}; each variant "
                             f"also stops after {VARIANT_SECONDS:g} s of timed work)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help=f"inner packet size in bytes, {MIN_SIZE}..{MAX_SIZE} "
                             f"(default {DEFAULT_SIZE})")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    for hidden in ("--tx-ns", "--rx-ns", "--rx-dev", "--tun"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.packets < 1:
        parser.error("--packets must be at least 1")
    if not MIN_SIZE <= args.size <= MAX_SIZE:
        parser.error(f"--size must be {MIN_SIZE}..{MAX_SIZE}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    if os.geteuid() != 0:
        print("python -m wgebpf.lab.stages needs root (network namespaces)", file=sys.stderr)
        return 1
    try:
        result = run_stages(args.packets, args.size)
    except (OSError, RuntimeError, ValueError, netns.CommandError,
            subprocess.TimeoutExpired) as exc:
        print(f"stages: {exc}", file=sys.stderr)
        return 1
    finally:
        netns.close_all()
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0 if complete(result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
