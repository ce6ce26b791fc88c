"""TUN device and link/address/route configuration, against the real kernel.

Every test runs in a fresh network namespace: the `netns` fixture moves the
test's thread into it with setns() and back out afterwards, so the code under
test (pyroute2, ioctls, /proc/sys, subprocesses it starts) sees only that
namespace.
"""

import errno
import fcntl
import ipaddress
import json
import os
import secrets
import select
import socket
import struct
import time

import pytest

from wgebpf.kernel import link
from wgebpf.kernel.link import HookError, LinkError, RouteRecord
from wgebpf.wireguard.icmp import checksum as _checksum
from wgebpf.dataplane.tun import (ETH_HLEN, MAX_QUEUES, VNET_HDR_LEN, Tun, TunError,
                                  slot_of, tag)

from nsutil import BPF_PROG_TYPE_SOCKET_FILTER, fresh_netns, load_const_prog, sh as _sh  # noqa: F401



def _ifname() -> str:
    return f"wgt{secrets.token_hex(4)}"   # 11 chars; unique also across parallel runs


def _link_json(name: str) -> dict:
    return json.loads(_sh(f"ip -d -j addr show dev {name}"))[0]


def _first_from_queues(tun: Tun, take, timeout: float = 2.0):
    """The first thing take(queue) returns (not None) as data arrives on any queue."""
    poller = select.poll()
    for fd in tun.fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            got = take(tun.fds.index(fd))
            if got is not None:
                return got
    raise AssertionError(f"no UDP packet arrived on {tun.name}")


def _read_udp(tun: Tun, timeout: float = 2.0) -> tuple[int, bytes]:
    """The first UDP packet that arrives on any queue, and its queue index.

    Other packets (IPv6 router solicitations, MLD reports the kernel sends
    when the link comes up) are skipped.
    """
    def take(q: int):
        packet = tun.read(q)
        return (q, packet) if packet and _is_udp(packet) else None
    return _first_from_queues(tun, take, timeout)


def _send_udp(dst: str, *payloads: bytes, port: int = 9) -> None:
    """Datagrams from this namespace's stack to dst, one socket (one flow)."""
    with socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET,
                       socket.SOCK_DGRAM) as s:
        for payload in payloads:
            s.sendto(payload, (dst, port))


def _is_udp(packet: bytes) -> bool:
    return packet[9] == 17 if packet[0] >> 4 == 4 else packet[6] == 17


def _udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 or IPv6 UDP packet with valid checksums (IPv6 requires one)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    if s.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0,
                          s.packed, d.packed)
        hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
        return hdr + udp
    return struct.pack("!IHBB16s16s", 6 << 28, length, 17, 64, s.packed, d.packed) + udp


