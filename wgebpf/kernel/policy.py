"""The source-address check as policy: loader for bpf/policy.c (tc ingress).

Classic WireGuard drops a decrypted packet whose inner source is not in the
sending peer's allowed-ips. Here that check is one of four policies, chosen
per interface with a per-peer override, and enforced in the kernel by an
eBPF program on the wgebpf device's clsact ingress hook. It knows the exact
peer because the worker writes each decrypted packet behind an Ethernet
header whose source MAC is the peer's tag (bpfmaps.tag): any worker, any
queue.

  allowedips  classic: the source's longest allowed-ips match is the peer.
  fib         reverse-path check: the FIB's route back to the source goes
              via the peer (its next hop is in the peer's allowed-ips).
  nftables    eBPF only marks the packet with the peer's slot (mark bits
              under the PeerMark mask); nftables.py's table filters. A slot
              the mask cannot hold is refused here and dropped by the
              program (dropped_peer_mark).
  off         every source accepted (the firewall alone decides).

The program comes from the classifier's bcc object (one compile; it shares
the allowed-ips tries and wg_config), so SourcePolicy needs the classifier
and lives no longer than it. Python never looks at a packet: this module
writes the policy map and config fields and reads the counters.
"""

from __future__ import annotations

import ctypes


from . import bpfmaps as m
from ..wireguard.sourcepolicy import PEER_MARK_DEFAULT, peer_mark_error
from . import tc
from .nexthop import NextHopClassifier, _check_slot
from .tc import TC_PARENT_INGRESS

POLICIES = ("allowedips", "fib", "nftables", "off")
_CODE = {"allowedips": m.POLICY_ALLOWEDIPS, "fib": m.POLICY_FIB,
         "nftables": m.POLICY_NFTABLES, "off": m.POLICY_OFF}

# clsact ingress; prio and handle differ from the classifier's egress filter
# (1, 1) so the two runtime-state records can never be mistaken for each other.
TC_PRIO = 2
TC_HANDLE = 2


def mark_shift(mask: int) -> int:
    """Position of the mask's lowest set bit: where the slot's bit 0 goes."""
    return (mask & -mask).bit_length() - 1


def peer_mark(slot: int, mask: int = PEER_MARK_DEFAULT) -> int:
    """The mark bits (under `mask`) policy.c puts on peer `slot`'s packets."""
    return (slot << mark_shift(mask)) & mask


def mark_slot_max(mask: int) -> int:
    """The highest slot `mask` can hold (8 bits: 255, 16 bits: 65535)."""
    return mask >> mark_shift(mask)


def mark_slot_error(slot: int, mask: int) -> str | None:
    """Why peer `slot` cannot be marked under `mask` (nftables policy), or None."""
    if slot <= mark_slot_max(mask):
        return None
    return (f"peer slot {slot} does not fit PeerMark {mask:#x}, which holds slots up to "
            f"{mark_slot_max(mask)}: nftables could not tell the peer (a mask of "
            f"{m.SLOT_MAX.bit_length()} bits holds every slot, e.g. 0xffff0000)")


