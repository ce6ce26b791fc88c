"""GRO on TUN/TAP write: merge a batch's consecutive TCP segments of one flow.

The worker decrypts a batch of packets from one peer and writes them to its
TAP queue, behind the peer's tag (Link). Written one by one, the kernel's TCP stack sees every
segment and ACKs every second one. With the TUN opened with IFF_VNET_HDR
(see tun.py) every write starts with a struct virtio_net_hdr, and one write
can carry a GSO "super-packet": the segments of a flow joined behind one
IP/TCP header, which the kernel's TCP receives as one large segment (as if
its own GRO had merged them) and ACKs once.

`coalesce(packets)` takes the inner packets of one batch, in arrival order,
and returns the buffers to write, each with its virtio_net_hdr. It merges
only what Linux GRO (net/ipv4/tcp_offload.c tcp_gro_receive, inet/ipv6
gro_receive) would merge: same addresses and ports, IPv4 without options or
fragmentation (DF is fine) with a valid header checksum and an ID that
counts up by one per segment (or stays fixed under DF), IPv6 without
extension headers, the same TOS/TTL (IPv6: the whole first word and hop
limit), the same ACK number, TCP header length, flags word (ACK only; PSH
only on the last segment merged) and window, identical TCP options,
contiguous sequence numbers, a payload of gso_size bytes in every segment but
the last, which may be shorter (and ends the super-packet), at most
MAX_SEGMENTS segments and 65535 bytes of IP length (IPv6: of payload length).
Everything else (UDP, ICMP, SYN/FIN/RST/URG/ECE/CWR, pure ACKs, anything
malformed or truncated) is passed through unchanged behind a plain header.
The merged header is the first segment's (its sequence number and IPv4 ID)
with the lengths and IPv4 header checksum made new and the flags of the
last segment (its PSH). Its ACK number and window are every segment's: like
Linux GRO (and wireguard-go, whose flow key holds the ACK number), segments
whose ACK or window differ are not merged, so no ACK or window update of the
sender is hidden from the receiving TCP.

Why the merged payload's TCP checksum is not computed here: the super-packet
is handed over as CHECKSUM_PARTIAL (VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start at
the TCP header, csum_offset 16 = TCP's checksum field, which holds the
pseudo-header sum, not inverted, as that convention requires). The kernel
trusts such an skb for local delivery without verifying it, and if it
forwards the packet instead, segmentation (GSO) or the checksum helper
computes each segment's checksum itself. Skipping the check is sound because
every segment's bytes were authenticated by Poly1305 under the session key
before they got here: nobody but the peer could have produced them, and the
peer could as well have sent a valid checksum. The segments' own TCP
checksums are therefore not verified either. A packet that merges with
nothing keeps its bytes and gets the plain header, so the kernel verifies
its checksum as it does today.

Order: a super-packet goes out at the position of its first segment; the
segments of one flow stay in order (a segment of a flow that cannot extend
that flow's run ends the run and goes after it); packets of different flows
may pass each other, as they can under Linux GRO. An IPv6 packet with
extension headers or an IPv4 TCP fragment (whose flow cannot be told)
ends every open run.

Pure functions, no I/O; the hot path is written for CPython: one
struct.unpack_from per packet, one bytes join per super-packet.
"""

from __future__ import annotations

import struct

# struct virtio_net_hdr (<linux/virtio_net.h>): flags, gso_type, hdr_len,
# gso_size, csum_start, csum_offset. 10 bytes: TUN's default vnet header size
# and what TUNSETVNETHDRSZ is set to; the 12-byte virtio_net_hdr_mrg_rxbuf
# adds num_buffers, which only means something to virtio's mergeable receive
# buffers, not to a TUN. Fields are in native byte order: a TUN without
# TUNSETVNETLE/BE uses the legacy virtio convention (= the host's order).
VNET_HDR_LEN = 10
_VNET = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
TCP_CSUM_OFFSET = 16                   # offsetof(struct tcphdr, check)

PLAIN_HDR = bytes(VNET_HDR_LEN)        # no checksum to do, no GSO: "nothing special"

