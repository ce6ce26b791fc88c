"""`wgebpf status`: what wg(8) cannot show — per-worker load, drops by
reason, eBPF counters, traffic per next hop — as JSON over the UAPI socket
(operation `wgebpf-status=1`). Keys are public keys only, never private.
"""

import base64
import ipaddress
import json
import socket


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def collect(device, parts=None) -> dict:
    """`parts` holds the kernel-side pieces when attached (attach.Attachment:
    .pool, .classifier, .xdp); None for a bare device."""
    pool = getattr(parts, "pool", None)
    classifier = getattr(parts, "classifier", None)
    xdp = getattr(parts, "xdp", None)
    worker_of = pool.worker_of if pool is not None else {}
    now = device.clock.monotonic()
    peers = {}
    for key, peer in device.peers.items():
        stats = peer.stats
        peers[_b64(key)] = {
            "slot": peer.queue,
            "worker": worker_of[peer.queue].position if peer.queue in worker_of else None,
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
        "source_policy": device.source_policy,
        "listen_port": device.listen_port,
        "peers": peers,
        "drops": {**dict(device.drops), **tun_queue_drops(device.name)},
        "handshake_duration_seconds": device.handshake_durations.snapshot(),
        "workers": pool.status() if pool is not None else [],
    }
    add_policy_counters(status, device, getattr(parts, "policy", None),
                        getattr(parts, "nft", None))
    if xdp is not None:
        status["xdp_mode"] = xdp.mode
        status["xdp"] = xdp.counters()
    if classifier is not None:
        status["classifier"] = classifier.counters()
        status["nexthops"] = {str(ip): {"packets": p, "bytes": b,
                                        "public_key": _holder(device, ip)}
                              for ip, (p, b) in classifier.nexthop_counters().items()}
    return status


# The ingress program's verdicts that are drops; each is a "source_policy"
# drop of its peer (fib_failed: no route back to the source; not_ip: junk).
POLICY_DROPS = ("dropped_allowedips", "dropped_fib", "fib_failed", "not_ip")


def add_policy_counters(status: dict, device, policy, nft) -> None:
    """status["policy"]: every peer's slot with every verdict (zeros too, so
    dashboards always have a series); and the kernel's source-policy drops
    (tc ingress and nftables) added to the per-peer and interface drops."""
    if policy is None:
        return
    from .bpfmaps import POLICY_COUNTER_NAMES
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
