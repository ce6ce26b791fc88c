"""`wgebpf show`: the `wg show` layout, read over the UAPI socket.

Keys are hidden the way wg(8) hides them; the private key never reaches the
terminal even though the UAPI carries it.
"""

import base64
import glob
import os
import socket
import time

from .uapi import SOCKET_DIR, socket_path


class ShowError(Exception):
    pass


def interfaces(directory: str = SOCKET_DIR) -> list[str]:
    names = [os.path.basename(p)[:-5] for p in glob.glob(os.path.join(directory, "*.sock"))]
    return sorted(names)


def uapi_request(name: str, request: str, directory: str = SOCKET_DIR, timeout: float = 5.0) -> list[str]:
    path = socket_path(name, directory)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(request.encode())
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise ShowError(f"cannot reach {name} at {path}: {exc.strerror or exc}") from exc
    return data.decode().splitlines()


def query(name: str, directory: str = SOCKET_DIR) -> dict:
    """get=1, parsed into {'interface': {...}, 'peers': [{...}, ...]}."""
    device: dict = {"peers": []}
    current = device
    for line in uapi_request(name, "get=1\n\n", directory):
        if not line:
            continue
        key, _, value = line.partition("=")
        if key == "public_key":
            current = {"public_key": value, "allowed_ips": []}
            device["peers"].append(current)
        elif key == "allowed_ip":
            current["allowed_ips"].append(value)
        elif key == "errno":
            if value not in ("0", ""):
                raise ShowError(f"{name}: UAPI error {value}")
        else:
            current[key] = value
    return device


def status(name: str, directory: str = SOCKET_DIR) -> dict:
    """wgebpf's own status (workers, drops, eBPF counters) as a dict."""
    import json
    lines = uapi_request(name, "wgebpf-status=1\n\n", directory)
    if not lines or not lines[0].startswith("{"):
        raise ShowError(f"{name}: no wgebpf status (is it a wgebpf interface?)")
    return json.loads(lines[0])


def _b64(hex_key: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_key)).decode()


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def ago(seconds: int) -> str:
    parts = []
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60),
                       ("second", 1)):
        if seconds >= size or (unit == "second" and not parts):
            parts.append(_plural(seconds // size, unit))
            seconds %= size
    return ", ".join(parts) + " ago"


def human_bytes(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return _plural(n, "B").replace("Bs", "B")


def render(name: str, device: dict, now: float | None = None, extra: dict | None = None) -> str:
    """The `wg show` layout; `extra` (wgebpf's status) adds wgebpf's own
    lines: peer selection, source policy and XDP mode per interface, the
    policy and drops by reason per peer."""
    now = time.time() if now is None else now
    extra = extra or {}
    extra_peers = extra.get("peers", {})
    out = [f"interface: {name}"]
    if device.get("private_key"):
        private = bytes.fromhex(device["private_key"])
        from ..wireguard.keys import public_key
        out.append(f"  public key: {base64.b64encode(public_key(private)).decode()}")
        out.append("  private key: (hidden)")
    out.append(f"  listening port: {device.get('listen_port', '0')}")
    if device.get("fwmark", "0") not in ("0", ""):
        out.append(f"  fwmark: {int(device['fwmark']):#x}")
    if extra:
        out.append(f"  peer selection: {extra.get('peer_selection')}")
        out.append(f"  peer spread: {'on' if extra.get('peer_spread') else 'off'}")
        out.append(f"  source policy: {extra.get('source_policy')}")
        out.append(f"  xdp guard: {extra.get('xdp_mode', 'off')}")
        out += _classifier_line(extra.get("classifier_route"))
        out += _drops_line(extra.get("drops", {}))
    peers = sorted(device["peers"], key=lambda p: -int(p.get("last_handshake_time_sec", 0)))
    for peer in peers:
        out.append("")
        out.append(f"peer: {_b64(peer['public_key'])}")
        if peer.get("preshared_key", "0" * 64).strip("0"):
            out.append("  preshared key: (hidden)")
        if peer.get("endpoint"):
            out.append(f"  endpoint: {peer['endpoint']}")
        out.append(f"  allowed ips: {', '.join(peer['allowed_ips']) or '(none)'}")
        last = int(peer.get("last_handshake_time_sec", 0))
        if last:
            out.append(f"  latest handshake: {ago(max(0, int(now) - last))}")
        rx, tx = int(peer.get("rx_bytes", 0)), int(peer.get("tx_bytes", 0))
        if rx or tx:
            out.append(f"  transfer: {human_bytes(rx)} received, {human_bytes(tx)} sent")
        keepalive = int(peer.get("persistent_keepalive_interval", 0))
        if keepalive:
            out.append(f"  persistent keepalive: every {_plural(keepalive, 'second')}")
        mine = extra_peers.get(_b64(peer["public_key"]))
        if mine:
            out.append(f"  source policy: {mine.get('source_policy')}")
            out += _drops_line(mine.get("drops", {}))
    return "\n".join(out) + "\n"


def _classifier_line(route: dict | None) -> list[str]:
    """How the classifier finds next hops, and its fallbacks to the lookup."""
    if not route:
        return []
    what = {"route": "route (next hop read from the kernel's route)",
            "lookup": "lookup (FIB lookup per packet)"}.get(route.get("mode"), route.get("mode"))
    line = f"  classifier: {what}"
    if route.get("mode_reason"):
        line += f": {route['mode_reason']}"
    fallbacks = sorted((reason, n) for reason, n in (route.get("fallbacks") or {}).items() if n)
    if fallbacks:
        line += "; fallbacks: " + ", ".join(f"{n} {reason}" for reason, n in fallbacks)
    return [line]


def _drops_line(drops: dict) -> list[str]:
    counted = sorted((reason, n) for reason, n in drops.items() if n)
    if not counted:
        return []
    return ["  dropped: " + ", ".join(f"{n} {reason}" for reason, n in counted)]
