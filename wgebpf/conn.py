"""The UDP side: one IPv4 and one IPv6 socket on the listen port, bound to
the underlay interface, marked with FwMark."""

import errno
import logging
import socket

log = logging.getLogger("wgebpf")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
SO_MARK = getattr(socket, "SO_MARK", 36)
SOCKET_BUFFER = 4 << 20
RECV_BATCH = 64


def normalize(address: tuple) -> tuple[str, int]:
    """(host, port) from what recvfrom returns; keeps a link-local zone."""
    host, port = address[0], address[1]
    if len(address) == 4 and address[3] and "%" not in host:
        host = f"{host}%{address[3]}"
    return host, port


class UDPConn:
    def __init__(self, port: int = 0, underlay: str | None = None, fwmark: int = 0):
        self.underlay = underlay
        self.fwmark = fwmark
        self.send_errors = 0
        self.sockets: list[socket.socket] = []
        self._bind(port)

    def _socket(self, family: int, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.underlay:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.underlay.encode())
            if self.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            sock.setblocking(False)
            return sock
        except BaseException:
            sock.close()
            raise

    def _bind(self, port: int) -> None:
        # Port 0: let the kernel pick for IPv4, then take the same for IPv6;
        # retry a few times in case that port is taken on IPv6.
        for _ in range(8):
            v4 = self._socket(socket.AF_INET, port)
            chosen = v4.getsockname()[1]
            try:
                v6 = self._socket(socket.AF_INET6, chosen)
            except OSError as exc:
                v4.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue
                raise
            self.close()
            self.sockets = [v4, v6]
            self.listen_port = chosen
            return
        raise OSError(errno.EADDRINUSE, "no free UDP port for both IPv4 and IPv6")

    def rebind(self, port: int) -> None:
        old = self.sockets
        self.sockets = []
        try:
            self._bind(port)
        except OSError:
            self.sockets = old
            raise
        for sock in old:
            sock.close()
        if self.on_rebind is not None:
            self.on_rebind()

    on_rebind = None

    def set_mark(self, mark: int) -> None:
        self.fwmark = mark
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def send(self, data: bytes, endpoint: tuple) -> None:
        host = endpoint[0]
        sock = self.sockets[1] if ":" in host else self.sockets[0]
        try:
            sock.sendto(data, endpoint)
        except OSError:
            # A full buffer or an unreachable route: the packet is lost, as
            # on a wire; the protocol's timers recover.
            self.send_errors += 1

    def receive(self, sock: socket.socket):
        """Up to RECV_BATCH datagrams waiting on sock."""
        out = []
        for _ in range(RECV_BATCH):
            try:
                data, address = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors surface as ECONNREFUSED etc. on UDP: not ours to act on.
                continue
            out.append((data, normalize(address)))
        return out

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
