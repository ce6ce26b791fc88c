"""The TUN device: one multi-queue TUN, one non-blocking fd per queue.

Each queue is an fd opened on /dev/net/tun with the same name and
IFF_MULTI_QUEUE. The kernel picks the queue for a packet it routes into the
device (flow hash, or the steering eBPF program: docs/platform-notes.md,
item 2); a packet written to queue k arrives at tc ingress with
skb->queue_mapping == k + 1 (item 3), which is how wgebpf knows which peer a decrypted packet came from.

The device is not persistent: it disappears when the last queue fd closes,
so a crashed (kill -9) instance leaves no TUN behind by itself.

With vnet_hdr=True (IFF_VNET_HDR) every read and write on a queue fd starts
with a 10-byte struct virtio_net_hdr (tcpgro.VNET_HDR_LEN). That lets a
write carry a GSO super-packet of several TCP segments (tcpgro.coalesce).
No TUNSETOFFLOAD is done: writing GSO/CHECKSUM_PARTIAL packets needs none
(checked on Linux 6.18, tests/test_tcpgro.py), and without it the device
offers the kernel no checksum or segmentation offload, so what is read is
always a complete, fully checksummed packet behind an all-zero header.
Tun.read/readinto strip that header and Tun.write puts a zero one in front,
so callers of those see bare IP packets as without vnet_hdr; a buffer that
already starts with its header (from coalesce) goes through write_vnet, and
code that uses the raw fds checks `tun.vnet_hdr`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA                # _IOW('T', 202, int)
TUNSETSTEERINGEBPF = 0x800454E0       # _IOR('T', 224, int); argument: the prog fd as a C int
TUNSETVNETHDRSZ = 0x400454D8          # _IOW('T', 216, int)
TUNSETOFFLOAD = 0x400454D0            # _IOW('T', 208, unsigned int); not used, see above
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000                    # no 4-byte packet-info prefix: reads/writes are bare IP
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000                 # each read/write starts with a struct virtio_net_hdr
VNET_HDR_LEN = 10                     # sizeof(struct virtio_net_hdr); = tcpgro.VNET_HDR_LEN
_ZERO_HDR = bytes(VNET_HDR_LEN)

IFNAMSIZ = 16
MAX_QUEUES = 256                      # the kernel's MAX_TAP_QUEUES
READ_SIZE = 65536                     # larger than any MTU a TUN can have
# Packets one turn of an event loop reads from a TUN queue before it looks at
# its other fds again (the control plane's queue 0, each worker's queues).
TUN_BATCH = 64

# struct ifreq: char ifr_name[16]; union { short ifr_flags; ... } (40 bytes in all)
_IFREQ = struct.Struct("16sH22x")


class TunError(OSError):
    """A TUN device could not be created or a queue attached."""


def _check_name(name: str) -> None:
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise TunError(errno.EINVAL, f"interface name {name!r} must be 1 to {IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/: \t\n\0"):
        raise TunError(errno.EINVAL, f"interface name {name!r} contains a character Linux refuses")


def _explain(err: OSError, name: str) -> str:
    """A sentence a user can act on, for the errno TUNSETIFF or open() gave."""
    return {
        errno.ENOENT: f"{TUN_PATH} does not exist (no TUN driver?)",
        errno.ENODEV: f"{TUN_PATH} has no driver behind it (CONFIG_TUN off?)",
        errno.EPERM: "creating a TUN device needs CAP_NET_ADMIN",
        errno.EACCES: f"no permission to open {TUN_PATH}",
        errno.EBUSY: f"interface {name} is in use by another single-queue TUN/TAP owner",
        errno.EINVAL: f"interface {name} exists and is not a multi-queue TUN, or its flags differ",
        errno.E2BIG: f"interface {name} already has the kernel's maximum of {MAX_QUEUES} queues",
        errno.EEXIST: f"interface {name} already exists",
    }.get(err.errno, f"cannot open TUN queue for {name}: {err.strerror}")


def _open_queue(name: str, vnet_hdr: bool = False) -> tuple[int, str]:
    """Open one queue fd of TUN `name` (creating the device if needed).

    A multi-queue TUN's flags belong to the device and each attach sets them
    again, so every queue must be opened with the same `vnet_hdr`.
    """
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(e.errno, _explain(e, name)) from e
    try:
        flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if vnet_hdr else 0)
        ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
    except OSError as e:
        os.close(fd)
        raise TunError(e.errno, _explain(e, name)) from e
    # The kernel writes the final name back (it expands templates like "wg%d").
    actual = _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()
    return fd, actual


class Tun:
    """A multi-queue TUN device owned by this process."""

    def __init__(self, name: str, ifindex: int, fds: list[int], vnet_hdr: bool = False):
        self.name = name
        self.ifindex = ifindex
        self.fds = fds
        self.vnet_hdr = vnet_hdr
        self._hdr = bytearray(VNET_HDR_LEN)    # readinto's landing place for the header

    @classmethod
    def create(cls, name: str, queues: int = 1, vnet_hdr: bool = False) -> "Tun":
        """Create TUN `name` with `queues` queue fds, all non-blocking.

        vnet_hdr=True opens every queue with IFF_VNET_HDR (see the module doc).

        Refuses a name that already exists: TUNSETIFF on an existing
        multi-queue TUN would silently add queues to someone else's device.
        """
        _check_name(name)
        if not 1 <= queues <= MAX_QUEUES:
            raise TunError(errno.EINVAL, f"queues must be 1..{MAX_QUEUES}, not {queues}")
        if "%" not in name and _ifindex(name):
            raise TunError(errno.EEXIST, _explain(OSError(errno.EEXIST, ""), name))
        fd, actual = _open_queue(name, vnet_hdr)
        tun = cls(actual, 0, [fd], vnet_hdr)
        try:
            for _ in range(queues - 1):
                tun.add_queue()
            tun.ifindex = _ifindex(actual)
        except BaseException:
            tun.close()
            raise
        return tun

    def add_queue(self) -> int:
        """Attach one more queue (another fd on the same name); return its index."""
        if len(self.fds) >= MAX_QUEUES:
            raise TunError(errno.E2BIG, _explain(OSError(errno.E2BIG, ""), self.name))
        fd, _ = _open_queue(self.name, self.vnet_hdr)
        self.fds.append(fd)
        return len(self.fds) - 1

    def read(self, queue: int = 0) -> bytes | None:
        """One packet from `queue` (bare IP, also in vnet mode), or None when empty."""
        try:
            data = os.read(self.fds[queue], READ_SIZE + VNET_HDR_LEN)
        except BlockingIOError:
            return None
        return data[VNET_HDR_LEN:] if self.vnet_hdr else data

    def readinto(self, buf: bytearray | memoryview, queue: int = 0) -> int | None:
        """Like read() into a caller's buffer (saves an allocation); length or None.

        In vnet mode the header lands in a scratch buffer (readv), so `buf`
        gets the bare packet and the length returned is the packet's.
        """
        try:
            if self.vnet_hdr:
                return os.readv(self.fds[queue], [self._hdr, buf]) - VNET_HDR_LEN
            return os.readv(self.fds[queue], [buf])
        except BlockingIOError:
            return None

    def write(self, packet: bytes, queue: int = 0) -> bool:
        """Hand `packet` to the kernel through `queue`; False if it was dropped.

        EAGAIN/ENOBUFS mean the kernel's backlog is full: dropping is what a
        network device does under load, and the sender's congestion control
        will react, so this is not an error.
        """
        if self.vnet_hdr:
            return _write(os.writev, self.fds[queue], [_ZERO_HDR, packet])
        return _write(os.write, self.fds[queue], packet)

    def write_vnet(self, buf, queue: int = 0) -> bool:
        """Write `buf`, which starts with its own virtio_net_hdr (tcpgro.coalesce's
        output), to a vnet-hdr TUN; False if dropped, as write()."""
        if not self.vnet_hdr:
            raise TunError(errno.EINVAL, f"{self.name} was not opened with vnet_hdr")
        return _write(os.write, self.fds[queue], buf)

    def set_steering_program(self, fd: int) -> None:
        """Attach a SOCKET_FILTER program that picks the queue (-1 detaches).

        The program's return value modulo the number of queues is the queue
        for each packet the kernel routes into the device. One queue fd is
        enough: the program belongs to the device.
        """
        fcntl.ioctl(self.fds[0], TUNSETSTEERINGEBPF, struct.pack("i", fd))

    def fileno(self, queue: int = 0) -> int:
        return self.fds[queue]

    def close(self) -> None:
        """Close every queue; the device goes away with the last one."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Tun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        vnet = ", vnet_hdr=True" if self.vnet_hdr else ""
        return f"Tun({self.name!r}, ifindex={self.ifindex}, queues={len(self.fds)}{vnet})"


def _write(call, fd: int, data) -> bool:
    """os.write/os.writev, with a full backlog (EAGAIN/ENOBUFS) as False."""
    try:
        call(fd, data)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.ENOBUFS):
            return False
        raise
    return True


def _ifindex(name: str) -> int:
    """ifindex of `name` in this thread's network namespace, 0 if absent.

    if_nametoindex asks through a socket, so it sees the namespace the
    calling thread is in (sysfs would show the namespace it was mounted in).
    """
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0
