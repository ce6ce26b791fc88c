"""Network-namespace topologies for the tests, the demo and benchmarks.

The standard two-host topology (TwoHosts), as the interop tests use it:

        netns <run>-a  (host A)                      netns <run>-b  (host B)
  +--------------------------------+          +--------------------------------+
  | wgebpf (or wireguard-go)       |          | wireguard-go                   |
  |   wga...  198.51.100.1/24      |  tunnel  |   wgb...  198.51.100.2/24      |
  |           2001:db8:100::1/64   |<========>|           2001:db8:100::2/64   |
  |           UDP 51820            |          |           UDP 51821            |
  |                                |          |                                |
  |   va...   192.0.2.1/24         |   veth   |   vb...   192.0.2.2/24         |
  |           2001:db8:1::1/64     +----------+           2001:db8:1::2/64     |
  +--------------------------------+          +---------------+----------------+
                                                              | veth (optional,
                                                              | add_host_behind_b)
                                              +---------------+----------------+
                                              | netns <run>-c  (host C)        |
                                              |   203.0.113.3/24 (B: .1)       |
                                              |   2001:db8:2::3/64 (B: ::1)    |
                                              |   B forwards; A routes the     |
                                              |   C subnets via B              |
                                              +--------------------------------+

For topologies of more hosts, Lan is an underlay shared by any number of
them (a bridge alone in a namespace of its own), and Bird runs the BIRD
routing daemon in a namespace; tests/test_nexthop.py draws such a topology.

Everything is made with `ip -n NS ...` or `ip netns exec NS ...`: the root
namespace's links, routes and firewall are never touched. Namespace and
interface names carry a random per-run id, because UAPI sockets live in the
one /var/run/wireguard that every namespace shares, and other runs may be
going on at the same time. Whatever is created is removed by close(), by the
context managers, and at the latest at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

# -- Addresses of the standard topology (documentation prefixes only) --------

A_UNDERLAY4, B_UNDERLAY4 = "192.0.2.1", "192.0.2.2"
A_UNDERLAY6, B_UNDERLAY6 = "2001:db8:1::1", "2001:db8:1::2"
A_TUNNEL4, B_TUNNEL4 = "198.51.100.1", "198.51.100.2"
A_TUNNEL6, B_TUNNEL6 = "2001:db8:100::1", "2001:db8:100::2"
C_TUNNEL4, C_TUNNEL6 = "198.51.100.3", "2001:db8:100::3"
BC_B4, BC_C4 = "203.0.113.1", "203.0.113.3"
BC_B6, BC_C6 = "2001:db8:2::1", "2001:db8:2::3"
A_PORT, B_PORT = 51820, 51821

UAPI_DIR = Path("/var/run/wireguard")
IFNAMSIZ = 15  # usable characters in a Linux interface name

RUN_ID = secrets.token_hex(3)  # 6 hex digits, unique per process
_serial = itertools.count(1)


def unique_ifname(prefix: str) -> str:
    """An interface name unique to this run, at most 15 characters."""
    name = f"{prefix}{RUN_ID}{next(_serial)}"
    if len(name) > IFNAMSIZ:
        raise ValueError(f"interface name {name!r} longer than {IFNAMSIZ}")
    return name


# -- Cleanup at exit ----------------------------------------------------------

_open: list = []  # objects with close(), closed in reverse order at exit


def _register(obj) -> None:
    _open.append(obj)


def _unregister(obj) -> None:
    try:
        _open.remove(obj)
    except ValueError:
        pass


@atexit.register
def close_all() -> None:
    """Close everything still open (namespaces, daemons), newest first."""
    while _open:
        obj = _open.pop()
        try:
            obj.close()
        except Exception as exc:  # keep going: the rest must still go
            print(f"netns cleanup: {obj!r}: {exc}", file=sys.stderr)


# -- Running commands ---------------------------------------------------------


class CommandError(RuntimeError):
    """A command exited non-zero; carries its output."""

    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess):
        self.argv = list(argv)
        self.result = result
        super().__init__(
            f"{' '.join(map(str, argv))} exited {result.returncode}: "
            f"{(result.stderr or '').strip() or (result.stdout or '').strip()}")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30,
        input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command (root namespace, no network changes) and capture text output."""
    result = subprocess.run(list(map(str, argv)), capture_output=True, text=True,
                            timeout=timeout, input=input, env=env)
    if check and result.returncode != 0:
        raise CommandError(argv, result)
    return result