MAX_SEGMENTS = 64
MAX_IP_LEN = 65535

_ACK, _PSH = 0x10, 0x08
_PSH_WORD = _PSH << 16                 # PSH in TCP's 32-bit word at offset 12 (doff, flags, window)
_NOPSH = 0xFFFFFFFF & ~_PSH_WORD
_NOPSH64 = 0xFFFFFFFFFFFFFFFF & ~_PSH_WORD    # in ack << 32 | word
_ACK_ONLY = _ACK << 16
_DF = 0x4000

# IPv4 header (no options) + TCP fixed header, 40 bytes, in 12 fields:
# vt (version/IHL, TOS), totlen, id, ftp (frag word, TTL, protocol), csum, addrs,
# ports, seq, ack, word (doff, flags, window), tcp csum, urgent pointer
_V4 = struct.Struct("!HHHIHQIIIIHH")
_V4_HOT = struct.Struct("!HHHIHQIIQ")   # the same to ack+word (one field), no csum, urg
_V4_IP = struct.Struct("!HHHIHQ")
# IPv6 header + TCP fixed header, 60 bytes: word0 (version, class, flow label),
# payload length, nhh (next header, hop limit), addrs, then as above
_V6 = struct.Struct("!IHH32sIIIIHH")
_V6_IP = struct.Struct("!IHH32s")
_V6_ADDR_WORDS = struct.Struct("!16H")
_IP4_WORDS = struct.Struct("!10H")
_TCP_HDR = struct.Struct("!IIIIHH")
_WORD = struct.Struct("!I")
_ADDRS = struct.Struct("!Q")

# IPv6 next headers that are final and not TCP: passing them changes no run.
_V6_NOT_TCP = frozenset((17, 58, 59, 132, 136))


class Link:
    """The link-layer header every output buffer carries after its virtio
    header: none for a TUN; for the wgebpf TAP the destination and source
    MACs (`macs`, 12 bytes: tun.py, "Peer tags") and the EtherType. Offsets in
    the virtio header (csum_start, hdr_len) count from the frame's start,
    so they grow by its length."""

    __slots__ = ("plain4", "plain6", "head4", "head6", "size")

    def __init__(self, macs: bytes = b""):
        self.head4 = macs + b"\x08\x00" if macs else b""
        self.head6 = macs + b"\x86\xdd" if macs else b""
        self.plain4 = PLAIN_HDR + self.head4
        self.plain6 = PLAIN_HDR + self.head6
        self.size = len(self.head4)


NO_LINK = Link()


def plain_header() -> bytes:
    """The all-zero virtio_net_hdr: a complete packet, checksums as they are."""
    return PLAIN_HDR


def gso_header(gso_type: int, hdr_len: int, gso_size: int, csum_start: int,
               csum_offset: int = TCP_CSUM_OFFSET) -> bytes:
    """A virtio_net_hdr for a CHECKSUM_PARTIAL GSO packet."""
    return _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size,
                      csum_start, csum_offset)


def _fold(s: int) -> int:
    """Ones-complement sum `s` folded to 16 bits (never 0 for s > 0)."""
    return s % 0xFFFF or (0xFFFF if s else 0)


def ipv4_header_checksum(header) -> int:
    """The checksum field for a 20-byte IPv4 header (its own field counted as 0)."""
    w = _IP4_WORDS.unpack_from(header)
    return ~_fold(sum(w) - w[5]) & 0xFFFF


def _addr4_sum(addrs: int) -> int:
    return (addrs >> 48) + ((addrs >> 32) & 0xFFFF) + ((addrs >> 16) & 0xFFFF) + (addrs & 0xFFFF)


