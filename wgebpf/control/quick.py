"""`wgebpf-go IFNAME`: wgebpf as wg-quick's userspace implementation.

Where the kernel has no WireGuard, wg-quick runs
`$WG_QUICK_USERSPACE_IMPLEMENTATION IFNAME` and then configures the
interface itself (`wg setconf`, `ip address`, `ip link set mtu ... up`,
routes, hooks). This is that program, as wireguard-go behaves:

  - it creates the TUN interface IFNAME with no key and no peers, attaches
    the eBPF parts, serves the UAPI socket (/var/run/wireguard/IFNAME.sock,
    root only) and returns (exit 0) once `wg` can configure it, running on
    in the background; `-f`/`--foreground` or WG_PROCESS_FOREGROUND=1 keep
    it in the foreground;
  - it exits and removes everything it created (TUN, tc filters, XDP,
    nftables table, state file) when IFNAME is deleted (`wg-quick down`
    runs `ip link delete`), when its UAPI socket file is removed, or on
    SIGINT/SIGTERM.

The underlay is optional: without one the sockets listen on every address
and the XDP guard goes on every interface that can carry the listen port
(up, not loopback, not a TUN or WireGuard device, with an address), found
again whenever the listen port changes; the log names them.

wgebpf's own settings cannot go into the wg-quick file (`wg setconf` refuses
unknown keys). They come from environment variables, or from a small file
beside the wg-quick one, /etc/wireguard/IFNAME.wgebpf (WGEBPF_CONFIG names
another), with the same names as in wgebpf's own config. Environment
variables win over the file:

  file key        environment variable     values
  Underlay        WGEBPF_UNDERLAY          an interface name (binds the sockets, guard there)
  PeerSelection   WGEBPF_PEER_SELECTION    nexthop | allowedips
  SourcePolicy    WGEBPF_SOURCE_POLICY     allowedips | fib | nftables | off
  PeerMark        WGEBPF_PEER_MARK         mask, e.g. 0xffff0000
  Workers         WGEBPF_WORKERS           1..255 | auto
  XDP             WGEBPF_XDP               auto | native | generic | off
  Metrics         WGEBPF_METRICS           ADDR:PORT | [v6]:PORT | :PORT
  MetricsCompat   WGEBPF_METRICS_COMPAT    true | false
  PeerSpread   WGEBPF_PEER_SPREAD    true | false

Logs: in the background stdout and stderr go to /dev/null unless LOG_LEVEL
is set (as wireguard-go) or WGEBPF_LOG_FILE names a file to append to.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time

from . import config as config_module
from .attach import Attachment, AttachError
from .config import Config, ConfigError, InterfaceConfig

log = logging.getLogger("wgebpf")

USAGE = ("Usage: wgebpf-go [-f/--foreground] INTERFACE-NAME\n"
         "wgebpf as wg-quick's userspace implementation, e.g.\n"
         "  WG_QUICK_USERSPACE_IMPLEMENTATION=wgebpf-go wg-quick up wg0\n")

CONFIG_DIR = "/etc/wireguard"
WATCH_EVERY = 0.2           # seconds between checks that the link and socket still exist
READY = b"ready\n"

# file key (lowercase) -> (environment variable, InterfaceConfig attribute or None)
SETTINGS = {
    "underlay": ("WGEBPF_UNDERLAY", None),
    "peerselection": ("WGEBPF_PEER_SELECTION", "peer_selection"),
    "sourcepolicy": ("WGEBPF_SOURCE_POLICY", "source_policy"),
    "peermark": ("WGEBPF_PEER_MARK", "peer_mark"),
    "workers": ("WGEBPF_WORKERS", "workers"),
    "xdp": ("WGEBPF_XDP", None),
    "metrics": ("WGEBPF_METRICS", "metrics"),
    "metricscompat": ("WGEBPF_METRICS_COMPAT", "metrics_compat"),
    "peerspread": ("WGEBPF_PEER_SPREAD", "peer_spread"),
}
XDP_MODES = ("auto", "native", "generic", "off")


class UsageError(Exception):
    pass


# ------------------------------------------------------------------ settings

def _settings_file(name: str, environ) -> tuple[str, bool]:
    """(path, named explicitly)."""
    given = environ.get("WGEBPF_CONFIG")
    if given:
        return given, True
    return os.path.join(CONFIG_DIR, f"{name}.wgebpf"), False


def read_settings_file(path: str) -> dict[str, tuple[str, str]]:
    """key (lowercase) -> (value, where) from a `Key = Value` file; an
    optional [wgebpf] header, '#' comments."""
    out: dict[str, tuple[str, str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(1 << 16).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line or line.lower() == "[wgebpf]":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key.lower() not in SETTINGS:
            shown = key[:24] if key.isalpha() else "(not a setting)"
            raise UsageError(f"{path}:{number}: unknown setting {shown!r} (known: "
                             f"Underlay, PeerSelection, SourcePolicy, PeerMark, Workers, XDP, "
                             f"Metrics, MetricsCompat, PeerSpread)")
        out[key.lower()] = (value.strip(), f"{path}:{number}: {key}")
    return out


def build(name: str, environ=os.environ) -> tuple[Config, str | None, str]:
    """The Config (no key, no peers: wg setconf brings those), the underlay
    (None: all addresses) and the XDP mode, from the file and the environment."""
    path, explicit = _settings_file(name, environ)
    values: dict[str, tuple[str, str]] = {}
    if explicit or os.path.exists(path):
        values.update(read_settings_file(path))
    for key, (variable, _) in SETTINGS.items():
        if environ.get(variable, "") != "":
            values[key] = (environ[variable], variable)
    iface = InterfaceConfig(private_key=None, table="off")
    known = config_module._SECTIONS["interface"][1]
    underlay, xdp = None, "auto"
    for key, (value, where) in values.items():
        attr = SETTINGS[key][1]
        if key == "underlay":
            if not value or len(value) > 15 or any(c in "/:" or c.isspace() for c in value):
                raise UsageError(f"{where}: {value[:20]!r} is not an interface name")
            underlay = value
        elif key == "xdp":
            if value.lower() not in XDP_MODES:
                raise UsageError(f"{where}: must be one of {', '.join(XDP_MODES)}")
            xdp = value.lower()
        else:
            try:
                setattr(iface, attr, known[key].parse(value))
            except config_module._Invalid as exc:
                raise UsageError(f"{where}: {exc}") from None
    problem = config_module.peer_mark_conflict(iface.peer_mark, iface.fwmark)
    if iface.source_policy == "nftables" and problem:
        raise UsageError(f"PeerMark: {problem}")
    return Config(path=f"(wg-quick: {name})", interface=iface, peers=[]), underlay, xdp


# ------------------------------------------------------------------ the XDP guard

def carrier_interfaces(own: str) -> list[str]:
    """Interfaces that can carry the listen port when listening on every
    address: up, not loopback, not a TUN/WireGuard device, with an address."""
    from pyroute2 import IPRoute
    names = []
    with IPRoute() as ipr:
        with_address = {a["index"] for a in ipr.get_addr()}
        for link_ in ipr.get_links():
            name = link_.get_attr("IFLA_IFNAME")
            info = link_.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            if (name == own or name == "lo" or kind in ("tun", "wireguard")
                    or link_["index"] not in with_address
                    or not link_["flags"] & 1):          # IFF_UP
                continue
            names.append(name)
    return sorted(names)


class _SharedAttach:
    """The one loaded guard program attached to one more interface (its
    maps, the index table and counters, are shared): XdpGuard's own
    attach()/detach() logic, run for another device."""

    def __init__(self, guard, ifname: str):
        from ..kernel.xdp_guard import XdpGuard
        self._guard = guard
        self.ifname = ifname
        self.force = guard.force
        self.requested_mode = guard.requested_mode
        self.record = self.mode = None
        self.replaced = {}
        self._attach, self._detach = XdpGuard.attach, XdpGuard.detach

    @property
    def prog_fd(self) -> int:
        return self._guard.prog_fd

    @property
    def prog_id(self) -> int:
        return self._guard.prog_id

    def attach(self) -> dict:
        return self._attach(self)

    def detach(self) -> None:
        self._detach(self)


class QuickAttachment(Attachment):
    """An Attachment without a config file: wg setconf configures it. With
    no underlay the XDP guard covers every interface that carries the port."""

    def __init__(self, config: Config, name: str, underlay: str | None, xdp_mode: str):
        super().__init__(underlay, config, name, xdp_mode)
        self.more_xdp: list[_SharedAttach] = []

    def _guard_underlay(self) -> None:
        if self.underlay is not None:
            return super()._guard_underlay()
        self._guard_carriers()

    def _guard_carriers(self) -> None:
        """One guard program, attached to every carrier it is not on yet.
        A carrier that refuses it (another program's XDP there) is skipped
        with a warning: wgebpf-go picked it, the user did not."""
        if self.xdp_mode == "off":
            return
        carriers = carrier_interfaces(self.name)
        port = self.conn.listen_port
        if not carriers and not self.more_xdp:
            log.info("%s: no interface carries UDP port %d yet: XDP guard not attached",
                     self.name, port)
            return
        if self.xdp is None:
            self._load_guard(carriers[0])
        on = {x.ifname for x in self.more_xdp}
        for ifname in carriers:
            if ifname in on:
                continue
            extra = _SharedAttach(self.xdp, ifname)
            try:
                record = extra.attach()
            except Exception as exc:        # one busy NIC must not stop the rest
                log.warning("%s: XDP guard not on %s: %s", self.name, ifname, exc)
                continue
            self.more_xdp.append(extra)
            self.state.xdp_more.append(record)
            self.state.save()
            self.xdp.mode = self.xdp.mode or extra.mode      # what status shows
        guarded = ", ".join(f"{x.ifname} ({x.mode})" for x in self.more_xdp) or "none"
        log.info("%s: XDP guard for UDP port %d on %s", self.name, port, guarded)

    def _load_guard(self, ifname: str) -> None:
        """Load the guard (attached by _SharedAttach) and wire it to the
        device as Attachment._guard_underlay does."""
        from ..kernel.xdp_guard import XdpGuard
        device = self.device
        self.xdp = xdp = XdpGuard(ifname, self.conn.listen_port, mode=self.xdp_mode,
                                  public_key=device.public_key)
        for index in list(device.indices):     # sessions made before the guard was
            xdp.add_index(index)
        device.add_index_watcher(xdp)
        device.watch_external_load(xdp.under_load)
        device.cookie_checker.on_new_secret = xdp.set_cookie_secret
        device.watch_identity(lambda: xdp.set_public_key(device.public_key))

    def _sockets_changed(self) -> None:
        super()._sockets_changed()
        if self.underlay is None:
            try:
                self._guard_carriers()
            except Exception as exc:
                log.warning("%s: re-attaching the XDP guard failed: %s", self.name, exc)

    def down(self) -> None:
        steering = self.steering
        if steering is not None:
            self.steering = _QuietSteering(steering)
        for extra in self.more_xdp:
            try:
                extra.detach()
            except Exception as exc:
                log.error("%s: removing XDP from %s failed: %s", self.name, extra.ifname, exc)
        super().down()


class _QuietSteering:
    """After `ip link delete` the TUN fd is in a bad state (EBADFD) and
    detaching the steering program from it fails: the device, and the
    program's attachment with it, are gone already; the program is freed."""

    def __init__(self, steering):
        self.steering = steering

    def close(self) -> None:
        try:
            self.steering.close()
        except OSError as exc:
            if exc.errno != errno.EBADFD:
                raise


# ------------------------------------------------------------------ watching

class Watcher(threading.Thread):
    """Stops the instance (SIGTERM to ourselves, which run() handles) when
    the link or the UAPI socket disappears, as wireguard-go does."""

    def __init__(self, name: str, socket_path: str):
        super().__init__(name=f"watch-{name}", daemon=True)
        self.ifname = name
        self.socket_path = socket_path
        self.ifindex = socket.if_nametoindex(name)
        st = os.stat(socket_path)
        self.inode = (st.st_dev, st.st_ino)
        self.reason: str | None = None
        self._done = threading.Event()

    def gone(self) -> str | None:
        try:
            if socket.if_nametoindex(self.ifname) != self.ifindex:
                return f"interface {self.ifname} was replaced"
        except OSError:
            return f"interface {self.ifname} was deleted"
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) != self.inode:
                return f"UAPI socket {self.socket_path} was replaced"
        except FileNotFoundError:
            return f"UAPI socket {self.socket_path} was removed"
        return None

    def run(self) -> None:
        while not self._done.wait(WATCH_EVERY):
            reason = self.gone()
            if reason:
                self.reason = reason
                log.info("%s: %s: shutting down", self.ifname, reason)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def stop(self) -> None:
        self._done.set()


