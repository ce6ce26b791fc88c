"""Next-hop peer selection: loader for bpf/nexthop.c (tc egress classifier).

The classifier runs on the wgebpf TAP device's clsact egress hook. For each
packet it reads the route's next hop (or, in allowedips mode, takes the
destination) and finds the peer whose allowed-ips hold it longest-prefix
first; it writes the peer's slot as a tag into the frame's destination MAC
(bpfmaps.tag) and picks a worker's queue by the flow hash, which
tun_steer.py's program puts the packet on. Nothing in Python looks at
packets: this module only fills the maps (config, allowed-ips tries) and
reads counters.

One compile serves the classifier, the steering program and the source
policy on ingress (policy.c: it shares the allowed-ips tries and the config);
TunSteering(tun, classifier) and SourcePolicy(classifier) reuse it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import socket
from typing import Iterable, NamedTuple


from . import bpfmaps as m
from . import btf
from . import tc
from .tc import TC_PARENT_EGRESS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MODES = {"nexthop": 0, "allowedips": m.CFG_ALLOWEDIPS}

# The bpf/ files of the one object: policy.c comes after nexthop.c, whose
# maps and helpers it uses.
PROGRAMS = ("nexthop.c", "tun_steer.c", "policy.c")

# Where the filter goes: clsact egress, one bpf filter we can name exactly
# (prio and handle), so detach removes ours and nothing else.
TC_PRIO = 1
TC_HANDLE = 1

log = logging.getLogger("wgebpf")

# Where the classifier takes the next hop from (nexthop mode):
#   route   the route the kernel attached to the packet (skb's dst), read at
#           offsets from the kernel's BTF; the FIB lookup only as fallback,
#           counted by reason (bpfmaps.FALLBACK_REASONS)
#   lookup  a bpf_fib_lookup for every packet (built without the route read:
#           no usable BTF, or the kernel refused the program)
ROUTE_MODES = ("route", "lookup")


class NexthopStats(NamedTuple):
    packets: int
    bytes: int


class NextHopClassifier(m.LoadedProgram, tc.FilterOwner):
    """The classifier for one device: maps, program, and its tc attachment.

    `queues` is the TAP's queue count, 1 + the number of workers: a peer's
    packets go to queue 1 + (flow hash % workers); with no worker queue
    (queues == 1) to queue 0, counted no_queue. Change it with
    set_queue_count() when queues come or go.
    """

    FILTER_NAME, FILTER_PARENT = "wg_nexthop", TC_PARENT_EGRESS
    FILTER_PRIO, FILTER_HANDLE = TC_PRIO, TC_HANDLE


    def __init__(self, ifname_or_index: str | int, mode: str = "nexthop", *,
                 queues: int = m.QUEUES_MAX, read_route: bool = True):
        self.ifindex, self.ifname = _resolve(ifname_or_index)
        self._owned: dict[int, set[Network]] = {}   # slot -> its prefixes
        self._owner: dict[Network, int] = {}        # prefix -> slot
        self.record: dict | None = None             # tc_record() while attached
        self.bpf, self._prog = self._load(read_route)
        try:
            self._steer = self.bpf.load_func(b"wg_tun_steer", self.bpf.SOCKET_FILTER)
            self._config = m.Config(flags=0, fib_flags=m.fib_flags(), queues=queues)
            self._peers4 = self.bpf[m.MAP_PEERS4.encode()]
            self._peers6 = self.bpf[m.MAP_PEERS6.encode()]
            self.set_mode(mode)
            self.set_queue_count(queues)
        except BaseException:
            self.bpf.cleanup()
            raise

    # -- programs ------------------------------------------------------------

    def _load(self, read_route: bool):
        """Compile and load, with the route read when asked and possible.

        Sets route_mode ("route" or "lookup", ROUTE_MODES) and
        route_mode_reason (why "lookup"; None in route mode). Without the
        kernel's BTF offsets, or when the kernel refuses the program (lockdown
        removes bpf_probe_read_kernel), the classifier is built without the
        route read and looks up every packet, as before."""
        self.route_mode, self.route_mode_reason = "lookup", "not asked (read_route=False)"
        if read_route:
            try:
                cflags = btf.route_cflags()
            except btf.BtfError as e:
                self.route_mode_reason = f"no route offsets from the kernel's BTF: {e}"
            else:
                bpf = m.compile_programs(*PROGRAMS, cflags=cflags)
                try:
                    prog = bpf.load_func(b"wg_nexthop", bpf.SCHED_CLS)
                except Exception as e:     # bcc raises a bare Exception
                    bpf.cleanup()
                    self.route_mode_reason = f"the kernel refused the route read: {e}"
                else:
                    self.route_mode, self.route_mode_reason = "route", None
                    return bpf, prog
            log.warning("%s: classifier looks up every packet's route: %s",
                        self.ifname, self.route_mode_reason)
        bpf = m.compile_programs(*PROGRAMS)
        try:
            return bpf, bpf.load_func(b"wg_nexthop", bpf.SCHED_CLS)
        except BaseException:
            bpf.cleanup()
            raise

    @property
    def steering_fd(self) -> int:
        """fd of tun_steer.c's program, compiled with the classifier."""
        return self._steer.fd

    def close(self) -> None:
        """Detach and release the programs and maps."""
        try:
            self.detach()
        finally:
            self.bpf.cleanup()

    def __enter__(self) -> "NextHopClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- configuration -----------------------------------------------------

    def set_mode(self, mode: str) -> None:
        """'nexthop' (the route's next hop picks the peer) or 'allowedips'."""
        if mode not in MODES:
            raise ValueError(f"peer selection must be one of {sorted(MODES)}, not {mode!r}")
        self._config.flags = (self._config.flags & ~m.CFG_ALLOWEDIPS) | MODES[mode]
        self.mode = mode
        self._write_config()

    def set_spread(self, spread: bool) -> None:
        """Whether a peer's flows spread over the workers by flow hash
        (PeerSpread) or all go to the peer's own worker, 1 + (slot - 1) % W."""
        flag = m.CFG_SPREAD_FLOWS if spread else 0
        self._config.flags = (self._config.flags & ~m.CFG_SPREAD_FLOWS) | flag
        self._write_config()

    def set_queue_count(self, queues: int) -> None:
        """The TAP's queue count now (1 + workers); the classifier spreads
        peers (or flows) over queues 1..queues-1 from its next packet on."""
        if not 1 <= queues <= m.QUEUES_MAX:
            raise ValueError(f"queues must be 1..{m.QUEUES_MAX}, not {queues}")
        self._config.queues = queues
        self._write_config()

    def update_config(self, **fields: int) -> None:
        """Set wg_config fields by name (Config) and write the entry.

        For the other programs of this object (policy.py sets policy,
        mark_mask, mark_shift): the entry is one struct, written whole from
        this one copy, so every writer goes through here.
        """
        for name, value in fields.items():
            if name not in dict(m.Config._fields_):
                raise AttributeError(f"wg_config has no field {name!r}")
            setattr(self._config, name, value)
        self._write_config()

    def _write_config(self) -> None:
        self.bpf[m.MAP_CONFIG.encode()][ctypes.c_uint32(0)] = self._config

    def set_peer(self, slot: int, networks: Iterable[str | Network]) -> None:
        """Make `networks` the allowed-ips of peer `slot` (replacing its old set).

        A prefix another peer had moves to this one, as with WireGuard's
        allowed-ips (one owner per prefix). Host bits are masked off.
        """
        _check_slot(slot)
        new = {ipaddress.ip_network(n, strict=False) for n in networks}
        old = self._owned.get(slot, set())
        for net in new:
            prev = self._owner.get(net)
            if prev is not None and prev != slot:
                self._owned[prev].discard(net)
            self._trie(net)[_lpm_key(net)] = ctypes.c_uint32(slot)
            self._owner[net] = slot
        for net in old - new:
            self._delete(net)
        self._owned[slot] = new

    def remove_peer(self, slot: int) -> None:
        """Forget peer `slot`'s allowed-ips; its packets then go to queue 0, untagged."""
        for net in self._owned.pop(slot, set()):
            self._delete(net)

    def peers(self) -> dict[int, set[Network]]:
        """slot -> allowed-ips, as set here."""
        return {slot: set(nets) for slot, nets in self._owned.items() if nets}

    def _delete(self, net: Network) -> None:
        self._owner.pop(net, None)
        try:
            del self._trie(net)[_lpm_key(net)]
        except KeyError:
            pass

    def _trie(self, net: Network):
        return self._peers4 if net.version == 4 else self._peers6

    # -- counters ----------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Packets per verdict reason and event (bpfmaps.COUNTER_NAMES), all CPUs
        summed; the route read's counters are in route_counters()."""
        table = self.bpf[m.MAP_COUNTERS.encode()]
        return {name: int(sum(table[ctypes.c_uint32(index)]))
                for index, name in m.COUNTER_NAMES.items() if index < m.CNT_ROUTE_DST}

    def route_counters(self) -> dict[str, object]:
        """Where next hops came from: {"mode": route_mode, "mode_reason":
        route_mode_reason, "dst": packets whose
        next hop was read from their route, "fallbacks": {reason: packets
        looked up instead}} (every reason of bpfmaps.FALLBACK_REASONS, 0 in
        lookup mode), all CPUs summed."""
        table = self.bpf[m.MAP_COUNTERS.encode()]

        def total(index: int) -> int:
            return int(sum(table[ctypes.c_uint32(index)]))
        return {"mode": self.route_mode,
                "mode_reason": self.route_mode_reason,
                "dst": total(m.CNT_ROUTE_DST),
                "fallbacks": {reason: total(index)
                              for reason, index in m.FALLBACK_REASONS.items()}}

    def nexthop_counters(self) -> dict[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                       NexthopStats]:
        """Packets and bytes per next hop (nexthop mode), all CPUs summed."""
        out = {}
        for key, per_cpu in self.bpf[m.MAP_NEXTHOPS.encode()].items():
            addr = bytes(key.addr[:4] if key.family == socket.AF_INET else key.addr)
            out[ipaddress.ip_address(addr)] = NexthopStats(
                sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        return out


def _resolve(ifname_or_index: str | int) -> tuple[int, str]:
    """(ifindex, ifname) in the calling thread's network namespace."""
    try:
        if isinstance(ifname_or_index, int):
            return ifname_or_index, socket.if_indextoname(ifname_or_index)
        return socket.if_nametoindex(ifname_or_index), ifname_or_index
    except OSError as e:
        raise OSError(errno.ENODEV, f"no network device {ifname_or_index!r}") from e


def _check_slot(slot: int) -> None:
    if not m.SLOT_MIN <= slot <= m.SLOT_MAX:
        raise ValueError(f"peer slot must be {m.SLOT_MIN}..{m.SLOT_MAX} "
                         f"(0 is the tag of no peer), not {slot}")


def _lpm_key(net: Network) -> ctypes.Structure:
    key = m.LpmKey4() if net.version == 4 else m.LpmKey6()
    key.prefixlen = net.prefixlen
    ctypes.memmove(key.addr, net.network_address.packed, len(key.addr))
    return key