def wait_until(predicate: Callable[[], object], timeout: float,
               interval: float = 0.1) -> bool:
    """Poll predicate until it is true or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                  timeout: float = 10) -> int:
    """Signal a process we started, wait, then SIGKILL its process group.

    Every process is started in a session of its own (pgid == pid), so the
    group holds only it and whatever it forked: workers are not left behind.
    """
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return -9


# -- Namespaces and links -----------------------------------------------------


class Namespace:
    """A network namespace named <prefix>-<run id>-<n>-<role>, lo up.

    Processes started with popen() are killed when the namespace closes.
    """

    def __init__(self, role: str = "ns"):
        self.role = role
        self.name = f"wgebpf-{RUN_ID}-{next(_serial)}-{role}"
        self._procs: list[subprocess.Popen] = []
        run(["ip", "netns", "add", self.name])
        _register(self)
        self.ip("link", "set", "lo", "up")

    def __repr__(self) -> str:
        return f"Namespace({self.name})"

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _argv(self, cmd: Sequence[str] | str) -> list[str]:
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        return ["ip", "netns", "exec", self.name, *map(str, cmd)]

    def run(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 30,
            input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run cmd (argv list, or a shell string) inside the namespace."""
        return run(self._argv(cmd), check=check, timeout=timeout, input=input, env=env)

    def popen(self, cmd: Sequence[str] | str, **kwargs) -> subprocess.Popen:
        """Start cmd in the namespace, in a session of its own, tracked for cleanup.

        `ip netns exec` execs the command, so the Popen's pid is the command's.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(cmd), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`ip -n NS ARGS...`."""
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a per-namespace sysctl (net.* keys only, which are namespaced)."""
        if not key.startswith("net."):
            raise ValueError("only net.* sysctls are per namespace")
        # /proc/sys/net shows the namespace of whoever opens it; writing it
        # directly avoids depending on procps' sysctl (not in minimal images).
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", f'echo {value} > "$1"', "sh", path])

    def link_exists(self, ifname: str) -> bool:
        return self.ip("link", "show", "dev", ifname, check=False).returncode == 0

    def close(self) -> None:
        for proc in reversed(self._procs):
            _stop_process(proc)
        self._procs.clear()
        run(["ip", "netns", "del", self.name], check=False)
        _unregister(self)


def add_address(ns: Namespace, ifname: str, cidr: str) -> None:
    """Add an address; IPv6 ones skip DAD so they are usable at once."""
    extra = ["nodad"] if ":" in cidr else []
    ns.ip("addr", "add", cidr, "dev", ifname, *extra)


def del_address(ns: Namespace, ifname: str, cidr: str) -> None:
    ns.ip("addr", "del", cidr, "dev", ifname)


def replace_address(ns: Namespace, ifname: str, old: str, new: str) -> None:
    """Move an interface from address old to new (same subnet), as a roaming host does.

    Linux deletes an IPv4 primary address's secondaries with it unless
    promote_secondaries is set, so set it first.
    """
    if ":" not in new:
        ns.sysctl(f"net.ipv4.conf.{ifname}.promote_secondaries", 1)
    add_address(ns, ifname, new)
    del_address(ns, ifname, old)


def veth(a: Namespace, b: Namespace, a_addrs: Iterable[str] = (),
         b_addrs: Iterable[str] = (), *, prefix_a: str = "va",
         prefix_b: str = "vb") -> tuple[str, str]:
    """A veth pair from a to b, both ends up with their addresses.

    Created inside `a` with its peer placed straight into `b`, so it never
    exists in the root namespace.
    """
    name_a, name_b = unique_ifname(prefix_a), unique_ifname(prefix_b)
    a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b,
         "netns", b.name)
    for ns, name in ((a, name_a), (b, name_b)):
        # No DAD on the cable, link-local included: while a router's
        # link-local address is tentative it solicits neighbours for
        # forwarded packets from "::", which hosts ignore, and the first
        # seconds of routed IPv6 are lost. (Only veths: the WireGuard
        # interfaces keep the kernel's defaults, as on a real host.)
        ns.sysctl(f"net.ipv6.conf.{name}.accept_dad", 0)
        # GRO on, as physical NICs have it by default (a veth has it off).
        # It matters once an XDP program (the guard) is on a veth: the
        # veth then splits UDP GSO sends into datagrams, and only GRO at
        # the receiving end joins them again for a UDP_GRO socket.
        ns.run(["ethtool", "-K", name, "gro", "on"])
    for ns, name, addrs in ((a, name_a, a_addrs), (b, name_b, b_addrs)):
        for cidr in addrs:
            add_address(ns, name, cidr)
        ns.ip("link", "set", name, "up")
    return name_a, name_b


# -- Keys (wireguard-tools, so the harness does not depend on wgebpf) ---------


def genkey() -> str:
    return run(["wg", "genkey"]).stdout.strip()


def pubkey(private_key: str) -> str:
    return run(["wg", "pubkey"], input=private_key + "\n").stdout.strip()


def genpsk() -> str:
    return run(["wg", "genpsk"]).stdout.strip()


# -- Configuration ------------------------------------------------------------


@dataclass
class PeerConfig:
    public_key: str
    allowed_ips: list[str] = field(default_factory=list)
    endpoint: str | None = None
    preshared_key: str | None = None
    persistent_keepalive: int | None = None
    extra: dict[str, str] = field(default_factory=dict)  # e.g. SourcePolicy

    def lines(self, *, wgebpf_keys: bool) -> list[str]:
        out = ["[Peer]", f"PublicKey = {self.public_key}"]
        if self.preshared_key:
            out.append(f"PresharedKey = {self.preshared_key}")
        if self.endpoint:
            out.append(f"Endpoint = {self.endpoint}")
        if self.allowed_ips:
            out.append(f"AllowedIPs = {', '.join(self.allowed_ips)}")
        if self.persistent_keepalive is not None:
            out.append(f"PersistentKeepalive = {self.persistent_keepalive}")
        if wgebpf_keys:
            out += [f"{k} = {v}" for k, v in self.extra.items()]
        return out


@dataclass
class InterfaceConfig:
    """One side's configuration, rendered as wg-quick (wgebpf) or setconf (wg)."""

    private_key: str
    listen_port: int | None = None
    addresses: list[str] = field(default_factory=list)
    mtu: int | None = None
    peers: list[PeerConfig] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # wgebpf's own keys

    @property
    def public_key(self) -> str:
        return pubkey(self.private_key)

    def to_wg_quick(self, *, hide_keys: bool = False) -> str:
        """The wg-quick file wgebpf reads (Address, MTU and wgebpf's keys included)."""
        return self._render(wg_quick=True, hide_keys=hide_keys)

    def to_setconf(self) -> str:
        """What `wg setconf` accepts: no Address/MTU, no wgebpf keys."""
        return self._render(wg_quick=False, hide_keys=False)

    def _render(self, *, wg_quick: bool, hide_keys: bool) -> str:
        key = "(hidden)" if hide_keys else self.private_key
        out = ["[Interface]", f"PrivateKey = {key}"]
        if self.listen_port is not None:
            out.append(f"ListenPort = {self.listen_port}")
        if wg_quick:
            if self.addresses:
                out.append(f"Address = {', '.join(self.addresses)}")
            if self.mtu is not None:
                out.append(f"MTU = {self.mtu}")
            out += [f"{k} = {v}" for k, v in self.extra.items()]
        for peer in self.peers:
            out.append("")
            out += peer.lines(wgebpf_keys=wg_quick)
        return "\n".join(out) + "\n"


