"""The control plane <-> worker channel: one SOCK_SEQPACKET socketpair per
worker, one pickled message (a dataclass from commands.py) per datagram,
file descriptors (TUN queues, UDP sockets) passed alongside with SCM_RIGHTS.

Both ends are our own processes, started by the control plane, so pickle is
safe here; nothing from the network ever reaches it. Still, the receiving
side only rebuilds the classes a message may hold (commands.py's, and the
replay window inside keypair state), so a stray or corrupted datagram
cannot make it import or call anything else.
"""

import io
import pickle
import socket

from . import commands
from ..wireguard.replay import ReplayWindow

MAX_MESSAGE = 1 << 20
MAX_FDS = 16


class ChannelClosed(Exception):
    pass


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE * 4)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE * 4)
    return a, b


_ALLOWED_CLASSES = {(cls.__module__, cls.__qualname__): cls
                    for cls in (*commands.TO_WORKER, *commands.TO_CONTROL,
                                commands.PeerTraffic, ReplayWindow)}


class _MessageUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        cls = _ALLOWED_CLASSES.get((module, name))
        if cls is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a channel message class")
        return cls


def send(sock: socket.socket, message, fds: list[int] = ()) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ChannelClosed(str(exc)) from exc


def receive(sock: socket.socket) -> tuple[object, list[int]] | None:
    """One message and its fds; None if none is waiting (non-blocking socket)."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    except (BlockingIOError, InterruptedError):
        return None
    except (ConnectionResetError, OSError) as exc:
        raise ChannelClosed(str(exc)) from exc
    if not data:
        raise ChannelClosed("peer process closed the channel")
    return _MessageUnpickler(io.BytesIO(data)).load(), fds