# ------------------------------------------------------------------ running

class Ready:
    """The write end of the pipe the waiting parent reads: one message, once."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def tell(self, message: bytes) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, message)
        except OSError:
            pass
        finally:
            os.close(fd)


def serve(name: str, config: Config, underlay: str | None, xdp_mode: str,
          ready: Ready) -> int:
    """Bring up, tell the parent (ready_fd), run until stopped, take down."""
    attachment = QuickAttachment(config, name, underlay, xdp_mode)
    previous = {sig: signal.signal(sig, attachment._on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    watcher = None
    try:
        attachment.up()
        watcher = Watcher(name, attachment.uapi.path)
        watcher.start()
        ready.tell(READY)
        if not attachment._stop:
            try:
                attachment.run()
            except OSError as exc:
                # The TUN fd fails (EBADFD) once the link is deleted.
                reason = watcher.gone()
                if reason is None:
                    raise
                log.info("%s: %s: shutting down", name, reason)
        return 0
    finally:
        if watcher is not None:
            watcher.stop()
        attachment.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_argv(argv: list[str], environ) -> tuple[str, bool]:
    foreground = environ.get("WG_PROCESS_FOREGROUND") == "1"
    names = []
    for arg in argv:
        if arg in ("-f", "--foreground"):
            foreground = True
        elif arg in ("-h", "--help"):
            raise UsageError("")
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg[:20]!r}")
        else:
            names.append(arg)
    if len(names) != 1:
        raise UsageError("expected one interface name")
    name = names[0]
    if (not name or len(name.encode(errors="surrogateescape")) >= 16 or name in (".", "..")
            or any(c in "/:\0" or c.isspace() for c in name)):
        raise UsageError("the interface name must be 1 to 15 bytes without '/', ':' or spaces")
    return name, foreground


def _setup_logging(foreground: bool, environ) -> None:
    level = logging.DEBUG if environ.get("LOG_LEVEL", "").lower() in ("debug", "verbose") \
        else logging.INFO
    logging.basicConfig(level=level, format="wgebpf[%(process)d]: %(message)s",
                        stream=sys.stderr, force=True)


def _redirect_stdio(environ) -> None:
    """The daemon's stdin from /dev/null, stdout/stderr to WGEBPF_LOG_FILE,
    or kept with LOG_LEVEL (as wireguard-go), else /dev/null: never the
    caller's pipe held open (that would keep `$(wg-quick up ...)` waiting)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    path = environ.get("WGEBPF_LOG_FILE")
    if path:
        out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    elif environ.get("LOG_LEVEL"):
        out = None
    else:
        out = null
    if out is not None:
        os.dup2(out, 1)
        os.dup2(out, 2)
        if out != null:
            os.close(out)
    os.close(null)


