"""A multi-queue TAP made an L3 link, as the kernel-side tests need it.

The eBPF programs' tests drive the device the way wgebpf's data plane will
(bpf/common.h: queues are workers, peers are tags in the Ethernet header),
but read and write whole frames, headers included, to see the tags. So they
use this small device of their own rather than dataplane/tun.py's, whose
read/write hide the Ethernet header. Create it inside a test namespace.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess

from wgebpf.kernel import bpfmaps

TUNSETIFF = 0x400454CA
TUNSETSTEERINGEBPF = 0x800454E0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR = 0x0002, 0x1000, 0x0100, 0x4000
SIOCGIFHWADDR = 0x8927
VNET_HDR_LEN = 10
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD


class Tap:
    """TAP `name` with `queues` non-blocking queue fds; NOARP, no IPv6
    address generation (so the stack sends every frame to the device's own
    MAC, and the device makes no traffic of its own). Frames read and
    written are whole: [virtio_net_hdr if vnet_hdr][Ethernet][IP]."""

    def __init__(self, name: str, queues: int, vnet_hdr: bool = False):
        self.name, self.vnet_hdr, self.fds = name, vnet_hdr, []
        try:
            for _ in range(queues):
                self.fds.append(self._open_queue())
            subprocess.run(["ip", "link", "set", "dev", name, "arp", "off",
                            "addrgenmode", "none"], check=True)
            # (not /sys/class/net: sysfs shows the namespace it was mounted in)
            self.ifindex = socket.if_nametoindex(name)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                reply = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
            self.mac = reply[18:24]         # ifreq: name[16], sockaddr: family(2), data
        except BaseException:
            self.close()
            raise

    def _open_queue(self) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        flags = IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if self.vnet_hdr else 0)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", self.name.encode(), flags))
            if self.vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def set_steering_program(self, prog_fd: int) -> None:
        """TunSteering's interface (tun_steer.SteerableTun)."""
        fcntl.ioctl(self.fds[0], TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))

    def read(self, queue: int) -> bytes | None:
        """One frame from `queue` (Ethernet header on, virtio header off), or None."""
        try:
            data = os.read(self.fds[queue], 65536 + VNET_HDR_LEN)
        except BlockingIOError:
            return None
        return data[VNET_HDR_LEN:] if self.vnet_hdr else data

    def write(self, queue: int, packet: bytes, src: bytes, dst: bytes | None = None,
              ethertype: int | None = None) -> bool:
        """`packet` (IP) behind an Ethernet header from MAC `src` to `dst`
        (the device's own by default), as a worker writes it; False if the
        kernel dropped it."""
        if ethertype is None:
            ethertype = ETH_P_IPV6 if packet and packet[0] >> 4 == 6 else ETH_P_IP
        frame = (dst or self.mac) + src + struct.pack("!H", ethertype) + packet
        if self.vnet_hdr:
            frame = bytes(VNET_HDR_LEN) + frame
        try:
            return os.write(self.fds[queue], frame) == len(frame)
        except (BlockingIOError, OSError):
            return False

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slot_of(frame: bytes) -> int:
    """The peer slot a frame's destination MAC names (0: not a tag)."""
    return bpfmaps.slot_of_tag(frame[bpfmaps.ETH_DST:bpfmaps.ETH_DST + bpfmaps.TAG_LEN])
