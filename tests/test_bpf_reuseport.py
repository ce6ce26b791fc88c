"""Receive steering of the UDP reuseport group, in the real kernel.

In a fresh namespace, three UDP sockets join one SO_REUSEPORT group on
loopback (position 0: the control plane, 1 and 2: workers), for IPv4 and
for IPv6, with reuseport.c attached to the first socket of each group. A
client sends WireGuard-shaped messages; each case says which socket must
receive it. Spread indexes (one keypair opened by several workers, picked
by counter) are checked with BPF_PROG_TEST_RUN against the Python mirror,
and over real sockets.
"""

from __future__ import annotations

import ctypes
import random
import secrets
import select
import socket
import struct

import pytest

from wgebpf.wireguard import counters

from wgebpf.kernel import bpfmaps
from wgebpf.kernel.reuseport import ReuseportSteering, owns, spread_position
from wgebpf.kernel.xdp_guard import test_run

pytestmark = pytest.mark.netns

INDEX_W1, INDEX_W2, INDEX_UNKNOWN = 0x1A2B3C4D, 0xFFFFFFF0, 0x00000007

from nsutil import fresh_netns  # noqa: F401  (the netns fixture)


@pytest.fixture
def steering(netns):
    """Function scope; needs `netns`. The loaded program, closed afterwards."""
    with ReuseportSteering() as s:
        yield s


class Group:
    """Three reuseport sockets on one loopback port; program on the first."""

    def __init__(self, family: int, steering: ReuseportSteering, size: int = 3):
        self.family = family
        self.addr = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.socks: list[socket.socket] = []
        try:
            for i in range(size):
                s = socket.socket(family, socket.SOCK_DGRAM)
                self.socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.setblocking(False)
                s.bind((self.addr, self.socks[0].getsockname()[1] if i else 0))
                if i == 0:
                    steering.attach(s)
            self.port = self.socks[0].getsockname()[1]
            self.client = socket.socket(family, socket.SOCK_DGRAM)
        except BaseException:
            self.close()
            raise

    def receiver_of(self, message: bytes, timeout: float = 2.0) -> int:
        """Send `message` to the group; the position of the socket that got it."""
        self.client.sendto(message, (self.addr, self.port))
        poller = select.poll()
        for s in self.socks:
            poller.register(s, select.POLLIN)
        events = poller.poll(timeout * 1000)
        assert len(events) == 1, f"expected one receiver, got {events}"
        fd = events[0][0]
        pos = [s.fileno() for s in self.socks].index(fd)
        assert self.socks[pos].recv(65536) == message
        return pos

    def close(self) -> None:
        for s in self.socks + [getattr(self, "client", None)]:
            if s is not None:
                s.close()


def data(index: int, length: int = 32 + 64, reserved: bytes = b"\0\0\0") -> bytes:
    """A data message: type 4, reserved, receiver index (LE), counter, body."""
    head = bytes([bpfmaps.MESSAGE_DATA]) + reserved + struct.pack("<IQ", index, 1)
    return head + secrets.token_bytes(length - len(head))


CASES = [
    # (what, message, position)
    ("data for worker 1", data(INDEX_W1), 1),
    ("data for worker 2", data(INDEX_W2), 2),
    ("data, unknown index", data(INDEX_UNKNOWN), 0),
    ("handshake initiation", bytes([1, 0, 0, 0]) + struct.pack("<I", INDEX_W1) + bytes(140), 0),
    ("handshake response", bytes([2, 0, 0, 0]) + struct.pack("<I", INDEX_W2) + bytes(84), 0),
    ("cookie reply", bytes([3, 0, 0, 0]) + struct.pack("<I", INDEX_W1) + bytes(56), 0),
    ("data, reserved bytes set", data(INDEX_W1, reserved=b"\0\1\0"), 0),
    ("data shorter than header + tag", data(INDEX_W1, length=31), 0),
    ("empty datagram", b"", 0),
    ("keepalive-sized data (32 bytes)", data(INDEX_W2, length=32), 2),
]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_messages_reach_the_owning_socket(steering, family):
    steering.set_index(INDEX_W1, 1)
    steering.set_index(INDEX_W2, 2)
    group = Group(family, steering)
    try:
        got = {what: group.receiver_of(msg) for what, msg, _ in CASES}
    finally:
        group.close()
    assert got == {what: pos for what, _, pos in CASES}


def test_one_program_serves_both_groups_and_follows_map_changes(steering):
    v4, v6 = Group(socket.AF_INET, steering), Group(socket.AF_INET6, steering)
    try:
        steering.set_index(INDEX_W1, 2)
        assert v4.receiver_of(data(INDEX_W1)) == 2
        assert v6.receiver_of(data(INDEX_W1)) == 2
        steering.set_index(INDEX_W1, 1)        # rebalanced to another worker
        assert v4.receiver_of(data(INDEX_W1)) == 1
        steering.remove_index(INDEX_W1)        # keypair gone: control plane
        assert v6.receiver_of(data(INDEX_W1)) == 0
        steering.set_index(INDEX_W2, 2)
        steering.clear()
        assert v4.receiver_of(data(INDEX_W2)) == 0
        steering.remove_index(INDEX_W2)        # absent: no error
    finally:
        v4.close()
        v6.close()


