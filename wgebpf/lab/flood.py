"""A bounded UDP flood of junk and handshake-shaped packets, for tests and bench.

    sent = flood(ns, "192.0.2.1", 51820, "junk", seconds=3, max_packets=2_000_000)

runs one process inside namespace `ns` (a netns.Namespace or a name) that
sends as fast as one core can for at most `seconds` (never more than
MAX_SECONDS) or `max_packets` packets, whichever ends first, and returns how
many it sent. start_flood() is the same without waiting, to flood while
something else runs.

Speed: a pool of POOL_SIZE distinct IP packets is built once, then handed to
the kernel by sendmmsg(2) on a raw socket, BATCH at a time, so Python costs
one call per batch and the kernel sets the pace (on a veth the receiving
side's XDP runs in the sender's softirq, on the same core).

Kinds (KINDS):
  random           random bytes, 0-200 long: mostly unknown types
  badlength        WireGuard headers (types 1-4) with a wrong length for the type
  data             data messages to random receiver indexes
  junk             random, badlength and data, interleaved
  initiation       well-formed initiations with a wrong mac1
  initiation-mac1  initiations with a right mac1 for `public_key` (and junk
                   inside: the responder spends a DH finding out)
Sources: the namespace's own address, or `source` = a network whose
addresses the packets cycle through (spoofed; raw sockets write the IP
header): IPv4 hosts, or for IPv6 one address in each /64 of it. Only documentation and loopback addresses are accepted, as target
and as source: this tool cannot be pointed at anyone.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

from ..wireguard.icmp import checksum

KINDS = ("random", "badlength", "data", "junk", "initiation", "initiation-mac1")
MAX_SECONDS = 10.0
MAX_PACED_SECONDS = 120.0       # a paced flood (rate=) is bounded by rate * seconds
MAX_PACKETS = 100_000_000
POOL_SIZE = 1024
BATCH = 64

ALLOWED = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "127.0.0.0/8"))

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class FloodResult:
    sent: int
    seconds: float
    kind: str

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


# ---- packets ------------------------------------------------------------------

def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes, *,
               ident: int = 0) -> bytes:
    """An IPv4 or IPv6 packet (by the addresses) carrying one UDP datagram,
    checksums right, no extension headers or options."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp_len = 8 + len(payload)
    head = struct.pack("!HHHH", sport, dport, udp_len, 0)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_len)
        csum = checksum(pseudo + head + payload) or 0xFFFF
        udp = struct.pack("!HHHH", sport, dport, udp_len, csum) + payload
        return ipv4_header(s.packed, d.packed, socket.IPPROTO_UDP, len(udp), ident=ident) + udp
    pseudo = s.packed + d.packed + struct.pack("!I3xB", udp_len, socket.IPPROTO_UDP)
    csum = checksum(pseudo + head + payload) or 0xFFFF
    udp = struct.pack("!HHHH", sport, dport, udp_len, csum) + payload
    return ipv6_header(s.packed, d.packed, socket.IPPROTO_UDP, len(udp)) + udp


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ident: int = 0,
                frag: int = 0, ttl: int = 64) -> bytes:
    """20 bytes; frag = flags << 13 | offset in 8-byte units."""
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, frag, ttl, proto, 0,
                    src, dst)
    return h[:10] + struct.pack("!H", checksum(h)) + h[12:]


def ipv6_header(src: bytes, dst: bytes, next_header: int, payload_len: int,
                hop_limit: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, next_header, hop_limit, src, dst)


def wg_header(kind: int, index: int, reserved: bytes = b"\0\0\0") -> bytes:
    """Type, three reserved bytes, and a little-endian index (sender or receiver)."""
    return bytes([kind]) + reserved + struct.pack("<I", index)


def initiation(rng: random.Random, public_key: bytes | None = None) -> bytes:
    """148 bytes shaped like an initiation: random sender, ephemeral, sealed
    static and timestamp; mac1 right for `public_key` if given, else random."""
    body = wg_header(1, rng.getrandbits(32)) + rng.randbytes(32 + 48 + 28)
    if public_key is None:
        return body + rng.randbytes(16) + bytes(16)
    from ..wireguard.cookie import mac1_key
    from ..wireguard.crypto import MAC
    return body + MAC(mac1_key(public_key), body) + bytes(16)


