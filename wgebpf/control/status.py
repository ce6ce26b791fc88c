"""`wgebpf status`: what wg(8) cannot show — per-worker load, drops by
reason, eBPF counters, traffic per next hop — as JSON over the UAPI socket
(operation `wgebpf-status=1`). Keys are public keys only, never private.
"""

import base64
import ipaddress
import json
import os
import socket

from . import resources


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def collect(device, parts=None) -> dict:
    """`parts` holds the kernel-side pieces when attached (attach.Attachment:
    .pool, .classifier, .xdp); None for a bare device."""
    pool = getattr(parts, "pool", None)
    classifier = getattr(parts, "classifier", None)
    xdp = getattr(parts, "xdp", None)
    now = device.clock.monotonic()
    peers = {}
    for key, peer in device.peers.items():
        stats = peer.stats
        peers[_b64(key)] = {
            "slot": peer.queue,
            "endpoint": f"{peer.endpoint[0]}:{peer.endpoint[1]}" if peer.endpoint else None,
            "rx_bytes": peer.rx_bytes, "tx_bytes": peer.tx_bytes,
            "rx_packets": stats.rx_packets, "tx_packets": stats.tx_packets,
            "handshakes_completed": stats.handshakes_completed,
            "handshakes_failed": stats.handshakes_failed,
            "handshakes_sent": stats.handshakes_sent,
            "last_handshake_time": peer.last_handshake_time,
            "keypair_age_seconds": (now - peer.keypair_installed_at
                                    if peer.keypair_installed_at is not None else None),
            "source_policy": peer.source_policy or device.source_policy,
            "allowed_ips": [str(n) for n in device.allowed_ips_of(peer)],
            "drops": dict(peer.drops),
        }
    status = {
        "interface": device.name,
        "peer_selection": getattr(device, "peer_selection", "allowedips"),
        # PeerSpread: one peer's traffic over every worker (pool.py)
        "peer_spread": bool(getattr(pool, "peer_spread", False)),
        "source_policy": device.source_policy,
        "listen_port": device.listen_port,
        "peers": peers,
        "drops": {**dict(device.drops), **tun_queue_drops(device.name)},
        "handshake_duration_seconds": device.handshake_durations.snapshot(),
        "workers": pool.status() if pool is not None else [],
        "resources": resource_counts(device, parts),
    }
    for worker in status["workers"]:
        worker.update(process_usage(worker.get("pid")))
    add_policy_counters(status, device, getattr(parts, "policy", None),
                        getattr(parts, "nft", None))
    if xdp is not None:
        status["xdp_mode"] = xdp.mode
        status["xdp"] = xdp.counters()
    if classifier is not None:
        status["classifier"] = classifier.counters()
        # mode ("route": the next hop read from the packet's route; "lookup":
        # a FIB lookup per packet), and the fallbacks to the lookup by reason
        status["classifier_route"] = classifier.route_counters()
        status["nexthops"] = {str(ip): {"packets": p, "bytes": b,
                                        "public_key": _holder(device, ip)}
                              for ip, (p, b) in classifier.nexthop_counters().items()}
    return status


# The ingress program's verdicts that are drops; each is a "source_policy"
# drop of its peer (fib_failed: no route back to the source; not_ip: junk).
POLICY_DROPS = ("dropped_allowedips", "dropped_fib", "fib_failed", "not_ip", "dropped_peer_mark")


def add_policy_counters(status: dict, device, policy, nft) -> None:
    """status["policy"]: every peer's slot with every verdict (zeros too, so
    dashboards always have a series); and the kernel's source-policy drops
    (tc ingress and nftables) added to the per-peer and interface drops."""
    if policy is None:
        return
    from ..kernel.bpfmaps import POLICY_COUNTER_NAMES
    counts = policy.counters()
    nft_drops = nft.drops() if nft is not None else {}
    by_slot = {}
    for peer in device.peers.values():
        verdicts = {name: counts.get(peer.queue, {}).get(name, 0)
                    for name in POLICY_COUNTER_NAMES.values()}
        verdicts["dropped_nftables"] = nft_drops.get(peer.queue, 0)
        by_slot[str(peer.queue)] = verdicts
        dropped = sum(verdicts[name] for name in POLICY_DROPS) + verdicts["dropped_nftables"]
        if dropped:
            entry = status["peers"][_b64(peer.public_key)]["drops"]
            entry["source_policy"] = entry.get("source_policy", 0) + dropped
            status["drops"]["source_policy"] = status["drops"].get("source_policy", 0) + dropped
    status["policy"] = by_slot


