"""The source policy's names and the peer-mark rules.

Which inner source addresses a peer may send from is a policy in wgebpf
(README, Source policy). The device keeps each peer's choice; the config
parser, `wgebpf set` and the kernel loaders (kernel/policy.py,
kernel/nftables.py) check and apply it, so the shared facts live here, at
the bottom layer.
"""

SOURCE_POLICIES = ("allowedips", "fib", "nftables", "off")

# Where the nftables policy puts the peer's slot in the mark: the top 16
# bits, far from the low bits fwmark-based setups usually take, and wide
# enough for every slot (1..65535). A narrower PeerMark (at least 8 bits)
# is allowed; a peer whose slot it cannot hold is refused the nftables
# policy (kernel/policy.py says which).
PEER_MARK_DEFAULT = 0xFFFF0000
PEER_MARK_MIN_BITS = 8


def peer_mark_error(mask: int) -> str | None:
    """Why `mask` cannot hold a peer slot (as PeerMark), or None if it can."""
    if not 0 < mask <= 0xFFFFFFFF:
        return "must be a nonzero 32-bit mask"
    low = mask // (mask & -mask)            # the run shifted down to bit 0
    if low & (low + 1):
        return "is not one contiguous run of bits"
    if low.bit_length() < PEER_MARK_MIN_BITS:
        return (f"has {low.bit_length()} bits; a peer slot needs at least "
                f"{PEER_MARK_MIN_BITS}")
    return None


def peer_mark_conflict(mask: int, fwmark: int) -> str | None:
    """Why PeerMark `mask` and FwMark cannot go together under the nftables
    policy, or None: a peer's packets would carry FwMark's bits, and
    routing rules on FwMark would take them for the tunnel's own."""
    shared = mask & fwmark
    if not shared:
        return None
    return (f"PeerMark {mask:#x} shares bits {shared:#x} with FwMark {fwmark:#x}: with the "
            f"nftables source policy a peer's packets would carry FwMark's bits and routing "
            f"rules on FwMark would take them for the tunnel's own")


def nftables_mark_conflict(device, new_policies=()) -> str | None:
    """PeerMark and FwMark may share no bits once any peer's policy is
    nftables (peer_mark_conflict says why)."""
    policies = {device.source_policy, *new_policies,
                *(peer.source_policy for peer in device.peers.values())}
    if "nftables" not in policies:
        return None
    return peer_mark_conflict(getattr(device, "peer_mark", PEER_MARK_DEFAULT), device.fwmark)