def payload(kind: str, rng: random.Random, public_key: bytes | None = None) -> bytes:
    """One WireGuard-ish UDP payload of the given kind."""
    if kind == "random":
        return rng.randbytes(rng.randrange(0, 201))
    if kind == "badlength":
        t = rng.randrange(1, 5)
        good = {1: 148, 2: 92, 3: 64}.get(t)
        if good is None:
            length = rng.randrange(8, 32)           # data shorter than header + tag
        else:
            length = good + rng.choice((-20, -8, -1, 1, 8, 100))
        return (wg_header(t, rng.getrandbits(32)) + rng.randbytes(length))[:length]
    if kind == "data":
        length = rng.choice((32, 48, 96, 160, 576, 1200))
        return (wg_header(4, rng.getrandbits(32)) + struct.pack("<Q", rng.getrandbits(64))
                + rng.randbytes(length - 16))
    if kind == "junk":
        return payload(rng.choice(("random", "badlength", "data")), rng)
    if kind == "initiation":
        return initiation(rng)
    if kind == "initiation-mac1":
        if public_key is None:
            raise ValueError("initiation-mac1 needs the target's public key")
        return initiation(rng, public_key)
    raise ValueError(f"unknown flood kind {kind!r}; one of {', '.join(KINDS)}")


def check_address(addr: str | ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """Refuse anything outside the documentation and loopback prefixes."""
    net = ipaddress.ip_network(addr, strict=False)
    if not any(net.version == a.version and net.subnet_of(a) for a in ALLOWED):
        raise ValueError(f"{addr} is not a documentation or loopback address: refused")


def build_pool(kind: str, target: str, port: int, *, source: str | None = None,
               public_key: bytes | None = None, seed: int | None = None,
               size: int = POOL_SIZE, sport: int | None = None) -> list[bytes]:
    """`size` IP packets of `kind` to target:port. Sources cycle through the
    hosts of network `source`, or are the address the route to target uses;
    source ports are random unless `sport` is given."""
    check_address(target)
    rng = random.Random(seed)
    if source is None:
        sources = [_route_source(target)]
    else:
        check_address(source)
        sources = _sources(ipaddress.ip_network(source, strict=False), size)
    return [udp_packet(sources[i % len(sources)], target,
                       sport if sport is not None else rng.randrange(1024, 65536), port,
                       payload(kind, rng, public_key), ident=i & 0xFFFF)
            for i in range(size)]


def _sources(net, size: int) -> list[str]:
    """Up to `size` addresses of `net`: hosts for IPv4; for IPv6 one in each
    /64 when the network holds several, since a /64 is one source to a
    rate limiter (and to WireGuard's own)."""
    if net.version == 6 and net.prefixlen < 64:
        count = min(size, 1 << (64 - net.prefixlen))
        return [str(net[(i << 64) + 1]) for i in range(count)]
    hosts = net.hosts() if net.num_addresses > 2 else iter(net)
    return [str(a) for a, _ in zip(hosts, range(size))]


def _route_source(target: str) -> str:
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((target, 9))
        return s.getsockname()[0]


# ---- sending: sendmmsg(2) on a raw socket --------------------------------------

class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int


def _sockaddr(target: str) -> bytes:
    addr = ipaddress.ip_address(target)
    if addr.version == 4:
        return struct.pack("=H2x4s8x", socket.AF_INET, addr.packed)
    return struct.pack("=H2xI16sI", socket.AF_INET6, 0, addr.packed, 0)


def send_pool(target: str, pool: Sequence[bytes], seconds: float,
              max_packets: int, rate: float | None = None) -> FloodResult:
    """Send the pool round and round until `seconds` or `max_packets`;
    as fast as the kernel takes them, or `rate` a second."""
    seconds, max_packets = _bounded(seconds, max_packets, rate)
    if rate is not None:
        return _send_paced(target, pool, seconds, max_packets, rate)
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    n = len(pool)
    bufs = [ctypes.create_string_buffer(p, len(p)) for p in pool]
    name = ctypes.create_string_buffer(_sockaddr(target))
    iovs = (_Iovec * n)(*[_Iovec(ctypes.addressof(b), len(p)) for b, p in zip(bufs, pool)])
    msgs = (_Mmsghdr * n)()
    for i in range(n):
        msgs[i].hdr.name = ctypes.addressof(name)
        msgs[i].hdr.namelen = len(name) - 1      # create_string_buffer adds a NUL
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
    base, size = ctypes.addressof(msgs), ctypes.sizeof(_Mmsghdr)
    sent, pos = 0, 0
    start = time.monotonic()
    deadline = start + seconds
    try:
        while sent < max_packets and time.monotonic() < deadline:
            count = min(BATCH, n - pos, max_packets - sent)
            r = _libc.sendmmsg(sock.fileno(), base + pos * size, count, 0)
            if r < 0:
                err = ctypes.get_errno()
                if err in (105, 11, 4):         # ENOBUFS, EAGAIN, EINTR: try again
                    continue
                raise OSError(err, os.strerror(err))
            sent += r
            pos = (pos + r) % n
    finally:
        sock.close()
    return FloodResult(sent, time.monotonic() - start, "")


def _send_paced(target: str, pool: Sequence[bytes], seconds: float, max_packets: int,
                rate: float) -> FloodResult:
    """One packet every 1/rate s (sendto on a raw socket), on a fixed
    schedule so that a late wake-up does not lower the rate."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sent, start = 0, time.monotonic()
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        while sent < max_packets:
            due = start + sent / rate
            if due >= start + seconds:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            sock.sendto(pool[sent % len(pool)], (target, 0))
            sent += 1
    return FloodResult(sent, time.monotonic() - start, "")


def _bounded(seconds: float, max_packets: int, rate: float | None = None) -> tuple[float, int]:
    limit = MAX_SECONDS if rate is None else MAX_PACED_SECONDS
    if rate is not None and not 0 < rate <= 10_000:
        raise ValueError("a paced rate must be in (0, 10000] packets a second")
    if not 0 < seconds <= limit:
        raise ValueError(f"seconds must be in (0, {limit:g}]")
    if not 0 < max_packets <= MAX_PACKETS:
        raise ValueError(f"max_packets must be in (0, {MAX_PACKETS}]")
    return seconds, max_packets


# ---- running it in a namespace ---------------------------------------------------

class Flood:
    """A flood process under way (start_flood); wait() for its result."""

    def __init__(self, proc: subprocess.Popen, kind: str):
        self.proc, self.kind = proc, kind

    def wait(self, timeout: float = MAX_SECONDS + 30) -> FloodResult:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"flood ({self.kind}) exited {self.proc.returncode}: {err.strip()}")
        data = json.loads(out)
        return FloodResult(data["sent"], data["seconds"], self.kind)

    def stop(self) -> None:
        """Kill it (it stops by itself within its bounds anyway)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_flood(ns, target: str, port: int, kind: str, seconds: float = MAX_SECONDS,
                max_packets: int = 10_000_000, *, source: str | None = None,
                public_key: bytes | None = None, seed: int | None = None,
                cpu: int | None = None, rate: float | None = None,
                sport: int | None = None) -> Flood:
    """Start a flood from namespace `ns` (Namespace, name, or None for this
    one); arguments as flood()."""
    _bounded(seconds, max_packets, rate)
    if kind not in KINDS:
        raise ValueError(f"unknown flood kind {kind!r}; one of {', '.join(KINDS)}")
    check_address(target)
    if source is not None:
        check_address(source)
    argv = [sys.executable, "-m", "wgebpf.lab.flood", "--target", target, "--port", str(port),
            "--kind", kind, "--seconds", str(seconds), "--max-packets", str(max_packets)]
    if source is not None:
        argv += ["--source", source]
    if public_key is not None:
        argv += ["--public-key", base64.b64encode(public_key).decode()]
    if seed is not None:
        argv += ["--seed", str(seed)]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    if rate is not None:
        argv += ["--rate", str(rate)]
    if sport is not None:
        argv += ["--sport", str(sport)]
    name = getattr(ns, "name", ns)
    if name:
        argv = ["ip", "netns", "exec", name, *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    return Flood(proc, kind)


def flood(ns, target: str, port: int, kind: str, seconds: float = MAX_SECONDS,
          max_packets: int = 10_000_000, **kwargs) -> int:
    """Flood target:port from namespace `ns`; the number of packets sent.
    kwargs: source (network to spoof from), public_key (initiation-mac1),
    seed, cpu (pin the sender to one CPU), rate (packets a second instead
    of as fast as possible), sport (one source port)."""
    return start_flood(ns, target, port, kind, seconds, max_packets, **kwargs).wait().sent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wgebpf.lab.flood", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--seconds", type=float, default=MAX_SECONDS)
    p.add_argument("--max-packets", type=int, default=10_000_000)
    p.add_argument("--source", help="network to spoof sources from (documentation prefixes)")
    p.add_argument("--public-key", help="base64; for initiation-mac1")
    p.add_argument("--seed", type=int)
    p.add_argument("--cpu", type=int, help="pin to this CPU")
    p.add_argument("--rate", type=float, help="packets a second (default: as fast as possible)")
    p.add_argument("--sport", type=int, help="source port (default: random per packet)")
    a = p.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    key = base64.b64decode(a.public_key) if a.public_key else None
    pool = build_pool(a.kind, a.target, a.port, source=a.source, public_key=key, seed=a.seed,
                      sport=a.sport)
    result = send_pool(a.target, pool, a.seconds, a.max_packets, a.rate)
    print(json.dumps({"sent": result.sent, "seconds": result.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
