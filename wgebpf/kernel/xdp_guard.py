"""Underlay guard: loader for bpf/xdp_guard.c (XDP on the underlay device).

The program drops what cannot be WireGuard for us before the kernel builds
a socket buffer for it: datagrams to the listen port with an unknown type,
the wrong length, a receiver index that is not ours, a wrong mac1, or,
only while under load, from a source whose handshake bucket is empty (a
message with a right mac2 has a bucket of its own, which someone forging
the source address cannot spend). Everything else passes untouched.
See the C file's opening comment for every check and return value.

The control plane keeps three things current here:
  set_port(port)             the listen port (0 turns the guard off)
  add_index / remove_index   its local index table: every index with a
                             handshake under way or a keypair (the guard
                             drops responses, cookie replies and data that
                             name any other index)
  set_public_key(pub)        our public key, for the mac1 check
  set_cookie_secret(s, t)    the cookie secret, for the mac2 check under load
and reads two: counters() (per reason, all CPUs) and under_load() (more
than load_threshold handshake messages in a second, held for load_hold
seconds: demand cookies).

Names and layouts mirror bpf/xdp_guard.h; tests/test_bpf_xdp_guard.py checks
them against the compiler. Like the other loaders, call attach() and
detach() from inside the network namespace of the device.

Native XDP on veth (checked on 6.18): XDP_PASS and XDP_DROP need nothing
on the peer; a program on the peer (or GRO) is needed only to XDP_TX or
redirect into a veth, which we never do. What the kernel does require:
the peer's MTU must fit a page (about 3.5 KiB) unless the program handles
multi-buffer frames, and our rx queues must not be fewer than the peer's
tx queues; otherwise native attach fails (ERANGE, ENOSPC) and mode "auto"
falls back to generic. While a native program is attached the kernel also
turns off TSO on the peer veth (restored on detach): WireGuard's UDP is
not affected, TCP over the bare veth segments in software.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bpfmaps
from .link import link_matches
from ..wireguard.cookie import mac1_key
from ..wireguard.messages import HANDSHAKES_PER_SECOND_UNDER_LOAD, UNDER_LOAD_AFTER
from ..wireguard.ratelimiter import PACKETS_BURSTABLE, PACKETS_PER_SECOND

HEADER = os.path.join(bpfmaps.BPF_DIR, "xdp_guard.h")
SOURCE = "xdp_guard.c"

# ---- mirror of xdp_guard.h ----------------------------------------------------
MESSAGE_HANDSHAKE_INITIATION = 1
MESSAGE_HANDSHAKE_RESPONSE = 2
MESSAGE_HANDSHAKE_COOKIE = 3
MESSAGE_DATA = 4
MESSAGE_HANDSHAKE_INITIATION_LEN = 148
MESSAGE_HANDSHAKE_RESPONSE_LEN = 92
MESSAGE_HANDSHAKE_COOKIE_LEN = 64
MESSAGE_DATA_MIN_LEN = 32
MESSAGE_HEADER_LEN = 8
MAC_LEN = 16

MAP_CONFIG = "wgx_config"
MAP_INDEX = "wgx_index"
MAP_SOURCES = "wgx_sources"
MAP_LOAD = "wgx_load"
MAP_COUNTERS = "wgx_counters"
PROG = "wgx_guard"
PROG_MACS = "wgx_macs"
MAP_JUMP = "wgx_jump"

INDEX_MAX = 65536
SOURCES_MAX = 16384

CFG_MAC1 = 1 << 0
CFG_LOCAL_ONLY = 1 << 1

CNT_OTHER = 0
CNT_PASSED = 1
CNT_FRAGMENT = 2
CNT_UNPARSED = 3
CNT_FORWARDED = 4
CNT_SHORT = 5
CNT_BAD_TYPE = 6
CNT_BAD_LENGTH = 7
CNT_UNKNOWN_INDEX = 8
CNT_BAD_MAC1 = 9
CNT_RATE_LIMITED = 10
CNT_EXT_CHAIN = 11
CNT_LAST_PASS = CNT_FORWARDED
CNT_INITIATIONS = 16
CNT_RESPONSES = 17
CNT_LOAD_ONSETS = 18
CNT_MAC2_VALID = 19
CNT_MAC2_MISSING = 20
CNT_MAX = 24

IPV6_EXT_MAX = 6


class Config(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint16),          # host order; 0 = off
                ("pad", ctypes.c_uint16),
                ("flags", ctypes.c_uint32),
                ("rate", ctypes.c_uint32),          # handshakes/s per source; 0 = no limit
                ("burst", ctypes.c_uint32),
                ("load_threshold", ctypes.c_uint32),
                ("pad2", ctypes.c_uint32),
                ("load_hold_ns", ctypes.c_uint64),
                ("mac1_h", ctypes.c_uint32 * 8),
                ("cookie_until_ns", ctypes.c_uint64),   # CLOCK_MONOTONIC; 0 = no secret
                ("cookie_h", ctypes.c_uint32 * 8)]


class SourceKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8),         # 4 or 6
                ("proven", ctypes.c_uint8),         # 1: the bucket of right-mac2 messages
                ("pad", ctypes.c_uint8 * 2),
                ("addr", ctypes.c_uint8 * 8)]       # IPv4 + 4 zero, or the IPv6 /64


class Bucket(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint64),        # nanoseconds of credit
                ("last_ns", ctypes.c_uint64)]


class Load(ctypes.Structure):
    _fields_ = [("window_start_ns", ctypes.c_uint64),
                ("window_count", ctypes.c_uint64),
                ("under_load_until_ns", ctypes.c_uint64)]


STRUCTS: dict[str, type[ctypes.Structure]] = {
    "wgx_config": Config,
    "wgx_source_key": SourceKey,
    "wgx_bucket": Bucket,
    "wgx_load": Load,
}

# Counter index -> name in counters(). The first block are verdicts (each
# packet exactly one), the rest events.
COUNTER_NAMES: dict[int, str] = {
    CNT_OTHER: "other",
    CNT_PASSED: "passed",
    CNT_FRAGMENT: "fragment",
    CNT_UNPARSED: "unparsed",
    CNT_FORWARDED: "forwarded",
    CNT_SHORT: "short",
    CNT_BAD_TYPE: "bad_type",
    CNT_BAD_LENGTH: "bad_length",
    CNT_UNKNOWN_INDEX: "unknown_index",
    CNT_BAD_MAC1: "bad_mac1",
    CNT_RATE_LIMITED: "rate_limited",
    CNT_EXT_CHAIN: "ext_chain",
    CNT_INITIATIONS: "initiations",
    CNT_RESPONSES: "responses",
    CNT_LOAD_ONSETS: "load_onsets",
    CNT_MAC2_VALID: "mac2_valid",
    CNT_MAC2_MISSING: "mac2_missing",
}
PASS_REASONS = ("other", "passed", "fragment", "unparsed", "forwarded")
DROP_REASONS = ("short", "bad_type", "bad_length", "unknown_index", "bad_mac1", "rate_limited",
                "ext_chain")

# ---- XDP attach flags (<linux/if_link.h>) ---------------------------------
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
MODES = ("auto", "native", "generic")


class XdpError(Exception):
    """Attaching the guard failed."""


class XdpBusyError(XdpError):
    """Another XDP program is on the device; attach(force=True) replaces it."""

    def __init__(self, ifname: str, attached: dict[str, int]):
        self.ifname = ifname
        self.attached = attached    # mode -> program id
        progs = ", ".join(f"program {pid} ({_prog_name(pid)}, {mode})"
                          for mode, pid in sorted(attached.items()))
        super().__init__(
            f"{ifname} already has an XDP program wgebpf did not attach: {progs}. "
            "Remove it (ip link set dev {0} xdp off), run `wgebpf detach` if an "
            "old wgebpf instance left it, or pass --force to replace it".format(ifname))


# ---- BLAKE2s state after the mac1 key block ---------------------------------

_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
       0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_SIGMA = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    (14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3),
    (11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4),
    (7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8),
    (9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13),
    (2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9),
    (12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11),
    (13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10),
    (6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5),
    (10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0),
)
_M32 = 0xFFFFFFFF


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M32


def blake2s_compress(h: list[int], block: bytes, t: int, last: bool) -> list[int]:
    """One BLAKE2s compression (RFC 7693 F), as xdp_guard.c does it."""
    m = [int.from_bytes(block[4 * i:4 * i + 4], "little") for i in range(16)]
    v = list(h) + list(_IV)
    v[12] ^= t & _M32
    v[13] ^= t >> 32
    if last:
        v[14] ^= _M32
    for s in _SIGMA:
        for i, (a, b, c, d) in enumerate(((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14),
                                          (3, 7, 11, 15), (0, 5, 10, 15), (1, 6, 11, 12),
                                          (2, 7, 8, 13), (3, 4, 9, 14))):
            v[a] = (v[a] + v[b] + m[s[2 * i]]) & _M32
            v[d] = _rotr(v[d] ^ v[a], 16)
            v[c] = (v[c] + v[d]) & _M32
            v[b] = _rotr(v[b] ^ v[c], 12)
            v[a] = (v[a] + v[b] + m[s[2 * i + 1]]) & _M32
            v[d] = _rotr(v[d] ^ v[a], 8)
            v[c] = (v[c] + v[d]) & _M32
            v[b] = _rotr(v[b] ^ v[c], 7)
    return [h[i] ^ v[i] ^ v[i + 8] for i in range(8)]


def keyed_state(key: bytes) -> list[int]:
    """BLAKE2s-128 keyed with `key`, after compressing the key block."""
    h = list(_IV)
    h[0] ^= 0x01010000 ^ (len(key) << 8) ^ MAC_LEN
    return blake2s_compress(h, key.ljust(64, b"\0"), 64, False)


def mac1_state(public_key: bytes) -> list[int]:
    """wgx_config.mac1_h for our public key: keyed with HASH("mac1----" || public_key)."""
    return keyed_state(mac1_key(public_key))


# ---- the loader ---------------------------------------------------------------

class XdpGuard(bpfmaps.LoadedProgram):
    """The guard for one underlay device: program, maps, attachment.

    mode: "auto" tries native (driver) XDP and falls back to generic;
    "native" or "generic" insist. force: replace an XDP program someone
    else attached (otherwise attach() raises XdpBusyError naming it).
    """

    def __init__(self, ifname: str, listen_port: int = 0, *, mode: str = "auto",
                 force: bool = False, rate: int = PACKETS_PER_SECOND,
                 burst: int = PACKETS_BURSTABLE,
                 load_threshold: int = HANDSHAKES_PER_SECOND_UNDER_LOAD,
                 load_hold: float = UNDER_LOAD_AFTER, public_key: bytes | None = None,
                 local_only: bool = True):
        if mode not in MODES:
            raise ValueError(f"XDP mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.ifname = ifname
        self.requested_mode = mode
        self.force = force
        self.mode: str | None = None        # the mode in use while attached
        self.record: dict | None = None     # xdp_record() while attached
        self.replaced: dict[str, int] = {}  # foreign programs force replaced: mode -> id
        self._config = Config()
        self.bpf = bpfmaps.compile_programs(SOURCE)
        try:
            self._prog = self.bpf.load_func(PROG.encode(), self.bpf.XDP)
            # The MAC rounds run in a program of their own (tail call):
            # the jump table is filled before the guard is attached.
            self._macs = self.bpf.load_func(PROG_MACS.encode(), self.bpf.XDP)
            self.bpf[MAP_JUMP.encode()][ctypes.c_int(0)] = ctypes.c_int(self._macs.fd)
            self._index = self.bpf[MAP_INDEX.encode()]
            self._counters = self.bpf[MAP_COUNTERS.encode()]
            self._load = self.bpf[MAP_LOAD.encode()]
            self.set_rate(rate, burst)
            self.set_load_threshold(load_threshold, load_hold)
            self.set_public_key(public_key)
            self.set_local_only(local_only)
            self.set_port(listen_port)
        except BaseException:
            self.bpf.cleanup()
            raise

    # -- program -------------------------------------------------------------

    def run(self, frame: bytes, repeat: int = 1) -> tuple[int, int]:
        """Run the program on `frame` (BPF_PROG_TEST_RUN), attached or not:
        (XDP verdict, average ns per run). Maps and counters are the real ones."""
        return test_run(self.prog_fd, frame, repeat)

    # -- attachment ------------------------------------------------------------

    def attach(self) -> dict:
        """Attach to the device; returns the xdp_record() to save.

        Never replaces a program silently: the kernel is asked with
        XDP_FLAGS_UPDATE_IF_NOEXIST, so one attached between our check and
        our attach is refused too.
        """
        if self.record is not None:
            return self.record
        with IPRoute() as ipr:
            ifindex = _ifindex(ipr, self.ifname)
            attached = attached_programs(ipr, ifindex)
            if attached:
                if not self.force:
                    raise XdpBusyError(self.ifname, attached)
                for mode, _ in attached.items():
                    _set_xdp(ipr, ifindex, -1, MODE_FLAGS.get(mode, 0))
                self.replaced = dict(attached)
            modes = ("native", "generic") if self.requested_mode == "auto" else (self.requested_mode,)
            errors = []
            for mode in modes:
                try:
                    _set_xdp(ipr, ifindex, self.prog_fd,
                             MODE_FLAGS[mode] | XDP_FLAGS_UPDATE_IF_NOEXIST)
                except NetlinkError as e:
                    if e.code in (errno.EBUSY, errno.EEXIST):
                        raise XdpBusyError(self.ifname, attached_programs(ipr, ifindex)) from e
                    errors.append(f"{mode}: {os.strerror(e.code)} ({e})")
                    continue
                self.mode = mode
                break
            else:
                raise XdpError(f"cannot attach XDP to {self.ifname}: {'; '.join(errors)}")
        self.record = xdp_record(ifindex, self.ifname, self.prog_id, self.mode)
        return self.record

    def detach(self) -> None:
        """Remove our program (and only ours: the same step crash cleanup runs)."""
        if self.record is None:
            return
        remove_xdp(self.record)
        self.record, self.mode = None, None

    def close(self) -> None:
        try:
            self.detach()
        finally:
            self.bpf.cleanup()

    def __enter__(self) -> "XdpGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configuration -----------------------------------------------------------

    @property
    def port(self) -> int:
        return self._config.port

    def set_port(self, port: int) -> None:
        """Guard UDP `port` (live: the next packet sees it); 0 = guard off."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        self._config.port = port
        self._write_config()

    def set_rate(self, rate: int, burst: int) -> None:
        """Handshake messages a second per source prefix, `burst` in a row; rate 0 = off."""
        if not 0 <= rate <= 1_000_000_000 or not 1 <= burst <= 1_000_000:
            raise ValueError(f"bad rate limit {rate}/s burst {burst}")
        self._config.rate, self._config.burst = rate, burst
        self._write_config()

    def set_load_threshold(self, per_second: int, hold: float) -> None:
        """Under load above `per_second` handshake messages a second, for
        `hold` seconds after (per_second 0: any one handshake)."""
        if not 0 <= per_second < 1 << 32 or not 0 <= hold < 1e9:
            raise ValueError(f"bad load threshold {per_second}/s hold {hold}")
        self._config.load_threshold = per_second
        self._config.load_hold_ns = int(hold * 1e9)
        self._write_config()

    def set_public_key(self, public_key: bytes | None) -> None:
        """Check mac1 of handshake messages against `public_key` (None: don't)."""
        if public_key is None:
            self._config.flags &= ~CFG_MAC1
        else:
            if len(public_key) != 32:
                raise ValueError("a public key is 32 bytes")
            self._config.mac1_h[:] = mac1_state(public_key)
            self._config.flags |= CFG_MAC1
        self._write_config()

    def set_cookie_secret(self, secret: bytes, lifetime: float) -> None:
        """Check mac2 under load with the control plane's cookie secret
        (cookie.CookieChecker) for the next `lifetime` seconds."""
        if len(secret) != 32 or not 0 < lifetime < 1e6:
            raise ValueError("a cookie secret is 32 bytes, with a lifetime in seconds")
        self._config.cookie_h[:] = keyed_state(secret)
        self._config.cookie_until_ns = time.monotonic_ns() + int(lifetime * 1e9)
        self._write_config()

    def set_local_only(self, on: bool) -> None:
        """Judge only datagrams the FIB delivers to this host (pass what it
        would forward). Costs a FIB lookup per datagram to the port when
        the device forwards; off judges every datagram to the port."""
        if on:
            self._config.flags |= CFG_LOCAL_ONLY
        else:
            self._config.flags &= ~CFG_LOCAL_ONLY
        self._write_config()

    def _write_config(self) -> None:
        self.bpf[MAP_CONFIG.encode()][ctypes.c_uint32(0)] = self._config

    # -- the index table -------------------------------------------------------------

    def add_index(self, receiver_index: int) -> None:
        """Responses, cookie replies and data naming `receiver_index` may pass."""
        if not 0 <= receiver_index < 1 << 32:
            raise ValueError(f"receiver index must be a 32-bit unsigned int, not {receiver_index}")
        self._index[ctypes.c_uint32(receiver_index)] = ctypes.c_uint32(1)

    def remove_index(self, receiver_index: int) -> None:
        try:
            del self._index[ctypes.c_uint32(receiver_index)]
        except KeyError:
            pass

    def clear_indices(self) -> None:
        self._index.clear()

    def indices(self) -> set[int]:
        return {k.value for k in self._index.keys()}

    # -- what the control plane reads ------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Packets per verdict and event (COUNTER_NAMES), all CPUs summed."""
        return {name: int(sum(self._counters[ctypes.c_uint32(i)]))
                for i, name in COUNTER_NAMES.items()}

    def dropped(self) -> int:
        c = self.counters()
        return sum(c[r] for r in DROP_REASONS)

    def load(self) -> Load:
        v = self._load[ctypes.c_uint32(0)]
        return Load(v.window_start_ns, v.window_count, v.under_load_until_ns)

    def under_load(self) -> bool:
        """More than load_threshold handshake messages came in a second,
        less than load_hold ago: demand cookies. (bpf_ktime_get_ns and
        time.monotonic_ns are both CLOCK_MONOTONIC.)"""
        return time.monotonic_ns() < self.load().under_load_until_ns

    def source_bucket(self, key: SourceKey) -> Bucket | None:
        try:
            v = self.bpf[MAP_SOURCES.encode()][key]
        except KeyError:
            return None
        return Bucket(v.tokens, v.last_ns)


