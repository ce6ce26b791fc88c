"""In-memory fakes of the UDP socket and the TUN device (wireguard-go's
approach), so two whole Devices can handshake and exchange packets in a unit
test, under a FakeClock, with no root and no kernel."""

import ipaddress
import struct

from wgebpf.wireguard.device import Device
from wgebpf.wireguard.keys import generate_private_key, public_key
from wgebpf.wireguard.scheduler import FakeClock


class MemoryNetwork:
    def __init__(self):
        self.conns: dict[tuple, "MemoryConn"] = {}
        self.in_flight: list[tuple[bytes, tuple, tuple]] = []
        self.sent_log: list[tuple[bytes, tuple, tuple]] = []
        self.drop_filter = None          # f(data, src, dst) -> True to drop

    def pump(self, limit: int = 10000) -> int:
        """Deliver queued datagrams (and whatever they cause) until idle."""
        delivered = 0
        while self.in_flight and delivered < limit:
            data, source, destination = self.in_flight.pop(0)
            if self.drop_filter and self.drop_filter(data, source, destination):
                continue
            conn = self.conns.get(destination)
            if conn is not None:
                conn.device.on_datagram(data, source)
                delivered += 1
        return delivered


class MemoryConn:
    def __init__(self, network: MemoryNetwork, address: tuple):
        self.network = network
        self.address = address
        self.device = None
        network.conns[address] = self

    @property
    def listen_port(self) -> int:
        return self.address[1]

    def send(self, data: bytes, endpoint: tuple) -> None:
        item = (bytes(data), self.address, tuple(endpoint))
        self.network.in_flight.append(item)
        self.network.sent_log.append(item)

    def move(self, address: tuple) -> None:
        """Roam: the host now sends from (and listens on) another address."""
        del self.network.conns[self.address]
        self.address = address
        self.network.conns[address] = self

    def rebind(self, port: int) -> None:
        self.move((self.address[0], port))

    def set_mark(self, mark: int) -> None:
        pass


class MemoryTun:
    def __init__(self):
        self.received: list[bytes] = []

    def write(self, packet: bytes, queue: int = 0) -> None:
        self.received.append(bytes(packet))


def ipv4_packet(source: str, destination: str, payload: bytes = b"x" * 20, proto: int = 17) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         ipaddress.IPv4Address(source).packed,
                         ipaddress.IPv4Address(destination).packed)
    return header + payload


def ipv6_packet(source: str, destination: str, payload: bytes = b"y" * 24, proto: int = 17) -> bytes:
    header = struct.pack("!IHBB16s16s", 0x60000000, len(payload), proto, 64,
                         ipaddress.IPv6Address(source).packed,
                         ipaddress.IPv6Address(destination).packed)
    return header + payload


class Host:
    """One device with its fake TUN and socket."""

    def __init__(self, network, clock, tunnel_address: str, underlay: tuple, private_key=None):
        self.private_key = private_key or generate_private_key()
        self.public_key = public_key(self.private_key)
        self.tun = MemoryTun()
        self.conn = MemoryConn(network, underlay)
        self.device = Device("mem", self.private_key, clock=clock, tun=self.tun, conn=self.conn,
                             addresses=[ipaddress.ip_interface(tunnel_address)])
        self.conn.device = self.device
        self.address = str(ipaddress.ip_interface(tunnel_address).ip)

    def add_peer(self, other: "Host", allowed: list[str], endpoint: bool = True, psk=None):
        peer = self.device.add_peer(other.public_key)
        for network in allowed:
            self.device.add_allowed_ip(peer, network)
        if endpoint:
            peer.set_endpoint(other.conn.address)
        if psk:
            peer.set_preshared_key(psk)
        return peer


def pair(psk: bytes | None = None):
    """Two hosts, A (198.51.100.1) and B (198.51.100.2), peered both ways.
    B starts without A's endpoint: it learns it from A's first message."""
    clock = FakeClock()
    network = MemoryNetwork()
    a = Host(network, clock, "198.51.100.1/24", ("192.0.2.1", 51820))
    b = Host(network, clock, "198.51.100.2/24", ("192.0.2.2", 51821))
    a.add_peer(b, ["198.51.100.2/32", "2001:db8:100::2/128"], psk=psk)
    b.add_peer(a, ["198.51.100.1/32", "2001:db8:100::1/128"], endpoint=False, psk=psk)
    return clock, network, a, b


# --- frames on the wgebpf TAP (wgebpf/dataplane/tun.py, "Peer tags") -------------------

DEVICE_MAC = bytes.fromhex("5a0000c00201")      # a TAP's own address, as the kernel makes one
VNET_HDR = bytes(10)                            # a plain struct virtio_net_hdr
TAG_PREFIX = b"\x02\x77"


def ethertype(packet: bytes) -> bytes:
    return b"\x86\xdd" if packet and packet[0] >> 4 == 6 else b"\x08\x00"


def tap_frame(packet: bytes, slot: int, mac: bytes = DEVICE_MAC) -> bytes:
    """A frame as a worker reads it from its TAP queue: the tc classifier
    wrote peer `slot`'s tag over the destination MAC; the source is the device."""
    return VNET_HDR + TAG_PREFIX + struct.pack("!I", slot) + mac + ethertype(packet) + packet


def frame_source(frame: bytes) -> int:
    """The slot the source MAC of a frame a worker wrote names (-1: no tag)."""
    src = frame[len(VNET_HDR) + 6:len(VNET_HDR) + 12]
    return struct.unpack("!I", src[2:])[0] if src[:2] == TAG_PREFIX else -1


def untag(frame: bytes, mac: bytes = DEVICE_MAC) -> tuple[int, bytes]:
    """(slot, IP packet) of a plain frame a worker wrote, checking what the
    kernel needs to take it as the device's own: a plain virtio header,
    the device's MAC as destination, the packet's EtherType."""
    n = len(VNET_HDR)
    assert frame[:n] == VNET_HDR, frame[:n]
    packet = frame[n + 14:]
    assert frame[n:n + 6] == mac and frame[n + 12:n + 14] == ethertype(packet)
    slot = frame_source(frame)
    assert slot >= 0, frame[n + 6:n + 12]
    return slot, packet