def _parse_udp(packet: bytes) -> tuple[str, str, bytes]:
    """(src, dst, payload) of an IPv4/IPv6 UDP packet."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0xF) * 4
        assert packet[9] == 17
        return (str(ipaddress.ip_address(packet[12:16])), str(ipaddress.ip_address(packet[16:20])),
                packet[ihl + 8:])
    assert packet[6] == 17
    return (str(ipaddress.ip_address(packet[8:24])), str(ipaddress.ip_address(packet[24:40])),
            packet[48:])




ADDRS = [ipaddress.ip_interface("192.0.2.1/24"), ipaddress.ip_interface("2001:db8::1/64")]


@pytest.fixture
def tun(netns):
    name = _ifname()
    t = Tun.create(name, queues=3)
    link.configure(name, ADDRS, 1400)
    try:
        yield t
    finally:
        t.close()


# --- the TUN device ---------------------------------------------------------------

@pytest.mark.netns
@pytest.mark.parametrize("queues", [1, 3])
def test_create_multi_queue(netns, queues):
    name = _ifname()
    t = Tun.create(name, queues=queues)
    try:
        info = _link_json(name)
        assert info["linkinfo"]["info_kind"] == "tun"
        data = info["linkinfo"]["info_data"]
        assert data["multi_queue"] is True and data["pi"] is False and data["persist"] is False
        assert data["numqueues"] == queues
        assert t.name == name and t.ifindex == info["ifindex"] and len(t.fds) == queues
        assert all(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK for fd in t.fds)
        assert t.read(queues - 1) is None            # empty queue: None, not an exception
        assert t.add_queue() == queues
        assert _link_json(name)["linkinfo"]["info_data"]["numqueues"] == queues + 1
    finally:
        t.close()
    assert not link.link_exists(name), "a non-persistent TUN goes away with its last fd"


@pytest.mark.netns
@pytest.mark.parametrize("make, expect_errno", [
    (lambda name: Tun.create("x" * 16), errno.EINVAL),
    (lambda name: Tun.create("bad/name"), errno.EINVAL),
    (lambda name: Tun.create(name, queues=0), errno.EINVAL),
    (lambda name: Tun.create(name, queues=MAX_QUEUES + 1), errno.EINVAL),
    (lambda name: Tun.create("lo"), errno.EEXIST),
])
def test_create_refuses(netns, make, expect_errno):
    with pytest.raises(TunError) as e:
        make(_ifname())
    assert e.value.errno == expect_errno and str(e.value)


@pytest.mark.netns
def test_create_refuses_existing_tun_and_queue_limit(netns):
    name = _ifname()
    with Tun.create(name, queues=MAX_QUEUES) as t:
        assert len(t.fds) == MAX_QUEUES
        with pytest.raises(TunError, match="already exists"):
            Tun.create(name)
        with pytest.raises(TunError, match="maximum") as e:
            t.add_queue()
        assert e.value.errno == errno.E2BIG


@pytest.mark.netns
def test_configure_addresses_mtu_up_forwarding(tun):
    link.enable_forwarding(tun.name)
    info = _link_json(tun.name)
    assert info["mtu"] == 1400
    assert "UP" in info["flags"]
    got = {f"{a['local']}/{a['prefixlen']}": a for a in info["addr_info"]}
    assert {"192.0.2.1/24", "2001:db8::1/64"} <= set(got)
    assert got["2001:db8::1/64"].get("nodad") and not got["2001:db8::1/64"].get("tentative")
    for fam in ("ipv4", "ipv6"):
        with open(f"/proc/sys/net/{fam}/conf/{tun.name}/forwarding") as f:
            assert f.read().strip() == "1"
    link.configure(tun.name, ADDRS, 1400)   # again: existing addresses are fine


@pytest.mark.netns
@pytest.mark.parametrize("dst", ["198.51.100.7", "2001:db8:1::7"])
def test_kernel_to_tun(tun, dst):
    link.add_routes(tun.name, ["198.51.100.0/24", "2001:db8:1::/48"], "auto")
    _send_udp(dst, b"through the tunnel")
    _, packet = _read_udp(tun)
    src, got_dst, payload = _parse_udp(packet)
    assert (got_dst, payload) == (dst, b"through the tunnel")
    assert src in ("192.0.2.1", "2001:db8::1")


@pytest.mark.netns
@pytest.mark.parametrize("src, dst, queue", [
    ("192.0.2.2", "192.0.2.1", 0),
    ("2001:db8::2", "2001:db8::1", 0),
    ("192.0.2.2", "192.0.2.1", 2),
])
def test_tun_to_kernel(tun, src, dst, queue):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((dst, 0))      # works at once for IPv6 only thanks to NODAD
        s.settimeout(2)
        port = s.getsockname()[1]
        assert tun.write(_udp_packet(src, dst, 40000, port, b"from a peer"), queue) is True
        data, addr = s.recvfrom(100)
    assert data == b"from a peer" and addr[:2] == (src, 40000)


@pytest.mark.netns
def test_steering_program_picks_the_queue(tun):
    link.add_routes(tun.name, ["198.51.100.0/24"], "auto")
    prog, _ = load_const_prog(BPF_PROG_TYPE_SOCKET_FILTER, 2)
    try:
        tun.set_steering_program(prog)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for port in range(1000, 1010):      # different flows would hash apart
                s.sendto(b"x", ("198.51.100.9", port))
                assert _read_udp(tun)[0] == 2
        tun.set_steering_program(-1)
    finally:
        os.close(prog)


# --- links ------------------------------------------------------------------------

# --- the wgebpf TAP: queues are workers, peers are tags (tun.py, "Peer tags") -------------

ETH_P_ALL = 0x0003
PACKET_HOST = 0


@pytest.fixture
def tap(netns):
    name = _ifname()
    t = Tun.create(name, queues=3, vnet_hdr=True, tap=True)
    link.configure(name, ADDRS, 1400)
    try:
        yield t
    finally:
        t.close()


def _read_raw_udp(tap: Tun, timeout: float = 2.0) -> bytes:
    """The first whole frame carrying UDP that arrives on any queue (others,
    such as MLD reports, skipped)."""
    def take(q: int):
        try:
            frame = os.read(tap.fds[q], 65536)
        except BlockingIOError:
            return None
        return frame if _is_udp(frame[VNET_HDR_LEN + ETH_HLEN:]) else None
    return _first_from_queues(tap, take, timeout)


@pytest.mark.netns
def test_tap_is_an_l3_link_with_its_own_mac(tap):
    info = json.loads(_sh(f"ip -d -j link show dev {tap.name}"))[0]
    assert info["linkinfo"]["info_kind"] == "tun"
    data = info["linkinfo"]["info_data"]
    assert (data["type"], data["vnet_hdr"], data["multi_queue"], data["numqueues"]) == \
        ("tap", True, True, 3)
    assert "NOARP" in info["flags"] and "UP" in info["flags"]
    assert info["inet6_addr_gen_mode"] == "none"
    assert tap.mac == bytes.fromhex(info["address"].replace(":", ""))
    assert tap.mac != bytes(6) and not tap.mac[0] & 1             # a unicast address
    # Up, yet no address of its own (no link-local): only the configured ones.
    addresses = {a["local"] for a in _link_json(tap.name)["addr_info"]}
    assert addresses == {"192.0.2.1", "2001:db8::1"}
    # NOARP: the kernel resolves no neighbour on it, ever.
    link.add_routes(tap.name, ["198.51.100.0/24"], "auto")
    _send_udp("198.51.100.9", b"x")
    _read_raw_udp(tap)
    assert "198.51.100.9" not in _sh(f"ip neigh show dev {tap.name}")


@pytest.mark.netns
@pytest.mark.parametrize("dst", ["198.51.100.7", "2001:db8:1::7"])
def test_tap_frames_go_to_the_devices_own_mac_and_read_strips_the_headers(tap, dst):
    link.add_routes(tap.name, ["198.51.100.0/24", "2001:db8:1::/48"], "auto")
    _send_udp(dst, b"first")
    frame = _read_raw_udp(tap)
    _send_udp(dst, b"second")
    _, packet = _read_udp(tap)                       # Tun.read: the bare packet
    v6 = ":" in dst
    # [virtio_net_hdr, all zeros: no offloads][dst = the device][src = the device][type]
    ethertype = b"\x86\xdd" if v6 else b"\x08\x00"
    assert frame[:VNET_HDR_LEN + ETH_HLEN] == bytes(VNET_HDR_LEN) + tap.mac + tap.mac + ethertype
    assert _parse_udp(frame[VNET_HDR_LEN + ETH_HLEN:])[1:] == (dst, b"first")
    assert packet[0] >> 4 == (6 if v6 else 4)
    assert _parse_udp(packet)[1:] == (dst, b"second")


@pytest.mark.netns
@pytest.mark.parametrize("src, dst, queue, slot", [
    ("192.0.2.2", "192.0.2.1", 1, 1),
    ("2001:db8::2", "2001:db8::1", 2, 0x1234),
    ("192.0.2.2", "192.0.2.1", 0, 0),            # the control plane's own: no peer
])
def test_tap_write_tags_the_source_and_the_kernel_delivers(tap, src, dst, queue, slot):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    packet = None
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sniffer, \
            socket.socket(fam, socket.SOCK_DGRAM) as s:
        sniffer.bind((tap.name, 0))
        sniffer.settimeout(2)
        s.bind((dst, 0))
        s.settimeout(2)
        port = s.getsockname()[1]
        packet = _udp_packet(src, dst, 40000, port, b"from peer %d" % slot)
        assert tap.link_header(packet, slot) == (bytes(VNET_HDR_LEN) + tap.mac + tag(slot)
                                                 + (b"\x86\xdd" if fam == socket.AF_INET6
                                                    else b"\x08\x00"))
        assert tap.write(packet, queue, slot=slot) is True
        data, addr = s.recvfrom(100)
        # What tc ingress sees: the device's MAC as destination, the tag as source.
        while True:
            frame, info = sniffer.recvfrom(65536)
            if info[2] == PACKET_HOST and frame[ETH_HLEN:] == packet:
                break
    assert data == b"from peer %d" % slot and addr[:2] == (src, 40000)
    assert frame[:6] == tap.mac and frame[6:12] == tag(slot) and slot_of(frame[6:12]) == slot


def test_tags_name_slots_big_endian():
    assert tag(0) == b"\x02\x77\x00\x00\x00\x00"
    assert tag(1) == b"\x02\x77\x00\x00\x00\x01"
    assert tag(65535) == b"\x02\x77\x00\x00\xff\xff"
    assert tag(0x01020304) == b"\x02\x77\x01\x02\x03\x04"
    for slot in (1, 255, 256, 65535):
        assert slot_of(tag(slot)) == slot
    assert slot_of(bytes.fromhex("5a0000c00201")) == 0           # a MAC that is no tag
    assert slot_of(bytes.fromhex("0277000000ff") + b"rest") == 255  # reads the first 6 bytes


@pytest.mark.netns
def test_link_exists_kind_and_remove(netns):
    name = _ifname()
    assert not link.link_exists(name) and link.remove_link(name) is False
    t = Tun.create(name)
    try:
        assert link.link_exists(name) and link.link_kind(name) == "tun"
        assert link.remove_link(name) is True     # works while the fd is still open
        assert not link.link_exists(name)
    finally:
        t.close()
    with pytest.raises(LinkError):
        link.configure(name, ADDRS, 1400)


# --- routes -----------------------------------------------------------------------

def _snapshot() -> str:
    return _sh("ip route show table all; ip -6 route show table all; ip rule; ip -6 rule")


def _routes(table: str, fam: str = "-4") -> set[str]:
    return {line.split()[0] for line in _sh(f"ip {fam} route show table {table}").splitlines()}


NETS = ["192.0.2.0/25", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/80", "2001:db8:1::/48"]


@pytest.mark.netns
@pytest.mark.parametrize("table, fwmark, main4, main6, other_table, rules", [
    # off: nothing
    ("off", 0, set(), set(), None, 0),
    # a number: everything in that table, nothing else, no rules
    ("1234", 0, set(), set(), ("1234", {"192.0.2.0/25", "198.51.100.0/24", "203.0.113.0/24"}), 0),
    # auto: main table, except networks the connected routes already cover
    ("auto", 0, {"198.51.100.0/24", "203.0.113.0/24"}, {"2001:db8:1::/48"}, None, 0),
    (None, 0, {"198.51.100.0/24", "203.0.113.0/24"}, {"2001:db8:1::/48"}, None, 0),
])
def test_add_routes_table_modes(tun, table, fwmark, main4, main6, other_table, rules):
    before = _snapshot()
    main4_before, main6_before = _routes("main"), _routes("main", "-6")
    records = link.add_routes(tun.name, NETS, table, fwmark)
    assert _routes("main") - main4_before == main4
    assert _routes("main", "-6") - main6_before == main6
    if other_table:
        assert _routes(other_table[0]) == other_table[1]
    assert sum(r.kind == "rule" for r in records) == rules
    dicts = json.loads(json.dumps([r.to_dict() for r in records]))   # as state.py stores them
    assert [RouteRecord.from_dict(d) for d in dicts] == records
    link.remove_routes(dicts)
    assert _snapshot() == before
    assert all("already gone" in line for line in link.remove_routes(dicts))   # idempotent


@pytest.mark.netns
@pytest.mark.parametrize("fwmark, occupy, expect_table", [
    (0, None, 51820),          # wg-quick's default
    (0, "51820", 51821),       # ... or the next free table
    (0x1234, None, 0x1234),    # the device's FwMark is the table
])
def test_add_routes_default_route_recipe(tun, fwmark, occupy, expect_table):
    if occupy:
        _sh(f"ip route add 203.0.113.0/24 dev {tun.name} table {occupy}")
    before = _snapshot()
    records = link.add_routes(tun.name, ["0.0.0.0/0", "::/0", "198.51.100.0/24"], "auto", fwmark)
    assert link.fwmark_of(records) == expect_table
    assert _routes(str(expect_table)) == {"default"}
    assert _routes(str(expect_table), "-6") == {"default"}
    for fam in ("-4", "-6"):
        rules = _sh(f"ip {fam} rule")
        assert f"32765:\tnot from all fwmark {expect_table:#x} lookup {expect_table}" in rules
        assert "32764:\tfrom all lookup main suppress_prefixlength 0" in rules
    assert "198.51.100.0/24" in _routes("main")
    link.remove_routes([r.to_dict() for r in records])
    assert _snapshot() == before


@pytest.mark.netns
def test_add_routes_failure_rolls_back(tun):
    _sh(f"ip route add 203.0.113.0/24 dev {tun.name} table 1234")
    before = _snapshot()
    with pytest.raises(LinkError, match="203.0.113.0/24"):
        link.add_routes(tun.name, ["198.51.100.0/24", "203.0.113.0/24"], 1234)
    assert _snapshot() == before


@pytest.mark.netns
def test_add_routes_rejects_bad_table(tun):
    with pytest.raises(ValueError):
        link.add_routes(tun.name, NETS, "nonsense")


# --- hooks ------------------------------------------------------------------------

def test_hooks_substitute_name_and_run_in_order(tmp_path):
    out = tmp_path / "out"
    link.run_hooks([f"echo first %i > {out}", f"echo 'second %i' >> {out}"], "wg7")
    assert out.read_text() == "first wg7\nsecond wg7\n"


def test_failing_hook_raises_and_stops(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(HookError) as e:
        link.run_hooks(["echo oops on %i >&2; exit 3", f"touch {marker}"], "wg7")
    assert e.value.cmd == "echo oops on wg7 >&2; exit 3"
    assert e.value.returncode == 3 and "oops on wg7" in e.value.stderr
    assert not marker.exists()