class _Run:
    """One flow's segments that will become one write."""

    __slots__ = ("packets", "h", "v6", "hlen", "gso", "seq", "ack", "word", "aw", "s1", "s2",
                 "base", "length", "opts", "next_id", "alt_id", "step", "addrs", "ports")

    def __init__(self, pkt, h, v6, hlen, plen, length, opts, base):
        self.packets = [pkt]
        self.h = h                     # the first segment's unpacked headers
        self.v6 = v6
        self.hlen = hlen               # IP + TCP header length
        self.gso = plen                # every segment but the last carries this much
        self.seq = (h[-5] + plen) & 0xFFFFFFFF      # the next segment's sequence number
        self.ack = h[-4]
        self.word = h[-3]              # doff, flags (ACK only), window
        self.s1, self.s2 = h[0], h[2] if v6 else h[3]   # v4: vt, ftp; v6: word0, nhh
        self.base = base               # v4: header sum without totlen, id, csum
        self.length = length           # IP total length (v6: payload length) so far
        self.opts = opts               # the TCP options' bytes
        self.next_id = -1 if v6 else (h[2] + 1) & 0xFFFF      # v4 ID counting up
        self.alt_id = -1 if v6 or not h[3] & (_DF << 16) else h[2]   # or fixed under DF
        self.step = 1
        self.aw = self.ack << 32 | self.word
        self.addrs, self.ports = (None, None) if v6 else (h[5], h[6])

    def build(self, link: Link) -> bytes:
        pkts = self.packets
        if len(pkts) == 1:
            return (link.plain6 if self.v6 else link.plain4) + pkts[0]
        h, hlen, length = self.h, self.hlen, self.length
        if self.v6:
            ip = _V6_IP.pack(h[0], length, h[2], h[3])
            pseudo = sum(_V6_ADDR_WORDS.unpack(h[3])) + length + 6
            iphl, gso_type = 40, VIRTIO_NET_HDR_GSO_TCPV6
        else:
            ip = _V4_IP.pack(h[0], length, h[2], h[3], ~_fold(self.base + length + h[2]) & 0xFFFF,
                             h[5])
            pseudo = _addr4_sum(h[5]) + 6 + length - 20
            iphl, gso_type = 20, VIRTIO_NET_HDR_GSO_TCPV4
        last_word = _WORD.unpack_from(pkts[-1], iphl + 12)[0]      # PSH from the last
        tcp = _TCP_HDR.pack(h[-6], h[-5], h[-4], last_word, _fold(pseudo), h[-1])
        vnet = _VNET.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, link.size + hlen, self.gso,
                          link.size + iphl, TCP_CSUM_OFFSET)
        parts = [vnet, link.head6 if self.v6 else link.head4, ip, tcp, self.opts]
        parts += [p[hlen:] for p in pkts]
        return b"".join(parts)


