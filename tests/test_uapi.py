"""The cross-platform UAPI: get/set text against a fake device, the socket
server, and Debian's real wg(8) talking to it."""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import random
import socket
import stat
import subprocess
import threading
import time

import pytest

from wgebpf.control import uapi
from wgebpf.wireguard.crypto import DH_PUBKEY

# Fixed keys keep expected strings readable.
PRIV = bytes(range(1, 33))
PRIV2 = bytes(range(101, 133))
PK1 = bytes([0x11] * 32)
PK2 = bytes([0x22] * 32)
PK3 = bytes([0x33] * 32)
PSK = bytes([0x44] * 32)
ZERO = bytes(32)


class FakePeer:
    def __init__(self, public_key: bytes):
        self.public_key = public_key
        self.preshared_key = ZERO
        self.endpoint: tuple[str, int] | None = None
        self.persistent_keepalive_interval = 0
        self.last_handshake_time = 0.0
        self.tx_bytes = 0
        self.rx_bytes = 0

    def set_preshared_key(self, key: bytes) -> None:
        self.preshared_key = key

    def set_endpoint(self, endpoint: tuple[str, int]) -> None:
        self.endpoint = endpoint

    def set_persistent_keepalive(self, seconds: int) -> None:
        self.persistent_keepalive_interval = seconds


class FakeDevice:
    """Implements the device interface uapi.py codes against.

    With `lock` given, every public attribute access made while the lock is
    free is recorded in `_unlocked`: the server must hold the lock.
    """

    def __init__(self, lock: threading.Lock | None = None):
        self._lock = lock
        self._unlocked: list[str] = []
        self.private_key: bytes | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.peers: dict[bytes, FakePeer] = {}
        self.allowed: dict[bytes, list] = {}
        self._owner: dict = {}          # network -> public key
        self.busy_ports: set[int] = set()
        self.created: list[bytes] = []

    def __getattribute__(self, name):
        if not name.startswith("_"):
            lock = object.__getattribute__(self, "_lock")
            if lock is not None and not lock.locked():
                object.__getattribute__(self, "_unlocked").append(name)
        return object.__getattribute__(self, name)

    def set_private_key(self, key):
        self.private_key = key

    def set_listen_port(self, port):
        if port in self.busy_ports:
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self.listen_port = port

    def set_fwmark(self, mark):
        self.fwmark = mark

    def add_peer(self, public_key):
        if public_key not in self.peers:
            self.peers[public_key] = FakePeer(public_key)
            self.allowed[public_key] = []
            self.created.append(public_key)
        return self.peers[public_key]

    def remove_peer(self, public_key):
        self.peers.pop(public_key, None)
        self.allowed.pop(public_key, None)

    def remove_all_peers(self):
        self.peers.clear()
        self.allowed.clear()

    def allowed_ips_of(self, peer):
        return list(self.allowed[peer.public_key])

    def add_allowed_ip(self, peer, network):
        # Like the real trie: a prefix belongs to exactly one peer.
        owner = self._owner.get(network)
        if owner is not None and network in self.allowed.get(owner, ()):
            self.allowed[owner].remove(network)
        self._owner[network] = peer.public_key
        self.allowed[peer.public_key].append(network)

    def clear_allowed_ips(self, peer):
        self.allowed[peer.public_key] = []


def net(text):
    return ipaddress.ip_network(text)


def configured_device() -> FakeDevice:
    dev = FakeDevice()
    dev.private_key = PRIV
    dev.listen_port = 51820
    dev.fwmark = 0x1234
    p1 = dev.add_peer(PK1)
    p1.preshared_key = PSK
    p1.endpoint = ("192.0.2.1", 51820)
    p1.persistent_keepalive_interval = 25
    p1.last_handshake_time = 1700000000.25
    p1.tx_bytes, p1.rx_bytes = 1000, 2000
    dev.add_allowed_ip(p1, net("198.51.100.0/24"))
    dev.add_allowed_ip(p1, net("2001:db8:1::/48"))
    p2 = dev.add_peer(PK2)
    p2.endpoint = ("2001:db8::2", 51821)
    dev.add_allowed_ip(p2, net("203.0.113.7/32"))
    return dev


def set_lines(text: str) -> list[str]:
    return text.strip("\n").split("\n")


# ------------------------------------------------------------------ format_get

def test_get_empty_device_is_only_errno():
    assert uapi.format_get(FakeDevice()) == "errno=0\n\n"


def test_get_every_key():
    expected = (
        f"private_key={PRIV.hex()}\n"
        "listen_port=51820\n"
        "fwmark=4660\n"
        f"public_key={PK1.hex()}\n"
        f"preshared_key={PSK.hex()}\n"
        "protocol_version=1\n"
        "endpoint=192.0.2.1:51820\n"
        "last_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=250000000\n"
        "tx_bytes=1000\n"
        "rx_bytes=2000\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=198.51.100.0/24\n"
        "allowed_ip=2001:db8:1::/48\n"
        f"public_key={PK2.hex()}\n"
        f"preshared_key={ZERO.hex()}\n"
        "protocol_version=1\n"
        "endpoint=[2001:db8::2]:51821\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "allowed_ip=203.0.113.7/32\n"
        "errno=0\n\n"
    )
    assert uapi.format_get(configured_device()) == expected


