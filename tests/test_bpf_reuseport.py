"""Receive steering of the UDP reuseport group, in the real kernel.

In a fresh namespace, three UDP sockets join one SO_REUSEPORT group on
loopback (position 0: the control plane, 1 and 2: workers), for IPv4 and
for IPv6, with reuseport.c attached to the first socket of each group. A
client sends WireGuard-shaped messages; each case says which socket must
receive it.
"""

from __future__ import annotations

import secrets
import select
import socket
import struct

import pytest

from wgebpf.kernel import bpfmaps
from wgebpf.kernel.reuseport import ReuseportSteering

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
