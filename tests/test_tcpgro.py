"""GRO on TUN write (wgebpf/dataplane/tcpgro.py) and the vnet-hdr TUN.

The unit tests check coalesce() against a reference segmentation written
here (split a super-packet's payload by gso_size, fix lengths, sequence
numbers, IDs and checksums, as the kernel's GSO does): what comes back must
be exactly the packets that went in. The netns tests show that the real
kernel takes the super-packets: a TCP connection is played by hand over a
vnet-hdr TUN and a listening socket receives the bytes, with few ACKs.
"""

import ipaddress
import os
import select
import socket
import struct
import time

import pytest
from hypothesis import given, strategies as st

from wgebpf.dataplane import tcpgro
from wgebpf.dataplane.tcpgro import (MAX_SEGMENTS, PLAIN_HDR, VNET_HDR_LEN, coalesce,
                                     ipv4_header_checksum)
from wgebpf.dataplane.tun import Tun
from wgebpf.kernel import link

from nsutil import fresh_netns  # noqa: F401

ACK, PSH, SYN, FIN, RST, URG, ECE, CWR = 0x10, 0x08, 0x02, 0x01, 0x04, 0x20, 0x40, 0x80
TS_OPTS = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)   # NOP NOP timestamps


# --- checksums and packets ---------------------------------------------------------

def _sum16(data) -> int:
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum(data) -> int:
    return ~_sum16(data) & 0xFFFF


def _pseudo(src: bytes, dst: bytes, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, 6, length)
    return src + dst + struct.pack("!I3xB", length, 6)