# ---- the record, and removal after a crash -----------------------------------

def xdp_record(ifindex: int, ifname: str, prog_id: int, mode: str) -> dict:
    """The xdp entry: which program wgebpf attached where, in which mode."""
    if mode not in _XDP_MODE_FLAGS:
        raise ValueError(f"XDP mode must be one of {sorted(_XDP_MODE_FLAGS)}, not {mode!r}")
    return {"ifindex": ifindex, "ifname": ifname, "prog_id": prog_id, "mode": mode}


# XDP attach flags (<linux/if_link.h>) and the IFLA_XDP_*_PROG_ID per mode.
_XDP_FLAGS_REPLACE = 1 << 4
_XDP_MODE_FLAGS = {"generic": 1 << 1, "native": 1 << 2, "offload": 1 << 3}
_XDP_MODE_ATTR = {"generic": "IFLA_XDP_SKB_PROG_ID", "native": "IFLA_XDP_DRV_PROG_ID",
                  "offload": "IFLA_XDP_HW_PROG_ID"}


def attached_programs(ipr: IPRoute, ifindex: int) -> dict[str, int]:
    """mode -> attached program id on `ifindex`."""
    xdp = ipr.get_links(ifindex)[0].get("IFLA_XDP")
    if not xdp:
        return {}
    found = {m: xdp.get(attr) for m, attr in _XDP_MODE_ATTR.items() if xdp.get(attr)}
    # With a single program the kernel reports only IFLA_XDP_PROG_ID and the mode.
    mode = {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("IFLA_XDP_ATTACHED"))
    if mode and xdp.get("IFLA_XDP_PROG_ID"):
        found.setdefault(mode, xdp.get("IFLA_XDP_PROG_ID"))
    return found