class SourcePolicy(m.LoadedProgram, tc.FilterOwner):
    """The ingress source check of one device, on the classifier's object.

    `default` is the interface's policy; set_peer() overrides it per slot.
    `mark_mask` (config PeerMark) is where the nftables policy writes the
    slot; it is fixed for the object's life (nftables rules match on it).
    Attach after the classifier: then the clsact qdisc is the classifier's
    (its record says so) and ours is only the filter.
    """

    FILTER_NAME, FILTER_PARENT = "wg_policy", TC_PARENT_INGRESS
    FILTER_PRIO, FILTER_HANDLE = TC_PRIO, TC_HANDLE

    def __init__(self, classifier: NextHopClassifier, default: str = "allowedips",
                 mark_mask: int = PEER_MARK_DEFAULT):
        problem = peer_mark_error(mark_mask)
        if problem:
            raise ValueError(f"peer mark {mark_mask:#x}: {problem}")
        self.classifier = classifier
        self.ifindex, self.ifname = classifier.ifindex, classifier.ifname
        self.bpf = classifier.bpf
        self.mark_mask = mark_mask
        self.record: dict | None = None     # tc_record() while attached
        self._overrides: dict[int, str] = {}
        self._slots: set[int] = set()       # peers set here: each has a counter row
        self._prog = self.bpf.load_func(b"wg_policy", self.bpf.SCHED_CLS)
        self._policies = self.bpf[m.MAP_POLICIES.encode()]
        self._counts = self.bpf[m.MAP_POLICY_CNT.encode()]
        self._add_row(0)                    # frames with no peer tag
        classifier.update_config(mark_mask=mark_mask, mark_shift=mark_shift(mark_mask))
        self.set_default(default)

    def close(self) -> None:
        """Detach and drop our overrides; the program and maps themselves
        belong to the classifier's object (closed with it)."""
        try:
            self.detach()
        finally:
            for slot in list(self._overrides):
                self._policies[ctypes.c_uint32(slot)] = ctypes.c_uint32(m.POLICY_DEFAULT)
            self._overrides.clear()

    def __enter__(self) -> "SourcePolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- policies --------------------------------------------------------------

    def set_default(self, policy: str) -> None:
        """The interface's policy: every peer without an override follows it.
        nftables is refused if a peer following it has a slot the mark
        cannot hold."""
        code = _code(policy)
        if policy == "nftables":
            for slot in self._slots - set(self._overrides):
                self._check_mark(slot, policy)
        self.classifier.update_config(policy=code)
        self.default = policy

    def set_peer(self, slot: int, policy: str | None) -> None:
        """Peer `slot` is configured: give it a counter row (kept if it has
        one) and override its policy; None: follow the default again."""
        _check_slot(slot)
        code = m.POLICY_DEFAULT if policy is None else _code(policy)
        self._check_mark(slot, policy or self.default)
        self._add_row(slot)
        self._policies[ctypes.c_uint32(slot)] = ctypes.c_uint32(code)
        if policy is None:
            self._overrides.pop(slot, None)
        else:
            self._overrides[slot] = policy

    def remove_peer(self, slot: int) -> None:
        """Forget slot's override and counters (the slot may be reused)."""
        _check_slot(slot)
        self._policies[ctypes.c_uint32(slot)] = ctypes.c_uint32(m.POLICY_DEFAULT)
        self._overrides.pop(slot, None)
        self._slots.discard(slot)
        try:
            del self._counts[ctypes.c_uint32(slot)]
        except KeyError:
            pass

    def _add_row(self, slot: int) -> None:
        """A zero counter row for `slot`, unless it has one (set_peer is
        called again on every policy change: keep the counts)."""
        key = ctypes.c_uint32(slot)
        try:
            self._counts[key]
        except KeyError:
            self._counts[key] = self._counts.Leaf()     # zeros, every CPU
        if slot:
            self._slots.add(slot)

    def _check_mark(self, slot: int, policy: str) -> None:
        problem = mark_slot_error(slot, self.mark_mask) if policy == "nftables" else None
        if problem:
            raise ValueError(problem)

    def policy_of(self, slot: int) -> str:
        """The policy peer `slot`'s packets get now."""
        return self._overrides.get(slot, self.default)

    def overrides(self) -> dict[int, str]:
        """slot -> policy, for the peers that do not follow the default."""
        return dict(self._overrides)

    # -- counters --------------------------------------------------------------

    def counters(self) -> dict[int, dict[str, int]]:
        """{slot: {reason: packets}} for slots that saw packets, CPUs summed.

        Reasons are bpfmaps.POLICY_COUNTER_NAMES' values; slot 0 counts
        frames with no peer tag (the control plane's own), which pass
        unchecked. Only slots with a row (set_peer) are counted.
        """
        out = {}
        # Row by row, not items_lookup_batch: that sizes its buffers for the
        # map's maximum (65,536 rows x CPUs, megabytes) on every call.
        for slot in sorted(self._slots | {0}):
            try:
                per_cpu = self._counts[ctypes.c_uint32(slot)]
            except KeyError:
                continue
            totals = [sum(cpu.n[i] for cpu in per_cpu) for i in range(m.POL_CNT_MAX)]
            if any(totals):
                out[slot] = {name: int(totals[i]) for i, name in m.POLICY_COUNTER_NAMES.items()}
        return out


def _code(policy: str) -> int:
    if policy not in _CODE:
        raise ValueError(f"source policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    return _CODE[policy]