def test_get_omits_zero_private_key():
    dev = FakeDevice()
    dev.private_key = ZERO
    assert uapi.format_get(dev) == "errno=0\n\n"


STATS = ("last_handshake_time_sec", "last_handshake_time_nsec", "tx_bytes", "rx_bytes", "errno")


def config_only(text: str) -> list[str]:
    return [l for l in text.split("\n") if l and l.split("=")[0] not in STATS]


def test_round_trip_get_into_set():
    source = configured_device()
    copy = FakeDevice()
    assert uapi.apply_set(copy, config_only(uapi.format_get(source))) == 0
    assert config_only(uapi.format_get(copy)) == config_only(uapi.format_get(source))
    assert list(copy.peers) == [PK1, PK2]


# ------------------------------------------------------------------- apply_set

# (set lines, check on the resulting device, starting from configured_device())
SET_CASES = [
    ("private_key", f"private_key={PRIV2.hex()}", lambda d: d.private_key == PRIV2),
    ("private_key upper hex", f"private_key={PRIV2.hex().upper()}", lambda d: d.private_key == PRIV2),
    ("private_key zero clears", f"private_key={ZERO.hex()}", lambda d: d.private_key is None),
    ("listen_port", "listen_port=51999", lambda d: d.listen_port == 51999),
    ("listen_port 0", "listen_port=0", lambda d: d.listen_port == 0),
    ("fwmark", "fwmark=4294967295", lambda d: d.fwmark == 0xFFFFFFFF),
    ("fwmark off", "fwmark=0", lambda d: d.fwmark == 0),
    ("replace_peers", "replace_peers=true", lambda d: d.peers == {}),
    ("replace_peers then add",
     f"replace_peers=true\npublic_key={PK3.hex()}\nallowed_ip=192.0.2.0/24",
     lambda d: list(d.peers) == [PK3] and d.allowed[PK3] == [net("192.0.2.0/24")]),
    ("new peer from public_key alone", f"public_key={PK3.hex()}",
     lambda d: list(d.peers) == [PK1, PK2, PK3]),
    ("preshared_key", f"public_key={PK2.hex()}\npreshared_key={PSK.hex()}",
     lambda d: d.peers[PK2].preshared_key == PSK),
    ("preshared_key zero", f"public_key={PK1.hex()}\npreshared_key={ZERO.hex()}",
     lambda d: d.peers[PK1].preshared_key == ZERO),
    ("endpoint v4", f"public_key={PK2.hex()}\nendpoint=203.0.113.9:1",
     lambda d: d.peers[PK2].endpoint == ("203.0.113.9", 1)),
    ("endpoint v6 normalised", f"public_key={PK1.hex()}\nendpoint=[2001:DB8:0::9]:65535",
     lambda d: d.peers[PK1].endpoint == ("2001:db8::9", 65535)),
    ("endpoint v6 zone", f"public_key={PK1.hex()}\nendpoint=[fe80::1%veth0]:51820",
     lambda d: d.peers[PK1].endpoint == ("fe80::1%veth0", 51820)),
    ("persistent_keepalive_interval", f"public_key={PK2.hex()}\npersistent_keepalive_interval=65535",
     lambda d: d.peers[PK2].persistent_keepalive_interval == 65535),
    ("allowed_ip appends", f"public_key={PK2.hex()}\nallowed_ip=2001:db8:2::/48",
     lambda d: d.allowed[PK2] == [net("203.0.113.7/32"), net("2001:db8:2::/48")]),
    ("allowed_ip masks host bits", f"public_key={PK2.hex()}\nreplace_allowed_ips=true\nallowed_ip=192.0.2.77/24",
     lambda d: d.allowed[PK2] == [net("192.0.2.0/24")]),
    ("replace_allowed_ips", f"public_key={PK1.hex()}\nreplace_allowed_ips=true\nallowed_ip=192.0.2.1/32",
     lambda d: d.allowed[PK1] == [net("192.0.2.1/32")] and d.allowed[PK2] == [net("203.0.113.7/32")]),
    ("replace_allowed_ips to none", f"public_key={PK1.hex()}\nreplace_allowed_ips=true",
     lambda d: d.allowed[PK1] == []),
    ("allowed_ip moves between peers", f"public_key={PK1.hex()}\nallowed_ip=203.0.113.7/32",
     lambda d: d.allowed[PK2] == [] and net("203.0.113.7/32") in d.allowed[PK1]),
    ("remove", f"public_key={PK1.hex()}\nremove=true", lambda d: list(d.peers) == [PK2]),
    ("remove unknown is a no-op", f"public_key={PK3.hex()}\nremove=true",
     lambda d: list(d.peers) == [PK1, PK2] and PK3 not in d.created),
    ("lines after remove are ignored", f"public_key={PK1.hex()}\nremove=true\nendpoint=192.0.2.3:3",
     lambda d: list(d.peers) == [PK2]),
    ("update_only updates existing", f"public_key={PK2.hex()}\nupdate_only=true\npersistent_keepalive_interval=7",
     lambda d: d.peers[PK2].persistent_keepalive_interval == 7),
    ("update_only never creates", f"public_key={PK3.hex()}\nupdate_only=true\nallowed_ip=192.0.2.0/24",
     lambda d: PK3 not in d.peers and PK3 not in d.created),
    ("update_only after a creating line removes",
     f"public_key={PK3.hex()}\nendpoint=192.0.2.3:3\nupdate_only=true", lambda d: PK3 not in d.peers),
    ("protocol_version", f"public_key={PK3.hex()}\nprotocol_version=1", lambda d: PK3 in d.peers),
    ("update_only after remove", f"public_key={PK1.hex()}\nremove=true\nupdate_only=true",
     lambda d: list(d.peers) == [PK2]),
    ("own public key is ignored", f"public_key={DH_PUBKEY(PRIV).hex()}\nallowed_ip=192.0.2.0/24",
     lambda d: list(d.peers) == [PK1, PK2]),
    ("several peers", f"public_key={PK3.hex()}\nallowed_ip=192.0.2.0/25\npublic_key={PK2.hex()}\nremove=true",
     lambda d: list(d.peers) == [PK1, PK3]),
    ("blank line ends the request", "listen_port=1\n\nlisten_port=2", lambda d: d.listen_port == 1),
    ("empty request", "", lambda d: list(d.peers) == [PK1, PK2]),
    # strconv.ParseUint takes leading zeros, however many.
    ("listen_port 5000 leading zeros", "listen_port=" + "0" * 5000 + "7", lambda d: d.listen_port == 7),
    ("endpoint port leading zeros", f"public_key={PK2.hex()}\nendpoint=192.0.2.9:" + "0" * 5000 + "1",
     lambda d: d.peers[PK2].endpoint == ("192.0.2.9", 1)),
]