# -- `wg show NAME dump` ------------------------------------------------------


@dataclass
class PeerDump:
    public_key: str
    preshared_key: str | None
    endpoint: str | None
    allowed_ips: list[str]
    latest_handshake: int  # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


@dataclass
class InterfaceDump:
    private_key: str
    public_key: str
    listen_port: int
    fwmark: int | None
    peers: dict[str, PeerDump]


def _none(value: str) -> str | None:
    return None if value in ("(none)", "") else value


def parse_dump(text: str) -> InterfaceDump:
    """Parse `wg show NAME dump` (one interface): tab-separated, interface first."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty wg dump")
    priv, pub, port, fwmark = lines[0].split("\t")
    peers = {}
    for line in lines[1:]:
        (key, psk, endpoint, allowed, handshake, rx, tx,
         keepalive) = line.split("\t")
        peers[key] = PeerDump(
            public_key=key, preshared_key=_none(psk), endpoint=_none(endpoint),
            allowed_ips=[] if _none(allowed) is None else allowed.split(","),
            latest_handshake=int(handshake), rx_bytes=int(rx), tx_bytes=int(tx),
            persistent_keepalive=None if keepalive == "off" else int(keepalive))
    return InterfaceDump(private_key=_none(priv) or "", public_key=_none(pub) or "",
                         listen_port=int(port),
                         fwmark=None if fwmark == "off" else int(fwmark, 0),
                         peers=peers)


# -- WireGuard interfaces -----------------------------------------------------


class StartError(RuntimeError):
    """A WireGuard daemon did not come up; the message carries its log."""


class WgInterface:
    """What both implementations share: a UAPI that stock `wg` drives."""

    kind = "?"

    def __init__(self, ns: Namespace, ifname: str, config: InterfaceConfig):
        self.ns = ns
        self.ifname = ifname
        self.config = config
        self.public_key = config.public_key
        self.proc: subprocess.Popen | None = None
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{ifname}-"))
        self.log_path = self.tmpdir / "log"
        _register(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ns.name}/{self.ifname})"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def socket_path(self) -> Path:
        return UAPI_DIR / f"{self.ifname}.sock"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def answers(self) -> bool:
        """True when `wg show NAME` gets an answer over the UAPI socket."""
        return self.ns.run(["wg", "show", self.ifname], check=False,
                           timeout=10).returncode == 0

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise StartError(f"{self!r} exited {self.proc.returncode} before it was "
                                 f"ready:\n{self.log()}")
            return self.answers()
        if not wait_until(ready, timeout, 0.1):
            self.stop()
            raise StartError(f"{self!r}: `wg show {self.ifname}` did not answer within "
                             f"{timeout} s:\n{self.log()}")

    def _secret_file(self, name: str, value: str) -> Path:
        path = self.tmpdir / name
        path.touch(0o600)
        path.write_text(value + "\n")
        return path

    # `wg` commands, run inside the namespace

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`wg ARGS...` in this interface's namespace."""
        return self.ns.run(["wg", *args], check=check)

    def set(self, *args: str) -> None:
        """`wg set NAME ARGS...`."""
        self.wg("set", self.ifname, *args)

    def dump(self) -> InterfaceDump:
        return parse_dump(self.wg("show", self.ifname, "dump").stdout)

    def peer(self, public_key: str) -> PeerDump:
        return self.dump().peers[public_key]

    def set_peer(self, peer: PeerConfig) -> None:
        """`wg set NAME peer ...` from a PeerConfig (adds or updates)."""
        args = ["peer", peer.public_key]
        if peer.preshared_key:
            args += ["preshared-key", str(self._secret_file("psk", peer.preshared_key))]
        if peer.endpoint:
            args += ["endpoint", peer.endpoint]
        if peer.persistent_keepalive is not None:
            args += ["persistent-keepalive", str(peer.persistent_keepalive)]
        args += ["allowed-ips", ",".join(peer.allowed_ips)]
        self.set(*args)

    def remove_peer(self, public_key: str) -> None:
        self.set("peer", public_key, "remove")

    def set_private_key(self, private_key: str) -> None:
        self.set("private-key", str(self._secret_file("private", private_key)))
        self.config.private_key = private_key
        self.public_key = pubkey(private_key)

    def start(self, timeout: float = 30) -> "WgInterface":
        raise NotImplementedError

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the daemon and wait; returns its exit status."""
        if self.proc is None:
            return None
        status = _stop_process(self.proc, signal.SIGTERM, timeout)
        return status

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        _unregister(self)


class WireGuardGo(WgInterface):
    """Debian's wireguard-go in a namespace, configured with `wg setconf` and `ip`."""

    kind = "wireguard-go"

    def start(self, timeout: float = 30) -> "WireGuardGo":
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="verbose")
        with open(self.log_path, "wb") as log:
            self.proc = self.ns.popen(["wireguard-go", "-f", self.ifname],
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)
        conf = self._secret_file("setconf.conf", self.config.to_setconf())
        self.wg("setconf", self.ifname, str(conf))
        for cidr in self.config.addresses:
            add_address(self.ns, self.ifname, cidr)
        if self.config.mtu:
            self.ns.ip("link", "set", self.ifname, "mtu", str(self.config.mtu))
        self.ns.ip("link", "set", self.ifname, "up")
        return self

    def close(self) -> None:
        super().close()
        # wireguard-go removes its socket on SIGTERM; a SIGKILLed one may not.
        if self.proc is not None and self.socket_path.exists():
            self.socket_path.unlink(missing_ok=True)


