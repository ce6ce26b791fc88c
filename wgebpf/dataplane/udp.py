"""The UDP side: one IPv4 and one IPv6 socket on the listen port, bound to
the underlay interface, marked with FwMark."""

import errno
import logging
import socket
import struct
from typing import Callable

log = logging.getLogger("wgebpf")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_MARK = getattr(socket, "SO_MARK", 36)
SOCKET_BUFFER = 4 << 20
RECV_BATCH = 64

# UDP segmentation offload, <linux/udp.h>. Send: one sendmsg carries up to
# GSO_MAX_SEGMENTS datagrams of one size (the last may be shorter), named by
# a UDP_SEGMENT cmsg (a u16); the kernel splits them as late as it can.
# Receive: with UDP_GRO on, one recvmsg may return many datagrams of one
# flow back to back, and a UDP_GRO cmsg (an int) gives their size.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64                  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65535 - 20 - 8         # one IPv4 datagram's payload, the smaller limit
GRO_BUFFER = 65536
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(_INT.size)
# errnos that mean "this socket or its route cannot do GSO", not "this packet
# was lost": EIO comes from an egress device without checksum offload.
_GSO_REFUSED = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


def normalize(address: tuple) -> tuple[str, int]:
    """(host, port) from what recvfrom returns; keeps a link-local zone."""
    host, port = address[0], address[1]
    if len(address) == 4 and address[3] and "%" not in host:
        host = f"{host}%{address[3]}"
    return host, port