@pytest.mark.parametrize("lines,check", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_set(lines, check):
    dev = configured_device()
    assert uapi.apply_set(dev, lines.split("\n") if lines else []) == 0
    assert check(dev)


def test_set_private_key_of_existing_peer_removes_it():
    dev = configured_device()
    assert uapi.apply_set(dev, [f"public_key={DH_PUBKEY(PRIV2).hex()}"]) == 0
    assert DH_PUBKEY(PRIV2) in dev.peers
    assert uapi.apply_set(dev, [f"private_key={PRIV2.hex()}"]) == 0
    assert list(dev.peers) == [PK1, PK2]


def test_set_accepts_newline_terminated_lines():
    dev = FakeDevice()
    assert uapi.apply_set(dev, ["listen_port=7\n", f"public_key={PK1.hex()}\n"]) == 0
    assert dev.listen_port == 7 and list(dev.peers) == [PK1]


PEER = f"public_key={PK1.hex()}\n"
ERROR_CASES = [
    ("no equals sign", "listen_port", errno.EPROTO),
    ("unknown interface key", "mtu=1420", errno.EINVAL),
    ("unknown peer key", PEER + "allowed_ips=192.0.2.0/24", errno.EINVAL),
    ("interface key in peer section", PEER + f"private_key={PRIV.hex()}", errno.EINVAL),
    ("short hex", f"private_key={PRIV.hex()[:-2]}", errno.EINVAL),
    ("non-hex", "private_key=" + "zz" * 32, errno.EINVAL),
    ("hex with spaces", "private_key=" + " ".join(["00"] * 32), errno.EINVAL),
    ("bad public_key", "public_key=" + "g" * 64, errno.EINVAL),
    ("bad preshared_key", PEER + "preshared_key=00", errno.EINVAL),
    ("listen_port too big", "listen_port=65536", errno.EINVAL),
    ("listen_port signed", "listen_port=+5", errno.EINVAL),
    ("listen_port empty", "listen_port=", errno.EINVAL),
    ("fwmark too big", "fwmark=4294967296", errno.EINVAL),
    ("fwmark hex", "fwmark=0x10", errno.EINVAL),
    ("replace_peers false", "replace_peers=false", errno.EINVAL),
    ("remove false", PEER + "remove=false", errno.EINVAL),
    ("update_only false", PEER + "update_only=1", errno.EINVAL),
    ("replace_allowed_ips false", PEER + "replace_allowed_ips=false", errno.EINVAL),
    ("protocol_version 2", PEER + "protocol_version=2", errno.EINVAL),
    ("keepalive too big", PEER + "persistent_keepalive_interval=65536", errno.EINVAL),
    ("endpoint without port", PEER + "endpoint=192.0.2.1", errno.EINVAL),
    ("endpoint port too big", PEER + "endpoint=192.0.2.1:65536", errno.EINVAL),
    ("endpoint v6 without brackets", PEER + "endpoint=2001:db8::1:51820", errno.EINVAL),
    ("endpoint brackets without port", PEER + "endpoint=[2001:db8::1]", errno.EINVAL),
    ("endpoint v4 in brackets", PEER + "endpoint=[192.0.2.1]:1", errno.EINVAL),
    ("endpoint hostname", PEER + "endpoint=vpn.example.com:51820", errno.EINVAL),
    ("endpoint odd zone", PEER + "endpoint=[fe80::1%a b]:1", errno.EINVAL),
    ("endpoint non-ascii zone", PEER + "endpoint=[fe80::1%\xe9]:1", errno.EINVAL),
    ("allowed_ip without length", PEER + "allowed_ip=192.0.2.0", errno.EINVAL),
    ("allowed_ip v4 /33", PEER + "allowed_ip=192.0.2.0/33", errno.EINVAL),
    ("allowed_ip v6 /129", PEER + "allowed_ip=2001:db8::/129", errno.EINVAL),
    ("allowed_ip netmask", PEER + "allowed_ip=192.0.2.0/255.255.255.0", errno.EINVAL),
    ("allowed_ip zone", PEER + "allowed_ip=fe80::%eth0/64", errno.EINVAL),
    ("listen_port in use", "listen_port=4242", errno.EADDRINUSE),
    # Past int()'s 4300-digit limit, which a 64 KiB line can reach.
    ("listen_port 5000 digits", "listen_port=" + "9" * 5000, errno.EINVAL),
    ("fwmark 5000 digits", "fwmark=" + "1" * 5000, errno.EINVAL),
    ("keepalive 5000 digits", PEER + "persistent_keepalive_interval=" + "7" * 5000, errno.EINVAL),
    ("endpoint port 5000 digits", PEER + "endpoint=192.0.2.1:" + "5" * 5000, errno.EINVAL),
    ("allowed_ip length 5000 digits", PEER + "allowed_ip=192.0.2.0/" + "2" * 5000, errno.EINVAL),
    ("listen_port non-ascii digit", "listen_port=\u0663", errno.EINVAL),
]


@pytest.mark.parametrize("lines,code", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_set_errors(lines, code):
    dev = FakeDevice()
    dev.busy_ports.add(4242)
    assert uapi.apply_set(dev, lines.split("\n")) == code


@pytest.mark.parametrize("bad_line", [
    "endpoint=nonsense", "allowed_ips=192.0.2.0/24", "no equals sign", "public_key=00",
    "preshared_key=" + "zz" * 32,
])
def test_set_bad_line_applies_nothing(bad_line):
    # wireguard-go would leave the lines before the bad one applied; we
    # check the whole request first, so a typo never half-configures.
    dev = configured_device()
    before = uapi.format_get(dev)
    lines = ["listen_port=1000", "replace_peers=true", f"public_key={PK3.hex()}",
             "allowed_ip=192.0.2.0/24", bad_line, "allowed_ip=198.51.100.0/24"]
    assert uapi.apply_set(dev, lines) in (errno.EINVAL, errno.EPROTO)
    assert uapi.format_get(dev) == before
    assert PK3 not in dev.created


def test_set_device_refusal_keeps_earlier_lines():
    # Only the device itself can refuse a well-formed line (a port in use);
    # then, as in wireguard-go, the lines before it stay applied.
    dev = FakeDevice()
    dev.busy_ports.add(4242)
    assert uapi.apply_set(dev, ["fwmark=5", "listen_port=4242", "fwmark=6"]) == errno.EADDRINUSE
    assert (dev.fwmark, dev.listen_port) == (5, 0)


def test_set_drops_one_trailing_cr_like_bufio_scanlines():
    dev = FakeDevice()
    assert uapi.apply_set(dev, ["listen_port=7\r\n", f"public_key={PK1.hex()}\r", "\r",
                                "fwmark=1"]) == 0
    assert dev.listen_port == 7 and list(dev.peers) == [PK1] and dev.fwmark == 0
    assert uapi.apply_set(dev, ["listen_port=8\r\r"]) == errno.EINVAL


def test_set_bad_value_does_not_create_new_peer():
    dev = FakeDevice()
    assert uapi.apply_set(dev, [f"public_key={PK1.hex()}", "endpoint=bad"]) == errno.EINVAL
    assert dev.peers == {}


class ExplodingDevice(FakeDevice):
    def __init__(self, exc):
        super().__init__()
        self._exc = exc

    def set_fwmark(self, mark):
        raise self._exc


@pytest.mark.parametrize("exc,code", [
    (OSError(errno.EPERM, "Operation not permitted"), errno.EPERM),
    (OSError("no errno"), errno.EADDRINUSE),
    (ValueError("nope"), errno.EINVAL),
    (RuntimeError("bug"), errno.ENOANO),
])
def test_set_device_exceptions_become_errno(exc, code):
    assert uapi.apply_set(ExplodingDevice(exc), ["fwmark=1"]) == code


def test_private_keys_never_logged(caplog):
    dev = FakeDevice()
    caplog.set_level("DEBUG", logger="wgebpf.control.uapi")
    secret = PRIV.hex()
    uapi.apply_set(dev, [f"private_key={secret}", f"public_key={PK1.hex()}", f"preshared_key={secret}",
                         f"private_key={secret}"])
    uapi.apply_set(dev, [f"private_key={secret[:-1]}"])
    assert caplog.records, "the refused lines should have been logged"
    assert secret[:20] not in caplog.text


# ---------------------------------------------------------------------- server

def request(path: str, payload: bytes, answers: int = 1, timeout: float = 5.0) -> list[str]:
    """Sends payload on one connection, returns `answers` answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        return read_answers(s, answers)


def read_answers(s: socket.socket, count: int) -> list[str]:
    data = b""
    while data.count(b"\n\n") < count:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return [a + "\n\n" for a in data.decode().split("\n\n")[:count]]


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def served(tmp_path):
    """A UAPIServer on a lock-checking fake device in a fresh temporary dir."""
    lock = threading.Lock()
    dev = FakeDevice(lock)
    server = uapi.UAPIServer("wgetest0", dev, lock, directory=str(tmp_path / "run" / "wireguard"))
    server.start()
    yield server, dev, lock
    server.stop()
    assert dev._unlocked == []


def test_server_socket_path_dir_and_mode(served):
    server, _, _ = served
    assert server.path.endswith("/run/wireguard/wgetest0.sock")
    assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o755


def test_server_get_and_set(served):
    server, dev, lock = served
    answer = request(server.path, f"set=1\nlisten_port=5\npublic_key={PK1.hex()}\n\n".encode())
    assert answer == ["errno=0\n\n"]
    with lock:
        assert dev.listen_port == 5 and list(dev.peers) == [PK1]
        expected = uapi.format_get(dev)
    assert request(server.path, b"get=1\n\n") == [expected]


def test_server_errno_is_negative_on_the_wire(served):
    server, _, _ = served
    assert request(server.path, b"set=1\nlisten_port=99999\n\n") == [f"errno=-{errno.EINVAL}\n\n"]
    assert request(server.path, b"set=1\nfoo\n\n") == [f"errno=-{errno.EPROTO}\n\n"]
    assert request(server.path, b"get=1\nextra=1\n\n") == [f"errno=-{errno.EINVAL}\n\n"]


def test_server_several_requests_on_one_connection(served):
    server, _, _ = served
    payload = b"set=1\nlisten_port=7\n\nset=1\nlisten_port=x\n\nget=1\n\n"
    first, second, third = request(server.path, payload, answers=3)
    assert (first, second) == ("errno=0\n\n", f"errno=-{errno.EINVAL}\n\n")
    assert third == "listen_port=7\nerrno=0\n\n"


def test_server_request_split_into_bytes(served):
    server, dev, lock = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        for byte in b"set=1\nfwmark=9\n\n":
            s.send(bytes([byte]))
        assert read_answers(s, 1) == ["errno=0\n\n"]
    with lock:
        assert dev.fwmark == 9


@pytest.mark.parametrize("garbage", [
    b"hello\n",                                   # unknown operation
    b"a" * (uapi.MAX_LINE + 10),                  # endless operation line
    b"get=1\nlisten_port=9",                      # client leaves mid-request
    b"\xff\xfe\x00\n\n",
])
def test_server_survives_bad_clients(served, garbage):
    server, dev, lock = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        s.sendall(garbage)
        if garbage.startswith(b"get=1"):
            s.shutdown(socket.SHUT_WR)
        assert closed_by_server(s)
    assert request(server.path, b"get=1\n\n") == ["errno=0\n\n"]


def send_to_close(path: str, payload: bytes, timeout: float = 5.0) -> bytes:
    """Sends payload, shuts down our sending side (end of input for the
    server) and returns everything the server sends until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                 # the server may stop reading before the end
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


EINVAL_ANSWER = f"errno=-{errno.EINVAL}\n\n".encode()
EIO_ANSWER = f"errno=-{errno.EIO}\n\n".encode()


@pytest.mark.parametrize("payload,answer,applied", [
    (b"set=1\nlisten_port=9\nfwmark=3\n", b"errno=0\n\n", True),     # no blank line
    (b"set=1\nlisten_port=9\nfwmark=3", b"errno=0\n\n", True),        # nor a last newline
    (b"set=1\nlisten_port=9\nfwmark=x", EINVAL_ANSWER, False),         # checked as usual
    (b"set=1\n", b"errno=0\n\n", False),                               # an empty set
    (b"set=1", b"", False),                                             # no operation line yet
])
def test_server_set_ended_by_end_of_input(served, payload, answer, applied):
    # wireguard-go's bufio.Scanner stops at EOF and applies what it read.
    server, dev, lock = served
    assert send_to_close(server.path, payload) == answer
    with lock:
        assert (dev.listen_port, dev.fwmark) == ((9, 3) if applied else (0, 0))
    assert request(server.path, b"get=1\n\n")[0].endswith("errno=0\n\n")


@pytest.mark.parametrize("payload,answer", [
    (b"get=1\n", b""),          # wireguard-go drops a get without its blank line
    (b"get=1", b""),
    (b"get=1\n\n", b"errno=0\n\n"),
])
def test_server_get_must_be_complete(served, payload, answer):
    server, _, _ = served
    assert send_to_close(server.path, payload) == answer


def test_server_5000_byte_lines_are_lines(served):
    # Leading zeros are fine for strconv.ParseUint, so the first is valid.
    server, _, _ = served
    valid = b"listen_port=" + b"0" * 5000 + b"9"
    too_big = b"fwmark=" + b"1" * 5000
    payload = b"set=1\n" + valid + b"\n\nset=1\n" + too_big + b"\n\nget=1\n\n"
    assert request(server.path, payload, answers=3) == [
        "errno=0\n\n", EINVAL_ANSWER.decode(), "listen_port=9\nerrno=0\n\n"]


def test_server_line_limit_is_bufio_scanners(served):
    # bufio.Scanner's 64 KiB buffer holds a 65535-byte line and its newline.
    server, _, _ = served
    longest = b"fwmark=" + b"1" * (uapi.MAX_LINE - len(b"fwmark="))
    assert uapi.MAX_LINE == 65535 and len(longest) == uapi.MAX_LINE
    payload = b"set=1\n" + longest + b"\n\nget=1\n\n"
    assert request(server.path, payload, answers=2) == [EINVAL_ANSWER.decode(), "errno=0\n\n"]


@pytest.mark.parametrize("payload", [
    b"set=1\nlisten_port=9\nfwmark=" + b"1" * uapi.MAX_LINE + b"\nfwmark=3\n\nget=1\n\n",
    b"set=1\nlisten_port=9\nfwmark=" + b"1" * 200_000,            # never ends
    b"set=1\nlisten_port=9\n" + b"x" * (uapi.MAX_LINE + 1),        # ends at end of input
])
def test_server_line_over_64k_is_eio_and_applies_nothing(served, payload):
    server, dev, lock = served
    assert send_to_close(server.path, payload) == EIO_ANSWER
    with lock:
        assert (dev.listen_port, dev.fwmark) == (0, 0)
    assert request(server.path, b"get=1\n\n") == ["errno=0\n\n"]


def test_server_logs_no_key_material(served, caplog):
    server, _, _ = served
    caplog.set_level("DEBUG", logger="wgebpf.control.uapi")
    secret_hex, secret_b64 = PRIV.hex(), b64(PRIV)
    peer = f"public_key={PK1.hex()}\n"
    bodies = [
        secret_b64,                             # a base64 key pasted alone: key=..."
        secret_hex,                             # no '=' at all
        f"{secret_hex}=1",                      # the secret as the key
        f"private_key={secret_b64}",            # base64 where hex belongs
        f"private_key={secret_hex}0",
        peer + f"preshared_key={secret_hex[:-1]}",
        peer + secret_b64,
        f"private_key={secret_hex}\n{secret_b64}",
    ]
    for body in bodies:
        assert send_to_close(server.path, f"set=1\n{body}\n\n".encode()).startswith(b"errno=-")
    send_to_close(server.path, f"{secret_b64}\n".encode())        # as the operation
    send_to_close(server.path, f"set=1\nprivate_key={secret_hex}{'0' * uapi.MAX_LINE}".encode())
    assert len(caplog.records) >= len(bodies)
    for secret in (secret_hex, secret_b64, PK1.hex()):
        assert secret[:16] not in caplog.text


def test_server_request_size_bound(served, monkeypatch):
    server, dev, lock = served
    monkeypatch.setattr(uapi, "MAX_REQUEST_BYTES", 1000)
    big = b"set=1\n" + b"".join(b"fwmark=%d\n" % i for i in range(200)) + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        try:
            s.sendall(big)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_answers(s, 1) == [f"errno=-{errno.EIO}\n\n"]
        assert closed_by_server(s)
    with lock:
        assert dev.fwmark == 0
    assert request(server.path, b"get=1\n\n") == ["errno=0\n\n"]


def test_server_large_request_is_linear(served):
    # ~2.5 MB: 256 peers with 100 allowed ips each.
    server, dev, lock = served
    lines = []
    for i in range(256):
        lines.append(f"public_key={i:064x}")
        lines += [f"allowed_ip=2001:db8:{i:x}:{j:x}::/64" for j in range(100)]
    payload = ("set=1\n" + "\n".join(lines) + "\n\n").encode()
    started = time.monotonic()
    assert request(server.path, payload, timeout=20) == ["errno=0\n\n"]
    assert time.monotonic() - started < 10
    with lock:
        assert len(dev.peers) == 256 and sum(map(len, dev.allowed.values())) == 25600


def test_server_silent_client_times_out(served, monkeypatch):
    server, _, _ = served
    monkeypatch.setattr(uapi, "IDLE_TIMEOUT", 0.3)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        s.sendall(b"set=1\n")
        started = time.monotonic()
        assert closed_by_server(s)
        assert time.monotonic() - started < 3


def test_server_caps_concurrent_clients(tmp_path, monkeypatch):
    monkeypatch.setattr(uapi, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(uapi, "IDLE_TIMEOUT", 1.0)
    server = uapi.UAPIServer("wgetest1", FakeDevice(), threading.Lock(), directory=str(tmp_path))
    server.start()
    idle = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            idle.append(s)
        time.sleep(0.2)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(5)
            extra.connect(server.path)
            assert closed_by_server(extra)
        for s in idle:           # once the idle ones time out, clients are served again
            assert closed_by_server(s)
        time.sleep(0.1)
        assert request(server.path, b"get=1\n\n") == ["errno=0\n\n"]
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_server_holds_the_lock(served):
    server, _, lock = served
    answers = []
    with lock:
        t = threading.Thread(target=lambda: answers.extend(request(server.path, b"get=1\n\n")))
        t.start()
        time.sleep(0.3)
        assert answers == [], "get answered while the device lock was held elsewhere"
    t.join(5)
    assert answers == ["errno=0\n\n"]


def test_server_removes_stale_socket(tmp_path):
    path = uapi.socket_path("wgestale", str(tmp_path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                 # the file stays, nobody listens: stale
    server = uapi.UAPIServer("wgestale", FakeDevice(), threading.Lock(), directory=str(tmp_path))
    server.start()
    try:
        assert request(path, b"get=1\n\n") == ["errno=0\n\n"]
    finally:
        server.stop()
    assert not os.path.exists(path)


def test_server_refuses_live_socket(tmp_path):
    path = uapi.socket_path("wgelive", str(tmp_path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(path)
        live.listen(1)
        server = uapi.UAPIServer("wgelive", FakeDevice(), threading.Lock(), directory=str(tmp_path))
        with pytest.raises(uapi.SocketInUseError, match="in use by another live process"):
            server.start()
        assert os.path.exists(path)
        server.stop()            # a never-started server stops quietly
        assert os.path.exists(path)


def test_server_refuses_non_socket(tmp_path):
    path = uapi.socket_path("wgefile", str(tmp_path))
    open(path, "w").close()
    server = uapi.UAPIServer("wgefile", FakeDevice(), threading.Lock(), directory=str(tmp_path))
    with pytest.raises(FileExistsError):
        server.start()
    assert os.path.isfile(path)


def test_stop_leaves_a_replaced_socket_alone(tmp_path):
    server = uapi.UAPIServer("wgerepl", FakeDevice(), threading.Lock(), directory=str(tmp_path))
    server.start()
    os.unlink(server.path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newer:
        newer.bind(server.path)
        server.stop()
        assert os.path.exists(server.path)


def test_stop_with_client_connected(served):
    server, _, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        s.sendall(b"set=1\n")
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2
        assert closed_by_server(s)
    assert not os.path.exists(server.path)


@pytest.mark.parametrize("name", ["", "a/b", "..", "x" * 16, "nul\0"])
def test_socket_path_rejects_bad_names(name):
    with pytest.raises(ValueError):
        uapi.socket_path(name)


def test_socket_path_default_dir():
    assert uapi.socket_path("wg0") == "/var/run/wireguard/wg0.sock"


# ------------------------------------------------------------ real wg(8) tool

def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def wg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/wg", *args], capture_output=True, text=True,
                          timeout=20, check=check)


@pytest.fixture
def real_server():
    """A UAPIServer in the real /var/run/wireguard (the only place wg(8)
    looks), under a unique name; the socket is removed afterwards."""
    lock = threading.Lock()
    dev = FakeDevice(lock)
    with lock:
        dev.private_key = PRIV
        dev.listen_port = 51820
        p1 = dev.add_peer(PK1)
        p1.preshared_key = PSK
        p1.endpoint = ("192.0.2.1", 51820)
        p1.persistent_keepalive_interval = 25
        p1.last_handshake_time = time.time() - 30
        p1.tx_bytes, p1.rx_bytes = 1 << 20, 2 << 20
        dev.add_allowed_ip(p1, net("198.51.100.0/24"))
        dev.add_allowed_ip(p1, net("2001:db8:1::/48"))
        dev.busy_ports.add(51000)
    while True:
        name = f"wgeuapi{random.randrange(10000):04d}"
        if not os.path.exists(uapi.socket_path(name)):
            break
    server = uapi.UAPIServer(name, dev, lock)
    server.start()
    try:
        yield name, server, dev, lock
    finally:
        server.stop()
        assert not os.path.exists(server.path)
        assert dev._unlocked == []


@pytest.mark.netns
def test_wg_show(real_server):
    name, server, _, _ = real_server
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    out = wg("show", name).stdout
    assert f"interface: {name}" in out
    assert f"public key: {b64(DH_PUBKEY(PRIV))}" in out
    assert "private key: (hidden)" in out
    assert "listening port: 51820" in out
    assert f"peer: {b64(PK1)}" in out
    assert "preshared key: (hidden)" in out
    assert "endpoint: 192.0.2.1:51820" in out
    assert "allowed ips: 198.51.100.0/24, 2001:db8:1::/48" in out
    assert "latest handshake: 30 seconds ago" in out or "latest handshake: 31 seconds ago" in out
    assert "transfer: 2.00 MiB received, 1.00 MiB sent" in out
    assert "persistent keepalive: every 25 seconds" in out
    assert name in wg("show", "interfaces").stdout.split()
    assert wg("show", name, "private-key").stdout.strip() == b64(PRIV)


@pytest.mark.netns
def test_wg_showconf(real_server):
    name, _, _, _ = real_server
    conf = wg("showconf", name).stdout
    expected = [
        "[Interface]", "ListenPort = 51820", f"PrivateKey = {b64(PRIV)}",
        "[Peer]", f"PublicKey = {b64(PK1)}", f"PresharedKey = {b64(PSK)}",
        "AllowedIPs = 198.51.100.0/24, 2001:db8:1::/48", "Endpoint = 192.0.2.1:51820",
        "PersistentKeepalive = 25",
    ]
    assert [l for l in conf.splitlines() if l] == expected


@pytest.mark.netns
def test_wg_set(real_server, tmp_path):
    name, _, dev, lock = real_server
    pk2 = b64(PK2)
    wg("set", name, "peer", pk2, "allowed-ips", "203.0.113.0/24,2001:db8:2::/48",
       "endpoint", "[2001:db8::2]:51821", "persistent-keepalive", "10")
    with lock:
        peer = dev.peers[PK2]
        assert peer.endpoint == ("2001:db8::2", 51821)
        assert peer.persistent_keepalive_interval == 10
        assert dev.allowed[PK2] == [net("203.0.113.0/24"), net("2001:db8:2::/48")]
    assert "endpoint: [2001:db8::2]:51821" in wg("show", name).stdout

    wg("set", name, "peer", b64(PK1), "remove")
    with lock:
        assert list(dev.peers) == [PK2]

    key_file = tmp_path / "private.key"
    key_file.write_text(b64(PRIV2) + "\n")
    wg("set", name, "private-key", str(key_file))
    wg("set", name, "listen-port", "51999", "fwmark", "0x1234")
    with lock:
        assert dev.private_key == PRIV2
        assert dev.listen_port == 51999
        assert dev.fwmark == 0x1234
    assert wg("show", name, "listen-port").stdout.strip() == "51999"
    assert wg("show", name, "fwmark").stdout.strip() == "0x1234"
    assert wg("show", name, "public-key").stdout.strip() == b64(DH_PUBKEY(PRIV2))


@pytest.mark.netns
def test_wg_set_reports_errno(real_server):
    name, _, dev, lock = real_server
    result = wg("set", name, "listen-port", "51000", check=False)
    assert result.returncode != 0
    assert "Address already in use" in result.stderr
    with lock:
        assert dev.listen_port == 51820


@pytest.mark.netns
def test_wg_setconf_and_syncconf(real_server, tmp_path):
    name, _, dev, lock = real_server
    conf = tmp_path / "wg.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {b64(PRIV2)}\nListenPort = 51821\n\n"
                    f"[Peer]\nPublicKey = {b64(PK3)}\nAllowedIPs = 192.0.2.0/24\n")
    wg("setconf", name, str(conf))
    with lock:
        assert list(dev.peers) == [PK3]
        assert dev.private_key == PRIV2 and dev.listen_port == 51821
    # syncconf is get + diff + set with update_only-free peer removal.
    conf.write_text(f"[Interface]\nPrivateKey = {b64(PRIV2)}\nListenPort = 51821\n\n"
                    f"[Peer]\nPublicKey = {b64(PK2)}\nAllowedIPs = 192.0.2.128/25\n")
    wg("syncconf", name, str(conf))
    with lock:
        assert list(dev.peers) == [PK2]
        assert dev.allowed[PK2] == [net("192.0.2.128/25")]