def remove_xdp(rec: dict) -> list[str]:
    """Detach the program `rec` (xdp_record) names, only if it is still the
    one attached; what detach() and `wgebpf detach` after a crash run."""
    where = rec.get("ifname") or rec["ifindex"]
    with IPRoute() as ipr:
        if not link_matches(ipr, rec["ifindex"], rec.get("ifname")):
            return [f"XDP on {where}: device gone"]
        attached = attached_programs(ipr, rec["ifindex"])
        mode = rec.get("mode") or next(
            (m for m, pid in attached.items() if pid == rec["prog_id"]), "generic")
        if attached.get(mode) != rec["prog_id"]:
            now = attached.get(mode)
            return [f"XDP on {where}: program {rec['prog_id']} not attached"
                    + (f" (program {now} is, left alone)" if now else "")]
        # XDP_FLAGS_REPLACE with the expected program makes the kernel detach
        # only if ours is still the one attached, closing the check-then-act race.
        prog_fd = bpfmaps.prog_fd_by_id(rec["prog_id"])
        try:
            ipr.link("set", index=rec["ifindex"], xdp={"attrs": [
                ("IFLA_XDP_FD", -1),
                ("IFLA_XDP_FLAGS", _XDP_MODE_FLAGS[mode] | _XDP_FLAGS_REPLACE),
                ("IFLA_XDP_EXPECTED_FD", prog_fd)]})
        finally:
            os.close(prog_fd)
    return [f"removed XDP program {rec['prog_id']} ({mode}) from {where}"]


# ---- helpers --------------------------------------------------------------------

def _ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise XdpError(f"no device {ifname}")
    return found[0]


def _set_xdp(ipr: IPRoute, ifindex: int, fd: int, flags: int) -> None:
    ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd),
                                                  ("IFLA_XDP_FLAGS", flags)]})


def _prog_name(prog_id: int) -> str:
    try:
        fd = bpfmaps.prog_fd_by_id(prog_id)
    except OSError:
        return "name unknown"
    try:
        return bpfmaps.prog_info(fd).name or "no name"
    finally:
        os.close(fd)


# BPF_PROG_TEST_RUN: the kernel runs a program on a buffer we give it
# (at least an Ethernet header's 14 bytes for XDP).
_BPF_PROG_TEST_RUN = 10


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> tuple[int, int]:
    """(return value, average duration ns) of one BPF_PROG_TEST_RUN."""
    buf = ctypes.create_string_buffer(bytes(frame), len(frame))
    attr = _TestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                        data_in=ctypes.addressof(buf), repeat=repeat)
    bpfmaps.bpf(_BPF_PROG_TEST_RUN, attr)
    return attr.retval, attr.duration


test_run.__test__ = False   # not a pytest test, despite the name

XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
