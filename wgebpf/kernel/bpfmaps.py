"""bpf/common.h in Python: map names, key/value layouts, flags and counters.

Every name and number here mirrors bpf/common.h, which the eBPF programs
include; tests/test_bpf_nexthop.py compiles the header with bcc and checks
that sizes, field offsets and constants agree, so the two cannot drift
apart silently. Also here: compiling the programs with bcc, and the two bpf()
syscalls the loaders need that bcc does not wrap (program info, run-time
statistics).
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

# The C sources: the repository's bpf/, which the package carries as
# wgebpf/bpf (a link in the source tree, real files in a wheel).
BPF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf")
COMMON_H = os.path.join(BPF_DIR, "common.h")

# ---- Peers, slots, queues and tags ---------------------------------------------
# Queue 0 of the TAP is the control plane's (what no peer takes), queues
# 1..W the workers'; a peer is a slot, carried in frames as a tag MAC.
QUEUE_CONTROL = 0
SLOT_MIN = 1
SLOT_MAX = 65535
SLOTS = 65536              # entries of a slot-indexed map
QUEUES_MAX = 256           # the kernel's MAX_TAP_QUEUES: 1 + workers
TAG_0 = 0x02               # locally administered, unicast
TAG_1 = 0x77
TAG_LEN = 6                # TAG_0, TAG_1, slot as 4 bytes big-endian
ETH_DST = 0                # offsets of the MACs in a frame
ETH_SRC = 6

# ---- Map names ----------------------------------------------------------------
MAP_CONFIG = "wg_config"
MAP_PEERS4 = "wg_peers4"
MAP_PEERS6 = "wg_peers6"
MAP_COUNTERS = "wg_counters"
MAP_NEXTHOPS = "wg_nexthops"
MAP_RXINDEX = "wg_rxindex"
MAP_POLICIES = "wg_policies"
MAP_POLICY_CNT = "wg_policy_cnt"
MAP_ROUTE_SEEN = "wg_route_seen"

PEERS4_MAX = 1048576
PEERS6_MAX = 262144
NEXTHOPS_MAX = 4096
RXINDEX_MAX = 65536

# ---- wg_config ----------------------------------------------------------------
CFG_ALLOWEDIPS = 1 << 0
CFG_SPREAD_FLOWS = 1 << 1      # a peer's flows over every worker (PeerSpread)


class Config(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32),
                ("fib_flags", ctypes.c_uint32),
                ("queues", ctypes.c_uint32),
                ("policy", ctypes.c_uint32),        # POLICY_* for peers on POLICY_DEFAULT
                ("mark_mask", ctypes.c_uint32),     # nftables policy: slot bits in skb->mark
                ("mark_shift", ctypes.c_uint32)]    # the mask's lowest set bit


class LpmKey4(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32),     # host order
                ("addr", ctypes.c_uint8 * 4)]       # network order


class LpmKey6(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32),
                ("addr", ctypes.c_uint8 * 16)]


class NexthopKey(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint8),         # socket.AF_INET / AF_INET6
                ("pad", ctypes.c_uint8 * 3),
                ("addr", ctypes.c_uint8 * 16)]      # IPv4: first 4 bytes


class RouteSeen(ctypes.Structure):
    _fields_ = [("ops", ctypes.c_uint64 * 2), ("dev", ctypes.c_uint64)]


class NexthopStats(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64)]


# ---- Counters (indexes into wg_counters) -----------------------------------
CNT_PEER = 0
CNT_NO_PEER = 1
CNT_NOT_IP = 2
CNT_TRUNCATED = 3
CNT_FIB_ERROR = 4
CNT_NO_QUEUE = 5
CNT_TAG_FAILED = 6
CNT_FIB_RET_BASE = 8
CNT_FIB_OTHER_DEV = 24
CNT_FIB_DEST_FALLBACK = 25
CNT_ROUTE_DST = 26
CNT_FB_NO_DST = 27
CNT_FB_FOREIGN_DST = 28
CNT_FB_OTHER_DEVICE = 29
CNT_FB_READ_FAILED = 30
CNT_MAX = 32

# ---- bpf_fib_lookup flags and return codes (UAPI values) -------------------
FIB_LOOKUP_DIRECT = 1 << 0
FIB_LOOKUP_OUTPUT = 1 << 1
FIB_LOOKUP_SKIP_NEIGH = 1 << 2
FIB_LOOKUP_TBID = 1 << 3
FIB_LOOKUP_SRC = 1 << 4
FIB_LOOKUP_MARK = 1 << 5

FIB_RET_SUCCESS = 0
FIB_RET_BLACKHOLE = 1
FIB_RET_UNREACHABLE = 2
FIB_RET_PROHIBIT = 3
FIB_RET_NOT_FWDED = 4
FIB_RET_FWD_DISABLED = 5
FIB_RET_UNSUPP_LWT = 6
FIB_RET_NO_NEIGH = 7
FIB_RET_FRAG_NEEDED = 8
FIB_RET_NO_SRC_ADDR = 9

# Counter index -> the name counters() reports it under.
COUNTER_NAMES: dict[int, str] = {
    CNT_PEER: "peer",
    CNT_NO_PEER: "no_peer",
    CNT_NOT_IP: "not_ip",
    CNT_TRUNCATED: "truncated",
    CNT_FIB_ERROR: "fib_error",
    CNT_NO_QUEUE: "no_queue",
    CNT_TAG_FAILED: "tag_failed",
    CNT_FIB_RET_BASE + FIB_RET_BLACKHOLE: "fib_blackhole",
    CNT_FIB_RET_BASE + FIB_RET_UNREACHABLE: "fib_unreachable",
    CNT_FIB_RET_BASE + FIB_RET_PROHIBIT: "fib_prohibit",
    CNT_FIB_RET_BASE + FIB_RET_NOT_FWDED: "fib_not_forwarded",
    CNT_FIB_RET_BASE + FIB_RET_FWD_DISABLED: "fib_forwarding_disabled",
    CNT_FIB_RET_BASE + FIB_RET_UNSUPP_LWT: "fib_unsupported_lwt",
    CNT_FIB_RET_BASE + FIB_RET_NO_SRC_ADDR: "fib_no_source_address",
    CNT_FIB_OTHER_DEV: "fib_other_device",
    CNT_FIB_DEST_FALLBACK: "fib_destination_fallback",
    CNT_ROUTE_DST: "route_dst",
    CNT_FB_NO_DST: "fallback_no_dst",
    CNT_FB_FOREIGN_DST: "fallback_foreign_dst",
    CNT_FB_OTHER_DEVICE: "fallback_other_device",
    CNT_FB_READ_FAILED: "fallback_read_failed",
}
# The classifier's fallbacks from the route read to the FIB lookup:
# reason (as in metrics and status) -> counter index.
FALLBACK_REASONS: dict[str, int] = {
    "no_dst": CNT_FB_NO_DST,
    "foreign_dst": CNT_FB_FOREIGN_DST,
    "other_device": CNT_FB_OTHER_DEVICE,
    "read_failed": CNT_FB_READ_FAILED,
}
VERDICT_COUNTERS = tuple(n for i, n in COUNTER_NAMES.items() if i < CNT_FIB_OTHER_DEV)

# ---- Source policy (policy.c) -------------------------------------------------
POLICY_DEFAULT = 0         # per-slot only: follow Config.policy
POLICY_ALLOWEDIPS = 1
POLICY_FIB = 2
POLICY_NFTABLES = 3
POLICY_OFF = 4
POLICY_MAX = 4

# Verdicts: wg_policy_cnt[slot].n[POL_*]; row 0 counts frames with no peer tag
# (the control plane's own).
POL_ACCEPTED = 0
POL_DROP_ALLOWEDIPS = 1
POL_DROP_FIB = 2
POL_FIB_FAILED = 3
POL_MARKED = 4
POL_NOT_IP = 5
POL_DROP_MARK = 6
POL_CNT_MAX = 8

POLICY_COUNTER_NAMES: dict[int, str] = {
    POL_ACCEPTED: "accepted",
    POL_DROP_ALLOWEDIPS: "dropped_allowedips",
    POL_DROP_FIB: "dropped_fib",
    POL_FIB_FAILED: "fib_failed",
    POL_MARKED: "marked",
    POL_NOT_IP: "not_ip",
    POL_DROP_MARK: "dropped_peer_mark",
}


class PolicyCounts(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint64 * POL_CNT_MAX)]


def tag(slot: int) -> bytes:
    """The MAC that names peer `slot` (0..SLOT_MAX; 0: no peer) in a frame."""
    if not 0 <= slot <= SLOT_MAX:
        raise ValueError(f"peer slot must be 0..{SLOT_MAX}, not {slot}")
    return bytes((TAG_0, TAG_1)) + slot.to_bytes(4, "big")


def slot_of_tag(mac: bytes) -> int:
    """The slot a tag names; 0 for a MAC that is not a tag (as the programs read it)."""
    mac = bytes(mac[:TAG_LEN])
    if len(mac) < TAG_LEN or mac[0] != TAG_0 or mac[1] != TAG_1:
        return 0
    slot = int.from_bytes(mac[2:], "big")
    return slot if slot <= SLOT_MAX else 0


# ---- Receive steering ---------------------------------------------------------
MESSAGE_DATA = 4
MESSAGE_DATA_MIN_LEN = 32
SOCKET_CONTROL = 0

# Spread entries of wg_rxindex (common.h): RX_SPREAD | W, W in the low bits.
RX_SPREAD = 1 << 16
RX_WORKERS_MASK = 0xFFFF
RX_SPREAD_SHIFT = 7
RX_COUNTER_OFFSET = 8

# The layouts common.h declares, by C name, for the agreement test.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "wg_config": Config,
    "wg_lpm_key4": LpmKey4,
    "wg_lpm_key6": LpmKey6,
    "wg_nexthop_key": NexthopKey,
    "wg_nexthop_stats": NexthopStats,
    "wg_route_seen": RouteSeen,
    "wg_policy_counts": PolicyCounts,
}


def fib_flags(release: str | None = None) -> int:
    """bpf_fib_lookup flags for the running kernel (config.fib_flags).

    The classifier adds OUTPUT itself for its pinned second lookup. MARK (6.10+) makes fwmark policy rules hold; an older kernel refuses any
    flag it does not know with -EINVAL, so it must not be passed there.
    SKIP_NEIGH (6.3+, and backported to Debian's 6.1) saves a neighbour
    lookup a TUN never has; without it the helper reports NO_NEIGH after
    filling in the next hop, which the classifier accepts.
    """
    version = _kernel_version(release or platform.release())
    flags = 0
    if version >= (6, 3):
        flags |= FIB_LOOKUP_SKIP_NEIGH
    if version >= (6, 10):
        flags |= FIB_LOOKUP_MARK
    return flags


def _kernel_version(release: str) -> tuple[int, int]:
    parts = []
    for piece in release.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def compile_programs(*files: str, cflags: Iterable[str] = ()):
    """One bcc BPF object from the given bpf/ files (concatenated).

    bcc only loads functions defined in the main translation unit, not in
    included files, so the sources are joined into one text; common.h is
    found through -I. One compile for several programs also means one clang
    run (about half a second) and shared maps.
    """
    from bcc import BPF  # imported late: only the data plane needs bcc

    text = "".join(_read(os.path.join(BPF_DIR, f)) for f in files)
    return BPF(text=text.encode(),
               cflags=[f"-I{BPF_DIR}", "-Wno-unused-function", *cflags])


def _read(path: str) -> str:
    with open(path) as f:
        return f"#line 1 \"{os.path.basename(path)}\"\n{f.read()}\n"


# ---- bpf() syscalls bcc does not wrap ---------------------------------------

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280}.get(platform.machine(), 321)
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _ProgInfo(ctypes.Structure):
    # The leading part of struct bpf_prog_info (offsets from the UAPI
    # header); the kernel fills in as much as info_len asks for.
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("_skip", ctypes.c_uint8 * 56), ("name", ctypes.c_char * 16),
                ("_skip2", ctypes.c_uint8 * 112),
                ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    run_time_ns: int    # with statistics enabled (enable_stats), else 0
    run_cnt: int


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(2) with `attr`; its return value, or OSError. The project's one
    way into the syscall for what bcc does not wrap."""
    return _bpf(cmd, attr)


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for the loaded program `prog_id` (close it)."""
    class Attr(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                    ("open_flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]
    try:
        return _bpf(_BPF_PROG_GET_FD_BY_ID, Attr(prog_id, 0, 0, 0))
    except OSError as e:
        raise OSError(e.errno, f"BPF program {prog_id}: {e.strerror}") from None


def prog_info(fd: int) -> ProgInfo:
    """The kernel's view of the program behind `fd` (its id, run statistics)."""
    info = _ProgInfo()
    attr = _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    return ProgInfo(info.id, info.type, info.name.decode(errors="replace"),
                    info.run_time_ns, info.run_cnt)


class LoadedProgram:
    """The fd and kernel id of a loader's main program (self._prog, from
    bcc's load_func): one definition for every loader."""

    _prog: object

    @property
    def prog_fd(self) -> int:
        return self._prog.fd

    @property
    def prog_id(self) -> int:
        return prog_info(self.prog_fd).id


@contextmanager
def enable_stats() -> Iterator[None]:
    """Count run_time_ns/run_cnt of every BPF program while inside.

    BPF_ENABLE_STATS holds the kernel's statistics switch on for as long as
    the returned fd is open and counts its holders, so unlike writing the
    kernel.bpf_stats_enabled sysctl it needs no restore and cannot switch
    statistics off under another user that also turned them on.
    """
    class Attr(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32)]

    fd = _bpf(_BPF_ENABLE_STATS, Attr(_BPF_STATS_RUN_TIME))
    try:
        yield
    finally:
        os.close(fd)