def wgebpf_argv() -> list[str]:
    """The wgebpf command: the venv's script beside this Python, else PATH."""
    beside = Path(sys.executable).with_name("wgebpf")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("wgebpf")
    if found:
        return [found]
    raise FileNotFoundError("wgebpf is not installed (run scripts/setup.sh)")


class Wgebpf(WgInterface):
    """`wgebpf attach UNDERLAY --config FILE --name NAME` in a namespace."""

    kind = "wgebpf"

    def __init__(self, ns: Namespace, ifname: str, config: InterfaceConfig,
                 underlay: str, *, env: dict[str, str] | None = None,
                 config_text: str | None = None, args: Sequence[str] = (),
                 cwd: str | None = None):
        super().__init__(ns, ifname, config)
        self.underlay = underlay
        self.env = dict(env or {})
        self.cwd = cwd
        self.args = list(args)          # extra `wgebpf attach` options, e.g. ["--xdp", "generic"]
        self.config_text = config_text  # used verbatim instead of config, if given
        self.config_path = self.tmpdir / f"{ifname}.conf"

    def start(self, timeout: float = 30) -> "Wgebpf":
        text = self.config_text or self.config.to_wg_quick()
        self._secret_file(self.config_path.name, text.rstrip("\n"))
        argv = wgebpf_argv() + ["attach", self.underlay, "--config",
                                str(self.config_path), "--name", self.ifname, *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = self.ns.popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, **self.env), cwd=self.cwd)
        self._wait_ready(timeout)
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 30
            ) -> subprocess.CompletedProcess:
        """`wgebpf ARGS...` in this namespace."""
        return self.ns.run(wgebpf_argv() + list(args), check=check, timeout=timeout)

    def status(self) -> dict:
        """`wgebpf status NAME --json`, parsed: peers (by public key), workers, drops,
        classifier and next-hop counters. Workers report about every 0.5 s,
        so poll it with wait_until rather than reading it once."""
        return json.loads(self.cli("status", self.ifname, "--json").stdout)

    def kill(self) -> None:
        """SIGKILL the attach process alone, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def close(self) -> None:
        super().close()
        # A crashed instance may leave its link and socket: detach is the
        # documented way to remove them; the unlink is the last resort.
        if self.ns.link_exists(self.ifname) or self.socket_path.exists():
            try:
                self.cli("detach", self.ifname, check=False, timeout=20)
            except Exception:
                pass
            self.socket_path.unlink(missing_ok=True)


# -- Traffic ------------------------------------------------------------------


def ping_run(ns: Namespace, addr: str, count: int = 3, timeout: float = 5,
             interval: float = 0.2) -> subprocess.CompletedProcess:
    """ping with a deadline; the result's stdout has ping's own report."""
    return ns.run(["ping", "-n", "-c", str(count), "-i", str(interval),
                   "-w", str(max(1, round(timeout))), addr],
                  check=False, timeout=timeout + 10)


def ping(ns: Namespace, addr: str, count: int = 3, timeout: float = 5) -> bool:
    """True when all `count` echo replies arrive within `timeout` seconds."""
    return ping_run(ns, addr, count, timeout).returncode == 0


def ping_stats(output: str) -> tuple[int, int]:
    """(transmitted, received) from ping's summary line."""
    for line in output.splitlines():
        if "packets transmitted" in line:
            parts = line.split(",")
            return int(parts[0].split()[0]), int(parts[1].split()[0])
    raise ValueError(f"no ping summary in {output!r}")