def test_program_runs_for_every_datagram(steering):
    steering.set_index(INDEX_W1, 1)
    group = Group(socket.AF_INET, steering)
    n = 2000
    try:
        with bpfmaps.enable_stats():
            before = bpfmaps.prog_info(steering.prog_fd)
            for i in range(n):
                group.client.sendto(data(INDEX_W1 if i % 2 else INDEX_UNKNOWN),
                                    (group.addr, group.port))
                if i % 128 == 127:
                    for s in group.socks:
                        while True:
                            try:
                                s.recv(65536)
                            except BlockingIOError:
                                break
            after = bpfmaps.prog_info(steering.prog_fd)
    finally:
        group.close()
    runs = after.run_cnt - before.run_cnt
    assert runs == n
    print(f"reuseport: {runs} runs, {(after.run_time_ns - before.run_time_ns) / runs:.0f} "
          "ns per datagram")


def test_index_and_position_ranges_are_checked(steering):
    with pytest.raises(ValueError):
        steering.set_index(1 << 32, 1)
    with pytest.raises(ValueError):
        steering.set_index(1, -1)


# -- spread indexes: the worker by counter ------------------------------------------------

INDEX_SPREAD = 0x5EED0001


def data_with_counter(index: int, counter: int, length: int = 32 + 64) -> bytes:
    head = struct.pack("<IIQ", bpfmaps.MESSAGE_DATA, index, counter)
    return head + secrets.token_bytes(length - len(head))


def test_run_agrees_with_the_python_mirror_on_many_counters(steering):
    """BPF_PROG_TEST_RUN of the program (an Ethernet header in front, which
    the kernel pulls for a socket filter) against spread_position()."""
    rng = random.Random(14)
    ethernet = bytes(12) + b"\x08\x00"
    for workers in (1, 2, 3, 4, 7, 16):
        index = rng.randrange(1 << 32)
        steering.set_spread(index, workers)
        counters = [rng.randrange(1 << 64) for _ in range(300)] + list(range(0, 2000, 37))
        counters += [(1 << 64) - 1, (1 << 64) - 128, 127, 128]
        for counter in counters:
            got, _ = test_run(steering.prog_fd, ethernet + data_with_counter(index, counter))
            assert got == spread_position(counter, index, workers), (workers, counter)
    # Unmarked indexes keep their position; an entry with the flag and no
    # workers (never written by the loader) goes to the control plane.
    steering.set_index(INDEX_W2, 2)
    assert test_run(steering.prog_fd, ethernet + data_with_counter(INDEX_W2, 999))[0] == 2
    steering._index[ctypes.c_uint32(INDEX_W1)] = ctypes.c_uint32(bpfmaps.RX_SPREAD)
    assert test_run(steering.prog_fd, ethernet + data_with_counter(INDEX_W1, 999))[0] == 0


def test_spread_runs_of_128_counters_stay_together_and_reach_every_worker():
    for run in range(50):
        base = run * 128
        assert len({spread_position(c, 0, 3) for c in (base, base + 1, base + 127)}) == 1
    assert spread_position(0, 1, 3) == spread_position(0, 0, 3) % 3 + 1   # the index shifts it
    assert spread_position(5, 0, 0) == bpfmaps.SOCKET_CONTROL
    position = spread_position(128, 0, 3)
    assert owns(position, 128, 0, 3) and not owns(position % 3 + 1, 128, 0, 3)


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_spread_reaches_every_worker_from_one_sending_workers_blocks(workers):
    """A wgebpf sender's worker w only uses counter blocks k with
    k % W == w (wireguard/counters.py); the mixed run number still spreads
    those over every receiving worker (a plain run number reached 1 of 8)."""
    block = counters.block_size(workers)
    for w in range(workers):
        runs = {spread_position(k * block + offset, 12345, workers)
                for k in range(w, 400 * workers, workers) for offset in (0, block - 1)}
        assert runs == set(range(1, workers + 1)), (w, runs)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_spread_index_over_real_sockets(steering, family):
    """Five sockets (control + 4 workers): every copy of a counter reaches
    the same worker, the one the formula names; counters cover every worker;
    a plain index beside it keeps its socket."""
    workers = 4
    steering.set_spread(INDEX_SPREAD, workers)
    steering.set_index(INDEX_W1, 1)
    group = Group(family, steering, size=1 + workers)
    rng = random.Random(7)
    counters = [rng.randrange(1 << 20) for _ in range(60)] + [0, 127, 128, 1 << 63]
    try:
        first = {c: group.receiver_of(data_with_counter(INDEX_SPREAD, c)) for c in counters}
        again = {c: group.receiver_of(data_with_counter(INDEX_SPREAD, c)) for c in counters}
        plain = group.receiver_of(data(INDEX_W1))
    finally:
        group.close()
    assert first == again
    assert first == {c: spread_position(c, INDEX_SPREAD, workers) for c in counters}
    assert set(first.values()) == set(range(1, workers + 1))
    assert plain == 1


def test_set_spread_checks_its_arguments(steering):
    for index, workers in [(1 << 32, 2), (1, 0), (1, 1 << 16)]:
        with pytest.raises(ValueError):
            steering.set_spread(index, workers)
    with pytest.raises(ValueError):
        steering.set_index(1, bpfmaps.RX_SPREAD)        # a position cannot look spread
