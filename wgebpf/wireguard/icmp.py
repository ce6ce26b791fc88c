"""ICMP / ICMPv6 destination unreachable for packets no peer will carry.

The kernel's WireGuard answers such packets from inside the stack; a
userspace device answers by writing the error back into its TUN device, as a
router on the link would. The error's source is the interface's own address
of that family (the device sets accept_local so the kernel takes it), or the
unreachable destination when the interface has none.
"""

import ipaddress
import struct

ICMP_DEST_UNREACH, ICMP_HOST_UNREACH = 3, 1
ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH = 1, 3
ICMP_ERROR_TYPES = {3, 4, 5, 11, 12}
MAX_ICMP_PACKET = 576          # RFC 1812: quote as much as fits in 576 bytes
MAX_ICMPV6_PACKET = 1280       # RFC 4443: ... in the IPv6 minimum MTU
RATE_PER_SECOND = 100


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class _Bucket:
    def __init__(self, clock):
        self.clock = clock
        self.tokens = float(RATE_PER_SECOND)
        self.last = clock.monotonic()

    def take(self) -> bool:
        now = self.clock.monotonic()
        self.tokens = min(RATE_PER_SECOND, self.tokens + (now - self.last) * RATE_PER_SECOND)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _own_address(device, version: int, fallback: bytes) -> bytes:
    candidates = [a.ip for a in device.addresses if a.version == version]
    candidates.sort(key=lambda ip: ip.is_link_local)
    return candidates[0].packed if candidates else fallback


def _allowed(device) -> bool:
    bucket = getattr(device, "_icmp_bucket", None)
    if bucket is None:
        bucket = device._icmp_bucket = _Bucket(device.clock)
    return bucket.take()


def unreachable(device, packet: bytes) -> bytes | None:
    """The error to write back into the TUN device, or None if none is due."""
    version = packet[0] >> 4
    if version == 4:
        reply = _unreachable_v4(device, packet)
    elif version == 6:
        reply = _unreachable_v6(device, packet)
    else:
        return None
    if reply is None or not _allowed(device):
        return None
    return reply


def _unreachable_v4(device, packet: bytes) -> bytes | None:
    if len(packet) < 20:
        return None
    header_len = (packet[0] & 0x0F) * 4
    source, destination = packet[12:16], packet[16:20]
    fragment_offset = int.from_bytes(packet[6:8], "big") & 0x1FFF
    src_ip = ipaddress.IPv4Address(source)
    if fragment_offset or src_ip.is_multicast or src_ip.is_unspecified or src_ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    if packet[9] == 1 and len(packet) > header_len and packet[header_len] in ICMP_ERROR_TYPES:
        return None                       # never answer an error with an error
    quoted = packet[:MAX_ICMP_PACKET - 28]
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0) + quoted)
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    own = _own_address(device, 4, destination)
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(icmp), 0, 0, 64, 1, 0,
                                   own, source))
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header + icmp)


def _unreachable_v6(device, packet: bytes) -> bytes | None:
    if len(packet) < 40:
        return None
    source, destination = packet[8:24], packet[24:40]
    src_ip = ipaddress.IPv6Address(source)
    if src_ip.is_multicast or src_ip.is_unspecified:
        return None
    if packet[6] == 58 and len(packet) > 40 and packet[40] < 128:
        return None                       # an ICMPv6 error: no error about it
    quoted = packet[:MAX_ICMPV6_PACKET - 48]
    own = _own_address(device, 6, destination)
    icmp = bytearray(struct.pack("!BBHI", ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH, 0, 0) + quoted)
    pseudo = own + source + len(icmp).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    icmp[2:4] = checksum(pseudo + bytes(icmp)).to_bytes(2, "big")
    header = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 64, own, source)
    return header + bytes(icmp)
