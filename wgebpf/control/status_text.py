"""`wgebpf status NAME` for people: the status dict (wgebpf/control/status.py,
what `--json` prints) laid out like `wg show`, in aligned columns.

A pure function of the dict: no I/O. Public keys are shortened; nothing
else of a key is printed, and a private key never (the dict has none, and
only the fields named here are read).
"""

from __future__ import annotations

from .show import human_bytes

SHORT_KEY = 10          # base64 characters of a public key shown


def short_key(key: str | None) -> str:
    if not key:
        return "-"
    return key[:SHORT_KEY] + "..." if len(key) > SHORT_KEY else key


def table(headers: list[str], rows: list[list], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [_numeric([row[i] for row in rows]) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out = []
    for row in [headers] + cells:
        parts = [(c.rjust(w) if num else c.ljust(w))
                 for c, w, num in zip(row, widths, numeric)]
        out.append((indent + "  ".join(parts)).rstrip())
    return out


def _numeric(column: list) -> bool:
    """A column of numbers (None shown as "-" among them) is right-aligned."""
    present = [v for v in column if v is not None]
    return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in present)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _drops(drops: dict | None) -> str:
    counted = sorted((reason, n) for reason, n in (drops or {}).items() if n)
    return ", ".join(f"{n} {reason}" for reason, n in counted) or "-"


def _bytes(n) -> str:
    return "-" if n is None else human_bytes(int(n))


def _pairs(items: dict, what: str = "reason", indent: str = "  ") -> list[str]:
    """`name  value` lines, values right-aligned, sorted by name."""
    if not items:
        return [f"{indent}(none)"]
    return table([what, "count"], [[k, v] for k, v in sorted(items.items())], indent)


def render_text(status: dict) -> str:
    """The readable layout of one interface's status."""
    out: list[str] = []
    peers = status.get("peers") or {}
    out += _interface(status)
    out += ["", "workers:"] + _workers(status.get("workers"))
    out += ["", "peers:"] + _peers(peers)
    out += ["", "drops by reason:"] + _pairs(status.get("drops") or {})
    out += ["", "next-hop traffic:"] + _nexthops(status.get("nexthops"))
    out += ["", "source policy counters:"] + _policy(status.get("policy"), peers)
    out += ["", "xdp guard:"] + _xdp(status)
    out += ["", "resources:"] + _resources(status.get("resources"))
    return "\n".join(out) + "\n"


def _interface(status: dict) -> list[str]:
    out = [f"interface: {status.get('interface', '?')}"]
    out.append(f"  listening port: {_cell(status.get('listen_port'))}")
    out.append(f"  peer selection: {_cell(status.get('peer_selection'))}")
    out.append(f"  peer spread: {'on' if status.get('peer_spread') else 'off'}")
    out.append(f"  source policy: {_cell(status.get('source_policy'))}")
    route = status.get("classifier_route")
    if route:
        line = f"  classifier: {_cell(route.get('mode'))}"
        if route.get("mode_reason"):
            line += f" ({route['mode_reason']})"
        fallbacks = _drops(route.get("fallbacks"))
        if fallbacks != "-":
            line += f"; fallbacks: {fallbacks}"
        out.append(line)
    else:
        out.append("  classifier: not loaded")
    if status.get("classifier"):
        out.append("  classified: " + ", ".join(
            f"{n} {verdict}" for verdict, n in sorted(status["classifier"].items())))
    hist = status.get("handshake_duration_seconds") or {}
    if hist.get("count"):
        mean_ms = 1000 * hist.get("sum", 0) / hist["count"]
        out.append(f"  handshakes: {hist['count']} timed, mean {mean_ms:.1f} ms")
    return out


def _workers(workers: list | None) -> list[str]:
    if not workers:
        return ["  (none: not attached)"]
    rows = [[w.get("worker"), w.get("pid"), w.get("alive"), w.get("restarts"),
             w.get("busy_seconds"), w.get("queue_depth"),
             w.get("peers"),
             _bytes(w.get("rx_bytes")), _bytes(w.get("tx_bytes")),
             w.get("fds"), _bytes(w.get("rss_bytes"))] for w in workers]
    return table(["worker", "pid", "alive", "restarts", "busy s", "queue", "peers",
                  "rx", "tx", "fds", "rss"], rows)


def _peers(peers: dict) -> list[str]:
    if not peers:
        return ["  (none)"]
    rows = []
    for key, p in sorted(peers.items(), key=lambda kv: (kv[1].get("slot") is None,
                                                        kv[1].get("slot") or 0, kv[0])):
        rows.append([short_key(key), p.get("slot"), p.get("endpoint") or "(none)",
                     _bytes(p.get("rx_bytes")), _bytes(p.get("tx_bytes")),
                     f"{p.get('handshakes_completed', 0)}/{p.get('handshakes_failed', 0)}",
                     p.get("source_policy"), _drops(p.get("drops"))])
    return table(["peer", "slot", "endpoint", "rx", "tx", "hs ok/failed",
                  "policy", "drops"], rows)


def _holder_of_slot(peers: dict) -> dict[str, str]:
    return {str(p.get("slot")): key for key, p in peers.items()}


def _nexthops(nexthops: dict | None) -> list[str]:
    if nexthops is None:
        return ["  (classifier not loaded)"]
    if not nexthops:
        return ["  (none)"]
    rows = [[hop, short_key(v.get("public_key")) if v.get("public_key") else "(no peer)",
             v.get("packets", 0), _bytes(v.get("bytes", 0))]
            for hop, v in sorted(nexthops.items(),
                                 key=lambda kv: (-(kv[1].get("packets") or 0), kv[0]))]
    return table(["next hop", "peer", "packets", "bytes"], rows)


def _policy(policy: dict | None, peers: dict) -> list[str]:
    if policy is None:
        return ["  (not loaded)"]
    if not policy:
        return ["  (none)"]
    names = sorted({name for counts in policy.values() for name in counts})
    holder = _holder_of_slot(peers)
    rows = [[int(slot) if str(slot).isdigit() else slot, short_key(holder.get(str(slot)))]
            + [counts.get(name, 0) for name in names]
            for slot, counts in sorted(policy.items(), key=lambda kv: (len(str(kv[0])), str(kv[0])))]
    return table(["slot", "peer"] + names, rows)


def _xdp(status: dict) -> list[str]:
    counters = status.get("xdp")
    if counters is None:
        return [f"  mode: {status.get('xdp_mode', 'off')}"]
    out = [f"  mode: {status.get('xdp_mode', '?')}"]
    return out + _pairs(counters, "verdict")


def _resources(res: dict | None) -> list[str]:
    if not res:
        return ["  (none)"]
    out = []
    cp = res.get("control_plane") or {}
    out.append(f"  control plane: pid {_cell(cp.get('pid'))}, {_cell(cp.get('fds'))} fds, "
               f"rss {_bytes(cp.get('rss_bytes'))}")
    idx = res.get("indices") or {}
    if idx:
        out.append("  session indices: " + ", ".join(f"{n} {k}" for k, n in idx.items()))
    out.append(f"  tun queues: {_cell(res.get('tun_queues'))}")
    maps = res.get("maps") or {}
    if maps:
        out.append("  map entries:")
        out += table(["map", "entries"], [[k, v] for k, v in sorted(maps.items())], "    ")
    return out
