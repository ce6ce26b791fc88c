"""The wgebpf device: one multi-queue TUN or TAP, one non-blocking fd per queue.

Each queue is an fd opened on /dev/net/tun with the same name and
IFF_MULTI_QUEUE. The kernel picks the queue for a packet it routes into the
device (flow hash, or the steering eBPF program: docs/platform-notes.md,
item 2).

wgebpf's interface is a TAP (tap=True): queue 0 is the control plane's and
queue k belongs to worker k; peers own no queue. The device is made an L3
link (`arp off`, no IPv6 address generation, link.make_l3): the kernel never
resolves a neighbour on it, and every packet it sends leaves with the
device's own MAC as destination. That Ethernet header carries what the
eBPF programs and the workers tell each other about the packet, without
touching the IP packet (bpf/common.h, "Peer tags"):

  read   the tc egress classifier overwrote the destination MAC with the
         peer's tag 02:77:<slot, 32 bits big-endian>; slot_of() reads it.
  write  a worker writes dst = the device's MAC (so the stack takes the
         frame as its own) and src = the tag of the peer the packet came
         from; the tc ingress source policy reads it. Nothing a peer sends
         is copied into this header: a peer cannot choose its tag.

The header survives GSO: the kernel segments a super-packet after tc egress
and copies the link header onto every segment.

The device is not persistent: it disappears when the last queue fd closes,
so a crashed (kill -9) instance leaves nothing behind by itself.

With vnet_hdr=True (IFF_VNET_HDR) every read and write on a queue fd starts
with a 10-byte struct virtio_net_hdr (tcpgro.VNET_HDR_LEN). That lets a
write carry a GSO super-packet of several TCP segments (tcpgro.coalesce).
No TUNSETOFFLOAD is done: writing GSO/CHECKSUM_PARTIAL packets needs none
(checked on Linux 6.18, tests/test_tcpgro.py), and without it the device
offers the kernel no checksum or segmentation offload, so what is read is
always a complete, fully checksummed packet behind an all-zero header.
Tun.read/readinto strip the virtio and Ethernet headers and Tun.write puts
them in front, so callers of those see bare IP packets in every mode; a
buffer that already starts with its headers (from coalesce) goes through
write_vnet, and code that uses the raw fds checks `tun.vnet_hdr` and
`tun.tap`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import subprocess

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA                # _IOW('T', 202, int)
TUNSETSTEERINGEBPF = 0x800454E0       # _IOR('T', 224, int); argument: the prog fd as a C int
TUNSETVNETHDRSZ = 0x400454D8          # _IOW('T', 216, int)
TUNSETOFFLOAD = 0x400454D0            # _IOW('T', 208, unsigned int); not used, see above
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000                    # no 4-byte packet-info prefix: reads/writes are bare IP
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000                 # each read/write starts with a struct virtio_net_hdr
VNET_HDR_LEN = 10                     # sizeof(struct virtio_net_hdr); = tcpgro.VNET_HDR_LEN
_ZERO_HDR = bytes(VNET_HDR_LEN)

ETH_HLEN = 14                         # destination MAC, source MAC, EtherType
ETH_P_IP = b"\x08\x00"
ETH_P_IPV6 = b"\x86\xdd"
TAG_PREFIX = b"\x02\x77"              # locally administered, unicast; then the slot
_TAG = struct.Struct("!2sI")
SIOCGIFHWADDR = 0x8927

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


def tag(slot: int) -> bytes:
    """The 6-byte MAC that names peer `slot` (0: no peer) in a frame."""
    return _TAG.pack(TAG_PREFIX, slot)


def slot_of(mac) -> int:
    """The peer slot a tag names; 0 for anything that is not a tag."""
    prefix, slot = _TAG.unpack_from(mac)
    return slot if prefix == TAG_PREFIX else 0


def ethertype(packet) -> bytes:
    """The EtherType of a bare IP packet, by its version nibble."""
    return ETH_P_IPV6 if packet and packet[0] >> 4 == 6 else ETH_P_IP


def _open_queue(name: str, vnet_hdr: bool = False, tap: bool = False) -> tuple[int, str]:
    """Open one queue fd of TUN `name` (creating the device if needed).

    A multi-queue TUN's flags belong to the device and each attach sets them
    again, so every queue must be opened with the same `vnet_hdr`.
    """
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(e.errno, _explain(e, name)) from e
    try:
        flags = ((IFF_TAP if tap else IFF_TUN) | IFF_NO_PI | IFF_MULTI_QUEUE
                 | (IFF_VNET_HDR if vnet_hdr else 0))
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
    """A multi-queue TUN or TAP device owned by this process."""

    def __init__(self, name: str, ifindex: int, fds: list[int], vnet_hdr: bool = False,
                 tap: bool = False):
        self.name = name
        self.ifindex = ifindex
        self.fds = fds
        self.vnet_hdr = vnet_hdr
        self.tap = tap
        self.mac = bytes(6)                   # a TAP's own address: frames written go to it
        # readinto's landing place for the headers in front of each packet
        self._hdr = bytearray((VNET_HDR_LEN if vnet_hdr else 0) + (ETH_HLEN if tap else 0))

    @classmethod
    def create(cls, name: str, queues: int = 1, vnet_hdr: bool = False,
               tap: bool = False) -> "Tun":
        """Create TUN (or TAP) `name` with `queues` queue fds, all non-blocking.

        vnet_hdr=True opens every queue with IFF_VNET_HDR, tap=True makes it
        a TAP that is an L3 link (see the module doc).

        Refuses a name that already exists: TUNSETIFF on an existing
        multi-queue TUN would silently add queues to someone else's device.
        """
        _check_name(name)
        if not 1 <= queues <= MAX_QUEUES:
            raise TunError(errno.EINVAL, f"queues must be 1..{MAX_QUEUES}, not {queues}")
        if "%" not in name and _ifindex(name):
            raise TunError(errno.EEXIST, _explain(OSError(errno.EEXIST, ""), name))
        fd, actual = _open_queue(name, vnet_hdr, tap)
        tun = cls(actual, 0, [fd], vnet_hdr, tap)
        try:
            for _ in range(queues - 1):
                tun.add_queue()
            tun.ifindex = _ifindex(actual)
            if tap:
                make_l3(actual)
                tun.mac = hardware_address(actual)
        except BaseException:
            tun.close()
            raise
        return tun

    def add_queue(self) -> int:
        """Attach one more queue (another fd on the same name); return its index."""
        if len(self.fds) >= MAX_QUEUES:
            raise TunError(errno.E2BIG, _explain(OSError(errno.E2BIG, ""), self.name))
        fd, _ = _open_queue(self.name, self.vnet_hdr, self.tap)
        self.fds.append(fd)
        return len(self.fds) - 1

    def read(self, queue: int = 0) -> bytes | None:
        """One packet from `queue` (bare IP, in every mode), or None when empty."""
        try:
            data = os.read(self.fds[queue], READ_SIZE + len(self._hdr))
        except BlockingIOError:
            return None
        return data[len(self._hdr):]

    def readinto(self, buf: bytearray | memoryview, queue: int = 0) -> int | None:
        """Like read() into a caller's buffer (saves an allocation); length or None.

        The virtio and Ethernet headers land in a scratch buffer (readv), so
        `buf` gets the bare packet and the length returned is the packet's.
        """
        try:
            if self._hdr:
                return os.readv(self.fds[queue], [self._hdr, buf]) - len(self._hdr)
            return os.readv(self.fds[queue], [buf])
        except BlockingIOError:
            return None

    def link_header(self, packet, slot: int = 0) -> bytes:
        """What goes in front of bare IP `packet` written from peer `slot`
        (0: the control plane's own): virtio header, then the Ethernet one."""
        vnet = _ZERO_HDR if self.vnet_hdr else b""
        if not self.tap:
            return vnet
        return vnet + self.mac + tag(slot) + ethertype(packet)

    def write(self, packet: bytes, queue: int = 0, slot: int = 0) -> bool:
        """Hand `packet` to the kernel through `queue`, as from peer `slot`;
        False if it was dropped.

        EAGAIN/ENOBUFS mean the kernel's backlog is full: dropping is what a
        network device does under load, and the sender's congestion control
        will react, so this is not an error.
        """
        header = self.link_header(packet, slot)
        if header:
            return _write(os.writev, self.fds[queue], [header, packet])
        return _write(os.write, self.fds[queue], packet)

    def write_vnet(self, buf, queue: int = 0) -> bool:
        """Write `buf`, which starts with its own headers (tcpgro.coalesce's
        output), to a vnet-hdr device; False if dropped, as write()."""
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
        tap = ", tap=True" if self.tap else ""
        return f"Tun({self.name!r}, ifindex={self.ifindex}, queues={len(self.fds)}{vnet}{tap})"


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


def make_l3(name: str) -> None:
    """Make TAP `name` an L3 link: no ARP or neighbour discovery (every
    frame goes to the device's own MAC) and no IPv6 address of its own,
    as on a TUN or kernel WireGuard device. Before the link goes up, so no
    link-local address or DAD ever starts."""
    result = subprocess.run(["ip", "link", "set", "dev", name, "arp", "off",
                             "addrgenmode", "none"], capture_output=True, text=True)
    if result.returncode:
        raise TunError(errno.EINVAL, f"cannot make {name} an L3 link: "
                                     f"{result.stderr.strip() or result.returncode}")


def hardware_address(name: str) -> bytes:
    """The MAC of `name`, asked through a socket (this thread's namespace)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        reply = fcntl.ioctl(sock, SIOCGIFHWADDR, struct.pack("16s16x", name.encode()))
    return reply[18:24]         # struct ifreq: name[16], sockaddr: family(2), data
