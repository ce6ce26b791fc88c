"""Receive steering: loader for bpf/reuseport.c (SO_ATTACH_REUSEPORT_EBPF).

Every worker process has one UDP socket in each SO_REUSEPORT group (one
IPv4, one IPv6) on the listen port; the control plane's socket is position
0. The program reads a data message's receiver index and returns the
position stored for it here; everything else goes to position 0.

Positions are the kernel's: join order, counted from 0. Two rules keep them
right (both are the kernel's behaviour, not ours):
  - join the IPv4 and IPv6 groups in the same order, so one position means
    the same worker in both (one map serves both groups);
  - closing a socket moves the group's last socket into its place, so after
    a worker's socket closes, re-set the indexes of the one that moved.

A receiver index may instead be spread (set_spread): its data messages go
to the workers by their counter's run of 128, spread_position() below, so
one peer's traffic is opened by several workers. Steering cannot keep the
copies of one counter together: the kernel's UDP GRO merges datagrams of
several runs into one skb, which reaches the socket chosen for the first
of them, while a replay of a later one, sent alone, reaches another worker.
So the workers of a spread session share its replay window
(wireguard/replay.py, SharedReplayWindows).
"""

from __future__ import annotations

import ctypes
import socket

from . import bpfmaps as m

RX_MIX = 0x9E3779B97F4A7C15      # reuseport.c's RX_MIX: Fibonacci hashing of a counter run

SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68      # kernel 5.3+


class ReuseportSteering(m.LoadedProgram):
    """The program and its receiver index -> socket position map."""

    def __init__(self):
        self.bpf = m.compile_programs("reuseport.c")
        self._prog = self.bpf.load_func(b"wg_reuseport", self.bpf.SOCKET_FILTER)
        self._index = self.bpf[m.MAP_RXINDEX.encode()]

    def attach(self, sock: socket.socket) -> None:
        """Steer the reuseport group `sock` belongs to (or will, once bound)."""
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, self.prog_fd)

    @staticmethod
    def detach(sock: socket.socket) -> None:
        """Back to the kernel's hash for the group of `sock`."""
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)

    def set_index(self, receiver_index: int, position: int) -> None:
        """Data messages for `receiver_index` go to the socket at `position`."""
        if not 0 <= receiver_index < 1 << 32:
            raise ValueError(f"receiver index must be a 32-bit unsigned int, not {receiver_index}")
        if not 0 <= position < m.RX_SPREAD:
            raise ValueError(f"socket position out of range: {position}")
        self._index[ctypes.c_uint32(receiver_index)] = ctypes.c_uint32(position)

    def set_spread(self, receiver_index: int, workers: int) -> None:
        """Data messages for `receiver_index` go to positions 1..workers by
        their counter (spread_position). Set it again when the number of
        worker sockets changes."""
        if not 0 <= receiver_index < 1 << 32:
            raise ValueError(f"receiver index must be a 32-bit unsigned int, not {receiver_index}")
        if not 1 <= workers <= m.RX_WORKERS_MASK:
            raise ValueError(f"workers out of range: {workers}")
        self._index[ctypes.c_uint32(receiver_index)] = ctypes.c_uint32(m.RX_SPREAD | workers)

    def remove_index(self, receiver_index: int) -> None:
        """Messages for `receiver_index` go back to the control plane (0)."""
        try:
            del self._index[ctypes.c_uint32(receiver_index)]
        except KeyError:
            pass

    def clear(self) -> None:
        self._index.clear()

    def close(self) -> None:
        self.bpf.cleanup()

    def __enter__(self) -> "ReuseportSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spread_position(counter: int, receiver_index: int, workers: int) -> int:
    """The socket position reuseport.c picks for a data message of a spread
    index (the same formula; tests check they agree)."""
    if workers < 1:
        return m.SOCKET_CONTROL
    mixed = ((counter >> m.RX_SPREAD_SHIFT) * RX_MIX & 0xFFFFFFFFFFFFFFFF) >> 32
    return 1 + (mixed + receiver_index) % workers


def owns(position: int, counter: int, receiver_index: int, workers: int) -> bool:
    """Whether steering alone would send `counter` to the worker at
    `position`. With UDP GRO it does not always (a merged burst follows its
    first message), which is why the workers of a spread session share its
    replay window (wireguard/replay.py) instead of keeping one each;
    lab/spread.py shows the difference."""
    return spread_position(counter, receiver_index, workers) == position