def receive_batch(sock: socket.socket) -> list:
    """About RECV_BATCH datagrams waiting on sock, as (data, (host, port)).
    With UDP_GRO on (UDPConn turns it on), one read may hold several
    datagrams of one source back to back: they are split here."""
    out: list = []
    buf = bytearray(GRO_BUFFER)
    while len(out) < RECV_BATCH:
        got = receive_coalesced(sock, buf)
        if got is None:
            break
        nbytes, size, source = got
        if not nbytes:
            out.append((b"", source))
            continue
        out += [(bytes(buf[start:min(start + size, nbytes)]), source)
                for start in range(0, nbytes, size)]
    return out


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced receives on sock; False where the kernel refuses."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def receive_coalesced(sock: socket.socket, buf: bytearray) -> tuple[int, int, tuple] | None:
    """One recvmsg into buf: (bytes, datagram size, source), None when the
    socket is empty. The bytes are back-to-back datagrams of one source, each
    `size` long but the last (which may be shorter); size == bytes when the
    kernel coalesced nothing. ICMP errors queued on the socket are skipped."""
    while True:
        try:
            nbytes, ancillary, _, address = sock.recvmsg_into([buf], _GRO_CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            continue                # ECONNREFUSED etc.: not ours to act on
        size = nbytes
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= _INT.size:
                size = _INT.unpack_from(data)[0] or nbytes
        return nbytes, size, normalize(address)


class SegmentSender:
    """Sends runs of equal-size datagrams to one endpoint with one sendmsg
    each (UDP GSO), and falls back for good to one sendto per datagram on a
    socket whose kernel, route or device refuses GSO."""

    def __init__(self):
        self.refused: set[int] = set()          # fds of sockets that cannot GSO
        self.errors = 0                          # datagrams lost to send errors

    def send(self, sock: socket.socket, view: memoryview, size: int, endpoint: tuple) -> None:
        """view holds back-to-back datagrams of `size` bytes, the last one
        possibly shorter; at most GSO_MAX_SEGMENTS of them."""
        if len(view) > size and sock.fileno() not in self.refused:
            try:
                sock.sendmsg([view], [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, endpoint)
                return
            except OSError as exc:
                if exc.errno not in _GSO_REFUSED:
                    self.errors += -(-len(view) // size)
                    return
                self.refused.add(sock.fileno())
                log.info("UDP GSO refused (%s): one send per datagram on this socket",
                         exc.strerror)
        for start in range(0, len(view), size):
            try:
                sock.sendto(view[start:start + size], endpoint)
            except OSError:
                self.errors += 1


class UDPConn:
    """The listen port's sockets: `group` sockets per family, joined in the
    same order into an SO_REUSEPORT group (position 0 is the control
    plane's, position k worker k's), so one reuseport program steers both
    families alike. `steering` (reuseport.py) is attached to each group.
    A wireguard.seams.ListenSocket."""

    def __init__(self, port: int = 0, underlay: str | None = None, fwmark: int = 0,
                 group: int = 1, steering=None):
        self.on_rebind: Callable[[], None] | None = None    # see watch_rebind
        self.underlay = underlay
        self.fwmark = fwmark
        self.group = group
        self.steering = steering
        self.send_errors = 0
        self.groups: list[list[socket.socket]] = [[], []]     # [IPv4 group, IPv6 group]
        self._bind(port)

    @property
    def sockets(self) -> list[socket.socket]:
        """The control plane's own pair (position 0)."""
        return [self.groups[0][0], self.groups[1][0]]

    def position(self, k: int) -> list[socket.socket]:
        return [self.groups[0][k], self.groups[1][k]]

    def _socket(self, family: int, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.group > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.underlay:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.underlay.encode())
            if self.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            sock.setblocking(False)
            # Every member, the control plane's too. Before the reuseport
            # program runs, GRO looks the flow's socket up by hash alone
            # (no skb, so no program) and merges only if that socket has
            # UDP_GRO; the hash has a per-namespace secret in it. With the
            # control plane's socket left out, a session's data stayed
            # unmerged whenever the hash fell on it (about 1 run in W + 1):
            # one datagram per read, and some 40 % less throughput for a
            # single stream between two wgebpf, for as long as the flow.
            enable_gro(sock)
            return sock
        except BaseException:
            sock.close()
            raise

    def _family_group(self, family: int, port: int) -> list[socket.socket]:
        first = self._socket(family, port)
        members = [first]
        try:
            port = first.getsockname()[1]
            if self.steering is not None:
                self.steering.attach(first)
            for _ in range(self.group - 1):
                members.append(self._socket(family, port))
        except BaseException:
            for sock in members:
                sock.close()
            raise
        return members

    def _bind(self, port: int) -> None:
        # Port 0: let the kernel pick for IPv4, then take the same for IPv6;
        # retry a few times in case that port is taken on IPv6.
        for _ in range(8):
            v4 = self._family_group(socket.AF_INET, port)
            chosen = v4[0].getsockname()[1]
            try:
                v6 = self._family_group(socket.AF_INET6, chosen)
            except OSError as exc:
                for sock in v4:
                    sock.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise
            self.close()
            self.groups = [v4, v6]
            self.listen_port = chosen
            return
        raise OSError(errno.EADDRINUSE, "no free UDP port for both IPv4 and IPv6")

    def watch_rebind(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after every successful rebind: control/attach.py
        hands the new sockets to the workers and the new port to the XDP
        guard."""
        self.on_rebind = callback

    def rebind(self, port: int) -> None:
        old = self.groups
        self.groups = [[], []]
        try:
            self._bind(port)
        except OSError:
            self.groups = old
            raise
        for sock in old[0] + old[1]:
            sock.close()
        if self.on_rebind is not None:
            self.on_rebind()

    def set_mark(self, mark: int) -> None:
        self.fwmark = mark
        for sock in self.groups[0] + self.groups[1]:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def send(self, data: bytes, endpoint: tuple) -> None:
        host = endpoint[0]
        sock = self.groups[1][0] if ":" in host else self.groups[0][0]
        try:
            sock.sendto(data, endpoint)
        except OSError:
            # A full buffer or an unreachable route: the packet is lost, as
            # on a wire; the protocol's timers recover.
            self.send_errors += 1

    @staticmethod
    def receive(sock: socket.socket):
        return receive_batch(sock)

    def close(self) -> None:
        for sock in self.groups[0] + self.groups[1]:
            sock.close()
        self.groups = [[], []]