def _holder(device, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The public key of the peer whose AllowedIPs hold a next hop now."""
    peer = device.allowed_ips.lookup(address)
    return _b64(peer.public_key) if peer is not None else None


# -- resources: what must return to its starting value when peers come and
# -- go (tests/test_churn.py, scripts/soak.py look for leaks with these) -------


def resource_counts(device, parts=None) -> dict:
    """Counts of everything that grows with sessions and peers: the
    control plane's process (fds, RSS), its session-index table, the entries
    of each eBPF map that is keyed by peer or session, and the TUN queues."""
    return {
        "control_plane": {"pid": os.getpid(), **process_usage(os.getpid())},
        "indices": index_counts(device),
        "maps": map_entry_counts(parts),
        "tun_queues": len(parts.tun.fds) if getattr(parts, "tun", None) else None,
    }


def index_counts(device) -> dict:
    """The control plane's receiver-index table by what holds each index.
    "orphaned": indices whose peer is no longer configured, which nothing
    will ever release (a leak by definition)."""
    counts = {"total": len(device.indices), "handshake": 0, "keypair": 0, "orphaned": 0}
    live = {id(peer) for peer in device.peers.values()}
    for peer, holder in device.indices.values():
        counts["handshake" if holder is peer.handshake else "keypair"] += 1
        if id(peer) not in live:
            counts["orphaned"] += 1
    return counts


def map_entry_counts(parts) -> dict:
    """Entries in the maps keyed by peer prefix or receiver index (the
    array maps have a fixed size and cannot leak). None for a map whose
    loader is not running (e.g. --xdp off)."""
    from ..kernel.bpfmaps import MAP_PEERS4, MAP_PEERS6, MAP_RXINDEX
    from ..kernel.xdp_guard import MAP_INDEX
    sources = {MAP_PEERS4: getattr(parts, "classifier", None),
               MAP_PEERS6: getattr(parts, "classifier", None),
               MAP_RXINDEX: getattr(parts, "reuseport", None),
               MAP_INDEX: getattr(parts, "xdp", None)}
    return {name: _entries(loader, name) for name, loader in sources.items()}


def _entries(loader, name: str) -> int | None:
    if loader is None or getattr(loader, "bpf", None) is None:
        return None
    # Walks the keys with BPF_MAP_GET_NEXT_KEY: O(entries), a few ms for
    # thousands, and read-only.
    return sum(1 for _ in loader.bpf[name.encode()].keys())


def process_usage(pid: int | None) -> dict:
    """{"fds": open file descriptors, "rss_bytes": resident set} of a
    process, from /proc; {} when it is gone (a worker being restarted)."""
    usage = resources.process_usage(pid) if pid is not None else None
    return {"fds": usage.fds, "rss_bytes": usage.rss_bytes} if usage else {}


def tun_queue_drops(name: str) -> dict:
    """{"queue_full": n}: what the kernel dropped on the way into the TUN
    queues (a worker fell behind), from the interface's tx_dropped. Read
    only if /sys shows our own namespace's interface; {} otherwise."""
    base = f"/sys/class/net/{name}"
    try:
        with open(f"{base}/ifindex") as f:
            if int(f.read()) != socket.if_nametoindex(name):
                return {}
        with open(f"{base}/statistics/tx_dropped") as f:
            return {"queue_full": int(f.read())}
    except (OSError, ValueError):
        return {}


def snapshot(device, parts=None) -> dict:
    """Fresh numbers: the workers are asked for theirs first. Call with
    the device lock held."""
    pool = getattr(parts, "pool", None)
    if pool is not None:
        pool.refresh()
    return collect(device, parts)


def handler(device, parts=None):
    def wgebpf_status(body: list[str]):
        return json.dumps(snapshot(device, parts), sort_keys=True), 0
    return wgebpf_status