def _listening(ns: Namespace, port: int) -> bool:
    out = ns.run(["ss", "-Htln", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


def iperf3(client_ns: Namespace, server_ns: Namespace, addr: str,
           seconds: float = 3, *, port: int = 5201, result: dict | None = None) -> float:
    """TCP throughput client -> server (addr is the server's), in bits/s.

    The server is one-off (-1). If `result` is given it receives iperf3's JSON.
    """
    server = server_ns.popen(["iperf3", "-s", "-1", "-p", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_until(lambda: _listening(server_ns, port), 10):
            raise RuntimeError("iperf3 server did not start listening")
        out = client_ns.run(["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds),
                             "-J", "--connect-timeout", "5000"],
                            check=False, timeout=seconds + 60)
        data = json.loads(out.stdout or "{}")
        if result is not None:
            result.update(data)
        if out.returncode != 0 or "error" in data:
            raise RuntimeError(f"iperf3 to {addr} failed: {data.get('error') or out.stderr}")
        return float(data["end"]["sum_received"]["bits_per_second"])
    finally:
        _stop_process(server, signal.SIGTERM, 5)


# -- Packet capture -----------------------------------------------------------


@dataclass
class UdpPacket:
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes

    @property
    def wg_type(self) -> int:
        """The WireGuard message type (first byte), 0 for an empty payload."""
        return self.payload[0] if self.payload else 0


class Capture:
    """tcpdump of UDP on one interface, parsed into UdpPackets when stopped."""

    def __init__(self, ns: Namespace, ifname: str):
        self.ns, self.ifname = ns, ifname
        self.tmpdir = Path(tempfile.mkdtemp(prefix="cap-"))
        self.path = self.tmpdir / "cap.pcap"
        self.err_path = self.tmpdir / "err"
        with open(self.err_path, "wb") as err:
            # -Z root: Debian's tcpdump otherwise drops to user tcpdump and
            # cannot write into our 0700 temporary directory.
            self.proc = ns.popen(["tcpdump", "-n", "-i", ifname, "-U", "--immediate-mode",
                                  "-Z", "root",
                                  "-w", str(self.path), "udp"],
                                 stdout=subprocess.DEVNULL, stderr=err)
        if not wait_until(lambda: "listening on" in self.err_path.read_text()
                          or self.proc.poll() is not None, 10):
            raise RuntimeError("tcpdump did not start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"tcpdump failed: {self.err_path.read_text()}")

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[UdpPacket]:
        if self.proc.poll() is None:
            time.sleep(0.2)  # let -U flush the last packets
            _stop_process(self.proc, signal.SIGINT, 5)
        data = self.path.read_bytes() if self.path.exists() else b""
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.packets = parse_pcap(data)
        return self.packets


def parse_pcap(data: bytes) -> list[UdpPacket]:
    """UDP packets from a classic little-endian pcap of Ethernet frames."""
    if len(data) < 24:
        return []
    magic, = struct.unpack_from("<I", data)
    if magic not in (0xA1B2C3D4, 0xA1B23C4D):
        raise ValueError("not a little-endian pcap file")
    linktype, = struct.unpack_from("<I", data, 20)
    if linktype != 1:
        raise ValueError(f"pcap link type {linktype}, expected Ethernet")
    packets, off = [], 24
    while off + 16 <= len(data):
        incl_len, = struct.unpack_from("<I", data, off + 8)
        frame = data[off + 16: off + 16 + incl_len]
        off += 16 + incl_len
        pkt = _parse_ethernet_udp(frame)
        if pkt:
            packets.append(pkt)
    return packets


def _parse_ethernet_udp(frame: bytes) -> UdpPacket | None:
    if len(frame) < 14:
        return None
    ethertype, = struct.unpack_from("!H", frame, 12)
    ip = frame[14:]
    if ethertype == 0x0800 and len(ip) >= 20 and ip[9] == 17:
        ihl = (ip[0] & 0x0F) * 4
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), \
            socket.inet_ntop(socket.AF_INET, ip[16:20])
        udp = ip[ihl:]
    elif ethertype == 0x86DD and len(ip) >= 40 and ip[6] == 17:
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), \
            socket.inet_ntop(socket.AF_INET6, ip[24:40])
        udp = ip[40:]
    else:
        return None  # extension headers and fragments are not needed here
    if len(udp) < 8:
        return None
    sport, dport, length = struct.unpack_from("!HHH", udp)
    return UdpPacket(src, sport, dst, dport, udp[8:length])


# -- A shared underlay LAN ----------------------------------------------------


class Lan:
    """An underlay LAN for any number of hosts: a bridge alone in a namespace
    of its own, each host joined to it by a veth pair.

        host X --veth-- [ lan namespace: bridge ] --veth-- host Y

    The bridge has no address and STP is off, so a port forwards as soon as
    it is up. Nothing of it exists in the root namespace.
    """

    def __init__(self, role: str = "lan"):
        self.ns = Namespace(role)
        self.bridge = "br0"  # alone in its namespace: no need for a unique name
        self.ns.ip("link", "add", self.bridge, "type", "bridge")
        self.ns.ip("link", "set", self.bridge, "up")

    def __repr__(self) -> str:
        return f"Lan({self.ns.name})"

    def join(self, host: Namespace, addrs: Iterable[str] = ()) -> str:
        """Plug host into the LAN with addrs; returns the host's interface name."""
        name, port = veth(host, self.ns, addrs, (), prefix_a="ul", prefix_b="lp")
        self.ns.ip("link", "set", port, "master", self.bridge)
        return name

    def close(self) -> None:
        self.ns.close()


# -- BIRD (the routing daemon) -------------------------------------------------


class Bird:
    """BIRD 2 in a namespace, with its own config, control socket and pid file
    in a temporary directory (BIRD's defaults under /run are one per machine,
    and every namespace would share them). Runs in the foreground with its
    log on stderr, kept in `log_path`; stopped by its PID."""

    def __init__(self, ns: Namespace, config: str, name: str = "bird"):
        self.ns, self.name = ns, name
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.config_path = self.tmpdir / "bird.conf"
        self.socket_path = self.tmpdir / "bird.ctl"
        self.pid_path = self.tmpdir / "bird.pid"
        self.log_path = self.tmpdir / "log"
        self.config_path.write_text(config)
        self.proc: subprocess.Popen | None = None
        _register(self)

    def __repr__(self) -> str:
        return f"Bird({self.ns.name}/{self.name})"

    def start(self, timeout: float = 15) -> "Bird":
        with open(self.log_path, "wb") as log:
            self.proc = self.ns.popen(["bird", "-f", "-c", self.config_path,
                                       "-s", self.socket_path, "-P", self.pid_path],
                                      stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise StartError(f"{self!r} exited {self.proc.returncode}:\n{self.log()}")
            return self.birdc("show", "status", check=False).returncode == 0
        if not wait_until(ready, timeout, 0.2):
            raise StartError(f"{self!r}: control socket did not answer within "
                             f"{timeout} s:\n{self.log()}")
        return self

    def birdc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`birdc -s SOCK ARGS...` (birdc exits 0 even when BIRD reports an error)."""
        return self.ns.run(["birdc", "-s", self.socket_path, *args], check=check)

    def established(self, protocol: str) -> bool:
        """True when BGP protocol `protocol` is in state Established."""
        out = self.birdc("show", "protocols", protocol, check=False).stdout
        return "Established" in out

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, 5)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        _unregister(self)


# -- The two-host topology ----------------------------------------------------


class TwoHosts:
    """Hosts A and B joined by a veth pair; see the module docstring."""

    def __init__(self):
        self.sides: list[WgInterface] = []
        self.extra: list[Namespace] = []
        self.a = Namespace("a")
        try:
            self.b = Namespace("b")
            self.underlay_a, self.underlay_b = veth(
                self.a, self.b, [f"{A_UNDERLAY4}/24", f"{A_UNDERLAY6}/64"],
                [f"{B_UNDERLAY4}/24", f"{B_UNDERLAY6}/64"])
        except Exception:
            self.close()
            raise

    def __enter__(self) -> "TwoHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host_behind_b(self, role: str = "c") -> Namespace:
        """A third host C routed through B (203.0.113.0/24, 2001:db8:2::/64)."""
        c = Namespace(role)
        self.extra.append(c)
        self.link_bc = veth(self.b, c, [f"{BC_B4}/24", f"{BC_B6}/64"],
                            [f"{BC_C4}/24", f"{BC_C6}/64"])
        self.b.sysctl("net.ipv4.ip_forward", 1)
        self.b.sysctl("net.ipv6.conf.all.forwarding", 1)
        self.a.ip("route", "add", "203.0.113.0/24", "via", B_UNDERLAY4)
        self.a.ip("-6", "route", "add", "2001:db8:2::/64", "via", B_UNDERLAY6)
        c.ip("route", "add", "default", "via", BC_B4)
        c.ip("-6", "route", "add", "default", "via", BC_B6)
        return c

    def track(self, side: WgInterface) -> WgInterface:
        self.sides.append(side)
        return side

    def logs(self) -> str:
        """Every daemon's log, for a failing test's report."""
        return "\n".join(f"===== {side!r} log =====\n{side.log()}" for side in self.sides)

    def close(self) -> None:
        for side in reversed(self.sides):
            side.close()
        for ns in reversed(self.extra):
            ns.close()
        for attr in ("b", "a"):
            ns = getattr(self, attr, None)
            if ns is not None:
                ns.close()


def make_side(impl: str, ns: Namespace, config: InterfaceConfig, *,
              underlay: str = "", tag: str = "wg", env: dict[str, str] | None = None,
              cwd: str | None = None) -> WgInterface:
    """A not-yet-started interface of the given implementation."""
    ifname = unique_ifname(tag)
    if impl == "wgebpf":
        return Wgebpf(ns, ifname, config, underlay, env=env, cwd=cwd)
    if impl == "wireguard-go":
        return WireGuardGo(ns, ifname, config)
    raise ValueError(f"unknown implementation {impl!r}")


def side_configs(*, endpoints: str = "both", family: int = 4, psk: str | None = None,
                 a_key: str | None = None, b_key: str | None = None
                 ) -> tuple[InterfaceConfig, InterfaceConfig]:
    """Matching configs for A and B; `endpoints` says who knows whose (a|b|both|none)."""
    a_key, b_key = a_key or genkey(), b_key or genkey()
    if family == 4:
        a_ep, b_ep = f"{A_UNDERLAY4}:{A_PORT}", f"{B_UNDERLAY4}:{B_PORT}"
    else:
        a_ep, b_ep = f"[{A_UNDERLAY6}]:{A_PORT}", f"[{B_UNDERLAY6}]:{B_PORT}"
    a = InterfaceConfig(a_key, A_PORT, [f"{A_TUNNEL4}/24", f"{A_TUNNEL6}/64"])
    b = InterfaceConfig(b_key, B_PORT, [f"{B_TUNNEL4}/24", f"{B_TUNNEL6}/64"])
    a.peers.append(PeerConfig(pubkey(b_key), [f"{B_TUNNEL4}/32", f"{B_TUNNEL6}/128"],
                              b_ep if endpoints in ("a", "both") else None, psk))
    b.peers.append(PeerConfig(pubkey(a_key), [f"{A_TUNNEL4}/32", f"{A_TUNNEL6}/128"],
                              a_ep if endpoints in ("b", "both") else None, psk))
    return a, b


def make_pair(topo: TwoHosts, a_impl: str = "wgebpf", b_impl: str = "wireguard-go", *,
              endpoints: str = "both", family: int = 4, psk: str | None = None,
              a_env: dict[str, str] | None = None,
              configs: tuple[InterfaceConfig, InterfaceConfig] | None = None,
              a_extra: dict[str, str] | None = None,
              ) -> tuple[WgInterface, WgInterface]:
    """Start A and B as each other's peer on the standard topology (B first).

    a_extra: wgebpf's own [Interface] keys for A (e.g. {"Workers": "2"});
    ignored when A is not wgebpf, which has no such keys.
    """
    a_cfg, b_cfg = configs or side_configs(endpoints=endpoints, family=family, psk=psk)
    if a_extra and a_impl == "wgebpf":
        a_cfg.extra.update(a_extra)
    b = topo.track(make_side(b_impl, topo.b, b_cfg, underlay=topo.underlay_b, tag="wgb"))
    b.start()
    a = topo.track(make_side(a_impl, topo.a, a_cfg, underlay=topo.underlay_a, tag="wga",
                             env=a_env))
    a.start()
    return a, b