def tcp_packet(src="192.0.2.2", dst="192.0.2.1", sport=40000, dport=5001, seq=1000,
               ack=1, flags=ACK, window=502, payload=b"", opts=b"", ident=0,
               ttl=64, tos=0, df=True, flow=0, urg=0) -> bytes:
    """A complete IPv4/IPv6 TCP packet with valid checksums."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    doff = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0,
                      urg) + opts + payload
    c = _csum(_pseudo(s, d, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    if len(s) == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(tcp), ident,
                         0x4000 if df else 0, ttl, 6, 0, s, d)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        return ip + tcp
    return struct.pack("!IHBB16s16s", 6 << 28 | tos << 20 | flow, len(tcp), 6, ttl, s, d) + tcp


_PATTERN = bytes(range(256)) * 260


def flow(n, size=1400, last=None, v6=False, seq=1000, ident=7, psh_last=False, **kw):
    """`n` consecutive segments of one flow (the last `last` bytes long)."""
    if v6:
        kw.setdefault("src", "2001:db8::2")
        kw.setdefault("dst", "2001:db8::1")
    out = []
    for i in range(n):
        ln = last if (last is not None and i == n - 1) else size
        flags = ACK | (PSH if psh_last and i == n - 1 else 0)
        out.append(tcp_packet(seq=seq, ident=(ident + i) & 0xFFFF, flags=flags,
                              payload=_PATTERN[seq % 256:seq % 256 + ln], **kw))
        seq = (seq + ln) & 0xFFFFFFFF
    return out


# --- the reference segmentation ------------------------------------------------------

def segment(buf: bytes) -> list[bytes]:
    """What the kernel makes of one vnet buffer: the packets, checksums done."""
    flags, gso_type, hdr_len, gso_size, cstart, coff = struct.unpack_from("=BBHHHH", buf)
    pkt = bytes(buf[VNET_HDR_LEN:])
    if gso_type == 0:
        assert flags == 0 and (hdr_len, gso_size, cstart, coff) == (0, 0, 0, 0)
        return [pkt]
    v6 = gso_type == tcpgro.VIRTIO_NET_HDR_GSO_TCPV6
    assert flags == tcpgro.VIRTIO_NET_HDR_F_NEEDS_CSUM and coff == 16
    assert gso_type == (4 if v6 else 1) and pkt[0] >> 4 == (6 if v6 else 4)
    iphl = 40 if v6 else 20
    assert cstart == iphl
    src, dst = (pkt[8:24], pkt[24:40]) if v6 else (pkt[12:16], pkt[16:20])
    # The field holds the pseudo-header sum for the whole super-packet.
    assert struct.unpack_from("!H", pkt, iphl + 16)[0] == _sum16(_pseudo(src, dst, len(pkt) - iphl))
    if not v6:
        assert ipv4_header_checksum(pkt) == struct.unpack_from("!H", pkt, 10)[0]
        assert _csum(pkt[:20]) == 0
    payload = pkt[hdr_len:]
    assert len(payload) > gso_size, "a super-packet has at least two segments"
    ip, tcp = pkt[:iphl], pkt[iphl:hdr_len]
    seq0 = struct.unpack_from("!I", tcp, 4)[0]
    ident0 = struct.unpack_from("!H", ip, 4)[0]
    out = []
    for i, off in enumerate(range(0, len(payload), gso_size)):
        chunk = payload[off:off + gso_size]
        last = off + gso_size >= len(payload)
        th = bytearray(tcp)
        struct.pack_into("!I", th, 4, (seq0 + off) & 0xFFFFFFFF)
        if not last:
            th[13] &= ~(PSH | FIN) & 0xFF       # as the kernel's tcp_gso_segment does
        th[16:18] = b"\0\0"
        seg_tcp = bytes(th) + chunk
        c = _csum(_pseudo(src, dst, len(seg_tcp)) + seg_tcp)
        seg_tcp = seg_tcp[:16] + struct.pack("!H", c) + seg_tcp[18:]
        h = bytearray(ip)
        if v6:
            struct.pack_into("!H", h, 4, len(seg_tcp))
        else:
            struct.pack_into("!HH", h, 2, 20 + len(seg_tcp), (ident0 + i) & 0xFFFF)
            h[10:12] = b"\0\0"
            struct.pack_into("!H", h, 10, _csum(h))
        out.append(bytes(h) + seg_tcp)
    return out


def resegment(bufs) -> list[bytes]:
    return [p for b in bufs for p in segment(b)]


def _gso(buf) -> tuple[int, int]:
    """(gso_type, number of segments) of one output buffer."""
    _, gso_type, hdr_len, gso_size, _, _ = struct.unpack_from("=BBHHHH", buf)
    if not gso_type:
        return 0, 1
    return gso_type, -(-(len(buf) - VNET_HDR_LEN - hdr_len) // gso_size)


# --- coalesce: unit tests --------------------------------------------------------------

@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("opts", [b"", TS_OPTS])
def test_one_flow_becomes_one_super_packet(v6, opts):
    pkts = flow(44, v6=v6, opts=opts)
    out = coalesce(pkts)
    assert len(out) == 1 and _gso(out[0]) == ((4 if v6 else 1), 44)
    hdr = struct.unpack_from("=BBHHHH", out[0])
    iphl = 40 if v6 else 20
    assert hdr == (1, 4 if v6 else 1, iphl + 20 + len(opts), 1400, iphl, 16)
    assert resegment(out) == pkts


@pytest.mark.parametrize("v6", [False, True])
def test_last_short_segment_ends_the_run(v6):
    pkts = flow(5, last=300, v6=v6)
    more = flow(3, v6=v6, seq=1000 + 4 * 1400 + 300, ident=12)
    out = coalesce(pkts + more)
    assert [_gso(b)[1] for b in out] == [5, 3]
    assert resegment(out) == pkts + more


def test_psh_only_on_the_last():
    a = flow(4, psh_last=True)
    b = flow(3, seq=1000 + 4 * 1400, ident=11)
    out = coalesce(a + b)
    assert [_gso(x)[1] for x in out] == [4, 3]
    assert out[0][VNET_HDR_LEN + 33] == ACK | PSH       # PSH comes from the last segment
    assert resegment(out) == a + b
    # PSH in the middle: the run ends there (the PSH segment is its last).
    pkts = flow(6)
    pkts[2] = tcp_packet(seq=1000 + 2 * 1400, ident=9, flags=ACK | PSH,
                         payload=pkts[2][40:])
    out = coalesce(pkts)
    assert [_gso(x)[1] for x in out] == [3, 3]
    assert resegment(out) == pkts


def test_seq_gap_and_retransmission_split_runs():
    pkts = flow(6)
    gap = pkts[:3] + pkts[4:]
    out = coalesce(gap)
    assert [_gso(x)[1] for x in out] == [3, 2]
    assert resegment(out) == gap
    again = pkts[:3] + pkts[:3]
    assert resegment(coalesce(again)) == again


def test_interleaved_flows_merge_apart_and_keep_their_order():
    a = flow(5, sport=40000)
    b = flow(5, sport=40001, seq=77777, ident=300)
    c = flow(3, v6=True)
    mixed = [p for trio in zip(a, b, c + [None, None]) for p in trio if p is not None]
    out = coalesce(mixed)
    assert [_gso(x) for x in out] == [(1, 5), (1, 5), (4, 3)]   # in order of first packets
    assert resegment(out) == a + b + c


@pytest.mark.parametrize("v6", [False, True])
def test_65535_limit(v6):
    # 46 * 1400 = 64400 payload bytes fit (IPv4: 40 + 64400 <= 65535); 47 do not.
    pkts = flow(47, v6=v6)
    out = coalesce(pkts)
    assert [_gso(x)[1] for x in out] == [46, 1]
    assert len(out[0]) - VNET_HDR_LEN <= 65535 + (40 if v6 else 0)
    assert resegment(out) == pkts
    # IPv6 counts payload length only: 65535 - 20 = 65515 bytes of TCP payload.
    exact = flow(2, size=65515 // 2 + 1, last=65515 - (65515 // 2 + 1), v6=True)
    out = coalesce(exact)
    assert len(out) == 1 and struct.unpack_from("!H", out[0], VNET_HDR_LEN + 4)[0] == 65535


def test_segment_limit():
    pkts = flow(MAX_SEGMENTS + 6, size=100)
    out = coalesce(pkts)
    assert [_gso(x)[1] for x in out] == [MAX_SEGMENTS, 6]
    assert resegment(out) == pkts


@pytest.mark.parametrize("change", [
    dict(flags=ACK | FIN), dict(flags=ACK | SYN), dict(flags=ACK | RST), dict(flags=ACK | URG),
    dict(flags=ACK | ECE), dict(flags=ACK | CWR), dict(flags=0), dict(ttl=63), dict(tos=4),
    dict(ack=2), dict(window=503), dict(opts=TS_OPTS), dict(df=False), dict(ident=99),
])
def test_a_segment_that_differs_does_not_merge(change):
    base = flow(3)
    kw = dict(seq=1000 + 3 * 1400, ident=10, payload=b"x" * 1400)
    kw.update(change)
    odd = tcp_packet(**kw)
    pkts = base + [odd] + flow(2, seq=1000 + 4 * 1400, ident=11)
    out = coalesce(pkts)
    assert PLAIN_HDR + odd in out or _gso(out[1])[0] == 1    # odd alone, or it starts a run
    assert _gso(out[0]) == (1, 3)
    assert resegment(out) == pkts


def test_bigger_segment_after_the_first_does_not_merge():
    pkts = flow(2, size=1000) + flow(1, size=1400, seq=3000, ident=9)
    out = coalesce(pkts)
    assert [_gso(x)[1] for x in out] == [2, 1]
    assert resegment(out) == pkts


def test_fixed_ip_id_with_df_merges():
    pkts = [tcp_packet(seq=1000 + i * 500, ident=0, payload=b"y" * 500) for i in range(4)]
    out = coalesce(pkts)
    assert len(out) == 1 and _gso(out[0]) == (1, 4)
    # GSO numbers IDs from the first: the rest of each packet is unchanged.
    assert [p[:4] + p[6:10] + p[12:] for p in resegment(out)] == \
        [p[:4] + p[6:10] + p[12:] for p in pkts]


def test_pass_through_unchanged():
    udp = bytes.fromhex("4500001c0001000040110000c0000202c0000201") + bytes(8)
    icmp6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 58, 64, bytes(16), bytes(16)) + bytes(8)
    syn = tcp_packet(flags=SYN, opts=bytes([2, 4, 5, 0x78]))
    pure_ack = tcp_packet(seq=5000)
    ext = struct.pack("!IHBB16s16s", 6 << 28, 28, 0, 64, bytes(16), bytes(16)) + bytes(28)
    opts4 = bytearray(tcp_packet(payload=b"z" * 10))
    opts4 = bytes([0x46]) + opts4[1:20] + bytes(4) + opts4[20:]    # IPv4 options
    frag = bytearray(tcp_packet(payload=b"f" * 16))
    frag[6] = 0x20                                                  # MF
    badsum = bytearray(tcp_packet(payload=b"b" * 100))
    badsum[10] ^= 1
    single = flow(1)
    pkts = [udp, icmp6, syn, pure_ack, ext, opts4, bytes(frag), bytes(badsum)] + single
    out = coalesce(pkts)
    assert out == [PLAIN_HDR + p for p in pkts]


def test_memoryview_input_and_bad_checksum_is_not_laundered():
    pkts = flow(4)
    out = coalesce([memoryview(p) for p in pkts])
    assert resegment(out) == pkts
    bad = list(pkts)
    b = bytearray(bad[2])
    b[10] ^= 0x40                          # IPv4 header checksum off
    bad[2] = bytes(b)
    out = coalesce(bad)
    assert [_gso(x)[1] for x in out] == [2, 1, 1]
    assert out[1] == PLAIN_HDR + bad[2]


def test_empty_and_truncated_never_raise():
    pkts = flow(3, opts=TS_OPTS) + flow(2, v6=True)
    assert coalesce([]) == []
    for p in pkts:
        for cut in range(len(p) - 1, -1, -7):
            assert coalesce([p[:cut], p[:cut]]) == [PLAIN_HDR + p[:cut]] * 2


@given(st.lists(st.binary(max_size=80), max_size=6), st.data())
def test_garbage_never_raises(junk, data):
    pkts = flow(3) + flow(2, v6=True)
    mixed = data.draw(st.permutations(junk + pkts))
    out = coalesce(mixed)
    assert all(len(b) >= VNET_HDR_LEN for b in out)


@given(st.data())
def test_mutated_headers_never_raise_and_round_trip(data):
    """Change any header byte of segments of two flows (then make the TCP
    checksum valid again, as a peer's packets are): coalesce never raises, and
    what the kernel gets back (its segmentation) is exactly the input. Not the
    urgent pointer: like Linux GRO, coalesce does not compare it."""
    pkts = flow(4, opts=TS_OPTS) + flow(3, v6=True, last=500)
    pkts = data.draw(st.permutations(pkts))
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(pkts) - 1))
        p = bytearray(pkts[i])
        iphl = 40 if p[0] >> 4 == 6 else 20
        j = data.draw(st.integers(0, 72).filter(lambda j: not iphl + 16 <= j < iphl + 20))
        p[j] = data.draw(st.integers(0, 255))
        pkts[i] = _fix_tcp_checksum(bytes(p), iphl)
    out = coalesce(pkts)
    back = resegment([b for b in out if b[1]])
    assert sorted(back + [bytes(b[VNET_HDR_LEN:]) for b in out if not b[1]]) == sorted(pkts)


def _fix_tcp_checksum(p: bytes, iphl: int) -> bytes:
    if len(p) < iphl + 20:
        return p
    src, dst = (p[8:24], p[24:40]) if iphl == 40 else (p[12:16], p[16:20])
    tcp = p[iphl:iphl + 16] + b"\0\0" + p[iphl + 18:]
    return p[:iphl + 16] + struct.pack("!H", _csum(_pseudo(src, dst, len(tcp)) + tcp)) + p[iphl + 18:]


@given(st.integers(1, 70), st.integers(1, 1460), st.integers(0, 1460), st.booleans(),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.booleans(), st.booleans())
def test_round_trip(n, size, last, v6, seq, ident, ts, psh):
    pkts = flow(n, size=size, last=last or None, v6=v6, seq=seq, ident=ident,
                opts=TS_OPTS if ts else b"", psh_last=psh)
    out = coalesce(pkts)
    assert resegment(out) == pkts
    assert [_gso(b)[1] for b in out] == _expected_runs(pkts, v6)


def _expected_runs(pkts, v6) -> list[int]:
    """Run lengths for one clean flow, straight from the rules."""
    runs = []
    open_, gso, length = False, 0, 0
    for p in pkts:
        doff = (p[(40 if v6 else 20) + 12] >> 4) * 4
        ip_len = len(p) - (40 if v6 else 0)
        plen = len(p) - (40 if v6 else 20) - doff
        if open_ and plen <= gso and length + plen <= 65535 and runs[-1] < MAX_SEGMENTS:
            runs[-1] += 1
            length += plen
        else:
            runs.append(1)
            gso, length = plen, ip_len
        psh = p[(40 if v6 else 20) + 13] & PSH
        open_ = not psh and plen == gso and runs[-1] < MAX_SEGMENTS
    return runs


def test_timing_44_segments():
    """Coalescing costs well under 1 us per segment (the figure is printed)."""
    import timeit
    pkts = flow(44, opts=TS_OPTS)
    runs = 2000
    per = min(timeit.repeat(lambda: coalesce(pkts), number=runs, repeat=7,
                            timer=time.process_time)) / runs / 44
    print(f"coalesce: {per * 1e9:.0f} ns per segment (44 x 1400 B, one flow)")
    assert per < 2e-6            # loose: shared CI machines are slow; typical is far below 1 us


# --- the kernel --------------------------------------------------------------------------

def _ifname() -> str:
    return f"wgg{os.urandom(4).hex()}"


@pytest.fixture
def vtun(netns):
    name = _ifname()
    t = Tun.create(name, queues=2, vnet_hdr=True)
    link.configure(name, [ipaddress.ip_interface("192.0.2.1/24"),
                          ipaddress.ip_interface("2001:db8::1/64")], 1420)
    try:
        yield t
    finally:
        t.close()


def _read_raw(tun: Tun, want, timeout=3.0) -> bytes:
    """The first raw buffer (vnet header included) from any queue for which
    `want(packet)` is true."""
    poller = select.poll()
    for fd in tun.fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            try:
                buf = os.read(fd, 70000)
            except BlockingIOError:
                continue
            if want(buf[VNET_HDR_LEN:]):
                return buf
    raise AssertionError("nothing expected arrived on the TUN")


def _tcp_of(port):
    def want(p):
        return len(p) >= 40 and p[0] == 0x45 and p[9] == 6 and struct.unpack_from("!H", p, 22)[0] == port
    return want


def _drain_tcp(tun: Tun, port: int, settle=0.3) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(_read_raw(tun, _tcp_of(port), settle))
        except AssertionError:
            return out


@pytest.mark.netns
def test_vnet_tun_plain_packets_both_ways(vtun):
    """An ICMP echo written through the vnet TUN is answered; the reply is read
    back with its (all-zero) header, which Tun.read strips."""
    import json
    from nsutil import sh
    data = json.loads(sh(f"ip -d -j link show dev {vtun.name}"))[0]["linkinfo"]["info_data"]
    assert data["vnet_hdr"] is True and data["numqueues"] == 2   # every queue kept the flag
    echo = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + b"ping-through-vnet"
    echo = echo[:2] + struct.pack("!H", _csum(echo)) + echo[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(echo), 1, 0x4000, 64, 1, 0,
                     bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1]))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    assert vtun.write(ip + echo, 1) is True
    raw = _read_raw(vtun, lambda p: len(p) > 20 and p[9] == 1 and p[20] == 0)
    assert raw[:VNET_HDR_LEN] == PLAIN_HDR            # complete, checksummed, no GSO
    reply = raw[VNET_HDR_LEN:]
    assert reply[12:20] == bytes([192, 0, 2, 1, 192, 0, 2, 2]) and reply[28:] == b"ping-through-vnet"
    assert _csum(reply[:20]) == 0 and _csum(reply[20:]) == 0
    # Tun.read strips the header; readinto lands the bare packet in the buffer.
    assert vtun.write(ip + echo, 0)
    time.sleep(0.2)
    got = [p for q in (0, 1) for p in iter(lambda q=q: vtun.read(q), None)]
    assert reply[12:] in [p[12:] for p in got]          # (the IP ID is new)
    assert vtun.write(ip + echo, 0)
    time.sleep(0.2)
    buf = bytearray(2000)
    n = next(n for q in (0, 1) if (n := vtun.readinto(buf, q)) is not None)
    assert bytes(buf[12:n]) == reply[12:]


def _handshake(tun: Tun, lsock_port: int, sport: int, mss=1400):
    """Play the client side of a TCP handshake; (our next seq, their next seq, window)."""
    syn = tcp_packet(sport=sport, dport=lsock_port, seq=999, ack=0, flags=SYN, window=65535,
                     opts=bytes([2, 4]) + struct.pack("!H", mss))
    assert tun.write(syn)
    raw = _read_raw(tun, _tcp_of(sport))
    synack = raw[VNET_HDR_LEN:]
    assert raw[:VNET_HDR_LEN] == PLAIN_HDR
    assert synack[33] == SYN | ACK and struct.unpack_from("!I", synack, 28)[0] == 1000
    their = (struct.unpack_from("!I", synack, 24)[0] + 1) & 0xFFFFFFFF
    window = struct.unpack_from("!H", synack, 34)[0]
    assert tun.write(tcp_packet(sport=sport, dport=lsock_port, seq=1000, ack=their, window=65535))
    return 1000, their, window


@pytest.mark.netns
@pytest.mark.parametrize("n", [2, 8, 40])
def test_kernel_takes_a_super_packet(vtun, n):
    """N segments coalesced into one write reach a real socket intact, and the
    kernel ACKs the super-packet once instead of every second segment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ls:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ls.bind(("192.0.2.1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        seq, their, window = _handshake(vtun, port, 41000)
        conn, _ = ls.accept()
        conn.settimeout(3)
        size = min(1000, window // n)      # all of it inside the first window
        pkts = flow(n, size=size, seq=seq, ack=their, sport=41000, dport=port, window=65535,
                    ident=100)
        out = coalesce(pkts)
        assert len(out) == 1 and _gso(out[0]) == (1, n)
        assert vtun.write_vnet(out[0], 1) is True
        want = b"".join(p[40:] for p in pkts)
        got = b""
        while len(got) < len(want):
            chunk = conn.recv(1 << 16)
            assert chunk
            got += chunk
        assert got == want
        acks = [b[VNET_HDR_LEN:] for b in _drain_tcp(vtun, 41000)]
        acked = [struct.unpack_from("!I", a, 28)[0] for a in acks]
        assert acked and acked[-1] == (seq + n * size) & 0xFFFFFFFF
        assert len(acks) <= 2, f"{len(acks)} ACKs for one super-packet of {n} segments"
        conn.close()


@pytest.mark.netns
def test_kernel_takes_an_ipv6_super_packet(vtun):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as ls:
        ls.bind(("2001:db8::1", 0))
        ls.listen(1)
        port = ls.getsockname()[1]
        kw = dict(src="2001:db8::2", dst="2001:db8::1", sport=42000, dport=port)
        syn = tcp_packet(seq=999, ack=0, flags=SYN, window=65535, **kw)
        assert vtun.write(syn)

        def want(p):
            return len(p) >= 60 and p[0] >> 4 == 6 and p[6] == 6 and \
                struct.unpack_from("!H", p, 42)[0] == 42000
        synack = _read_raw(vtun, want)[VNET_HDR_LEN:]
        their = (struct.unpack_from("!I", synack, 44)[0] + 1) & 0xFFFFFFFF
        assert vtun.write(tcp_packet(seq=1000, ack=their, window=65535, **kw))
        conn, _ = ls.accept()
        conn.settimeout(3)
        pkts = flow(6, size=1000, last=123, v6=True, seq=1000, ack=their, window=65535, **kw)
        out = coalesce(pkts)
        assert len(out) == 1 and _gso(out[0]) == (4, 6)
        assert vtun.write_vnet(out[0])
        want_bytes = b"".join(p[60:] for p in pkts)
        got = b""
        while len(got) < len(want_bytes):
            got += conn.recv(1 << 16)
        assert got == want_bytes
        conn.close()