def main(argv: list[str] | None = None) -> None:
    environ = os.environ
    argv = sys.argv[1:] if argv is None else argv
    try:
        name, foreground = parse_argv(argv, environ)
        config, underlay, xdp = build(name, environ)
    except UsageError as exc:
        if str(exc):
            sys.stderr.write(f"wgebpf-go: {exc}\n")
        sys.stderr.write(USAGE)
        sys.exit(2 if str(exc) else 0)
    if underlay is not None and not os.path.exists(f"/sys/class/net/{underlay}"):
        sys.stderr.write(f"wgebpf-go: underlay interface {underlay!r} does not exist\n")
        sys.exit(2)
    if os.geteuid() != 0:
        sys.stderr.write("wgebpf-go: needs root (CAP_NET_ADMIN)\n")
        sys.exit(1)
    if foreground:
        _setup_logging(True, environ)
        sys.exit(_run(name, config, underlay, xdp, None))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the daemon
        os.close(read_end)
        os.setsid()
        _redirect_stdio(environ)                     # a relative WGEBPF_LOG_FILE still works
        os.chdir("/")                                # pins no mount
        _setup_logging(False, environ)
        code = 1
        try:
            code = _run(name, config, underlay, xdp, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    answer = b""
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        answer += chunk
    if answer == READY:
        sys.exit(0)
    message = answer.decode(errors="replace").strip() or "the daemon exited before it was ready"
    sys.stderr.write(f"wgebpf-go: {message}\n")
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    sys.exit(1)


def _run(name: str, config: Config, underlay: str | None, xdp: str, ready_fd: int | None) -> int:
    ready = Ready(ready_fd)
    try:
        return serve(name, config, underlay, xdp, ready)
    except (AttachError, OSError, ConfigError) as exc:
        message = f"{name}: {exc}"
    except Exception as exc:       # never a traceback wall
        message = f"{name}: {type(exc).__name__}: {exc}"
    log.error("%s", message)
    ready.tell(message.encode(errors="replace") + b"\n")
    return 1


if __name__ == "__main__":
    main()