def coalesce(packets, link: Link = NO_LINK) -> list:
    """The buffers to write to a vnet-hdr TUN for `packets` (see the module
    doc), each with `link`'s header after its virtio header."""
    plain4, plain6 = link.plain4, link.plain6
    out: list = []                     # bytes (passed through) or _Run, in output order
    runs: dict = {}                    # flow key (address and port bytes) -> its open _Run
    last = None                        # the IPv4 run the previous packet went to, if open
    for pkt in packets:
        n = len(pkt)
        v = pkt[0] >> 4 if n else 0
        if v == 4 and n >= 40:
            vt, tot, ident, ftp, ipsum, addrs, ports, seq, aw = _V4_HOT.unpack_from(pkt)
            if ftp & 0xBFFF00FF != 6 or vt >> 8 != 0x45:
                last = None
                _other4(out, runs, pkt, vt, ftp, plain4)
                continue
            r = last                   # most often, the same flow as the packet before
            if r is None or addrs != r.addrs or ports != r.ports:
                r = runs.get((addrs, ports))
            if (r is not None and seq == r.seq and tot == n and aw & _NOPSH64 == r.aw
                    and ftp == r.s2 and vt == r.s1
                    and (r.base + tot + ident + ipsum) % 0xFFFF == 0):
                plen = tot - r.hlen
                pkts = r.packets
                if (0 < plen <= r.gso and r.length + plen <= MAX_IP_LEN
                        and (not r.opts or pkt[40:r.hlen] == r.opts)
                        and (ident == r.next_id or ident == r.alt_id and len(pkts) == 1)):
                    if ident != r.next_id:
                        r.step = 0     # the ID stays fixed (DF), from the second segment on
                    r.next_id = (ident + r.step) & 0xFFFF
                    pkts.append(pkt)
                    r.seq = (seq + plen) & 0xFFFFFFFF
                    r.length += plen
                    last = r
                    if plen < r.gso or aw & _PSH_WORD or len(pkts) >= MAX_SEGMENTS:
                        del runs[(addrs, ports)]   # nothing may follow this segment
                        last = None
                    continue
            last = _start(out, runs, (addrs, ports), pkt, n, _V4.unpack_from(pkt), False, plain4)
        elif v == 6 and n >= 60:
            h = _V6.unpack_from(pkt)
            word0, plen6, nhh, _, _, seq, ack, word, _, _ = h
            if nhh >> 8 != 6:
                if nhh >> 8 not in _V6_NOT_TCP:
                    runs.clear()       # extension headers: whose flow, cannot tell
                    last = None
                out.append(plain6 + pkt)
                continue
            key = pkt[8:44]
            if key.__class__ is not bytes:
                key = bytes(key)       # a memoryview key may be unhashable
            r = runs.get(key)
            if (r is not None and seq == r.seq and plen6 + 40 == n and ack == r.ack
                    and word & _NOPSH == r.word and word0 == r.s1 and nhh == r.s2):
                plen = n - r.hlen
                if (0 < plen <= r.gso and r.length + plen <= MAX_IP_LEN
                        and (not r.opts or pkt[60:r.hlen] == r.opts)):
                    pkts = r.packets
                    pkts.append(pkt)
                    r.seq = (seq + plen) & 0xFFFFFFFF
                    r.length += plen
                    if plen < r.gso or word & _PSH_WORD or len(pkts) >= MAX_SEGMENTS:
                        del runs[key]
                    continue
            _start(out, runs, key, pkt, n, h, True, plain6)
        else:
            # Too short for a TCP segment (or not IP: the kernel drops that).
            out.append((plain6 if v == 6 else plain4) + pkt)
    return [r if r.__class__ is bytes else r.build(link) for r in out]


def _other4(out, runs, pkt, vt, ftp, plain) -> None:
    """An IPv4 packet that is not a plain TCP segment candidate."""
    if ftp & 0xFF == 6:
        if ftp & 0x3FFF0000:           # a TCP fragment: its flow is unknown
            runs.clear()
        elif vt >> 12 == 4 and (vt >> 8 & 0xF) >= 5:
            off = (vt >> 8 & 0xF) * 4  # options: the ports are further on
            if len(pkt) >= off + 4:
                runs.pop((_ADDRS.unpack_from(pkt, 12)[0], _WORD.unpack_from(pkt, off)[0]), None)
    out.append(plain + pkt)


def _start(out, runs, key, pkt, n, h, v6, plain):
    """`pkt` cannot extend its flow's run: start a new run with it (returned,
    open), or pass it (None)."""
    runs.pop(key, None)
    word = h[-3]
    iphl = 40 if v6 else 20
    hlen = (word >> 28) * 4 + iphl
    length = h[1]                      # v4: total length; v6: payload length
    plen = n - hlen
    flags = word & 0xFF0000
    if (length + (40 if v6 else 0) != n or plen <= 0 or word >> 28 < 5
            or flags & ~_PSH_WORD != _ACK_ONLY):
        out.append(plain + pkt)
        return
    base = 0
    if not v6:
        base = h[0] + (h[3] >> 16) + (h[3] & 0xFFFF) + _addr4_sum(h[5])
        if (base + h[1] + h[2] + h[4]) % 0xFFFF:               # bad header checksum
            out.append(plain + pkt)
            return
    if flags & _PSH_WORD:              # nothing may follow it: a single packet
        out.append(plain + pkt)
        return
    opts = bytes(pkt[iphl + 20:hlen])
    r = _Run(pkt, h, v6, hlen, plen, length, opts, base)
    out.append(r)
    runs[key] = r
    return r
