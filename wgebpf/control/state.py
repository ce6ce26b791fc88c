"""What a running wgebpf instance created, so `wgebpf detach NAME` can undo it.

An attached instance writes RUN_DIR/NAME.json as soon as it creates anything
in the kernel, and rewrites it as it adds more. If it dies cleanly it removes
what it made and the file. If it dies by kill -9 (or a crash, or OOM), the file
is the only memory of the routes, rules, tc filters, nftables tables and XDP
program it left behind: detach reads it, stops the process if it still runs,
and removes each leftover in an independent, idempotent step.

Records other modules put in the file (build them with tc_record/xdp_record):
  routes      RouteRecord.to_dict() from link.add_routes
  tc_filters  {"ifindex", "ifname", "parent", "prio"?, "handle"?, "kind"?,
               "prog_id"?, "clsact": bool}; clsact=True means wgebpf created
               the clsact qdisc, so deleting the qdisc removes everything
  nft_tables  "FAMILY NAME" strings, e.g. "inet wgebpf_wg0"
  xdp         {"ifindex", "ifname", "prog_id", "mode"}; mode is
               "generic", "native" or "offload"
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from dataclasses import asdict, dataclass, field, fields


from ..kernel import link, nftables, tc, xdp_guard

RUN_DIR = "/run/wgebpf"
SOCKET_DIR = "/var/run/wireguard"   # wg(8)'s UAPI directory, shared by all namespaces

_FORMAT_VERSION = 1


class StateError(Exception):
    """A state file exists but cannot be read."""


def socket_path_for(name: str) -> str:
    return os.path.join(SOCKET_DIR, f"{name}.sock")


def _check_name(name: str) -> None:
    # The name becomes a file name: refuse anything that could leave RUN_DIR.
    if not name or len(name) > 15 or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"invalid interface name {name!r}")


@dataclass
class RuntimeState:
    name: str
    pid: int
    underlay: str | None = None
    socket_path: str = ""
    routes: list[dict] = field(default_factory=list)
    tc_filters: list[dict] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)
    xdp: dict | None = None
    xdp_more: list[dict] = field(default_factory=list)   # the same guard on more devices (wgebpf-go)
    extra: dict = field(default_factory=dict)
    # Filled in by save() when unset. The start time (clock ticks since boot,
    # /proc/PID/stat field 22) tells a reused pid from ours; the netns inode
    # keeps detach from removing same-named things in another namespace.
    pid_start: int | None = None
    netns: int | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not self.socket_path:
            self.socket_path = socket_path_for(self.name)

    @staticmethod
    def path_for(name: str) -> str:
        _check_name(name)
        return os.path.join(RUN_DIR, f"{name}.json")

    @property
    def path(self) -> str:
        return self.path_for(self.name)

    def save(self) -> None:
        """Atomically (write, fsync, rename) store the state, mode 0600."""
        if self.pid_start is None:
            self.pid_start = _start_time(self.pid)
        if self.netns is None:
            self.netns = _current_netns()
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        data = json.dumps({"version": _FORMAT_VERSION, **asdict(self)}, indent=1).encode()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)   # O_CREAT's mode does not apply to a leftover tmp file
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, name: str) -> "RuntimeState | None":
        """The stored state of `name`, None if there is none."""
        try:
            with open(cls.path_for(name)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"cannot read {cls.path_for(name)}: {e}") from e
        if not isinstance(data, dict) or data.get("name") != name:
            raise StateError(f"{cls.path_for(name)} does not describe {name}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise StateError(f"{cls.path_for(name)}: {e}") from e

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# --- processes -----------------------------------------------------------------

def _current_netns() -> int | None:
    # thread-self, not self: setns() moves only the calling thread.
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()   # comm may contain spaces and ')'


def _start_time(pid: int) -> int | None:
    st = _proc_stat(pid) if pid > 0 else None
    return int(st[19]) if st else None


def _alive(pid: int) -> bool:
    """True if `pid` runs; a zombie has already released its fds and TUN."""
    st = _proc_stat(pid) if pid > 0 else None
    return bool(st) and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_attach_cmdline(argv: list[str], name: str) -> bool:
    """Does `argv` run `wgebpf ... attach ...` (or `wgebpf-go NAME`) for interface `name`?

    The program is a word named wgebpf (the console script, or `-m wgebpf`);
    after `attach`, the name must appear as a word, as --name/--interface
    value, or as the stem of a config file (/etc/wireguard/NAME.conf).
    """
    start = None
    for i, arg in enumerate(argv):
        base = os.path.basename(arg)
        if base == "wgebpf-go":         # wg-quick's userspace implementation: wgebpf-go [-f] NAME
            return name in argv[i + 1:]
        if base == "wgebpf" or (i > 0 and argv[i - 1] == "-m" and arg.split(".")[0] == "wgebpf"):
            start = i + 1
            break
    if start is None or "attach" not in argv[start:]:
        return False
    for arg in argv[argv.index("attach", start) + 1:]:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value == name or os.path.splitext(os.path.basename(value))[0] == name:
            return True
    return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _stop_process(st: RuntimeState, timeout: float) -> list[str]:
    pid = st.pid
    if pid == os.getpid():
        return [f"pid {pid} is this process: not signalled"]
    if not _alive(pid):
        return [f"process {pid} is not running"]
    if st.pid_start is not None and _start_time(pid) != st.pid_start:
        return [f"pid {pid} now belongs to another process (started later): not signalled"]
    if not is_attach_cmdline(_cmdline(pid), st.name):
        return [f"pid {pid} is not a wgebpf attach for {st.name}: not signalled"]
    os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return [f"stopped process {pid} with SIGTERM"]
    os.kill(pid, signal.SIGKILL)
    if _wait_gone(pid, 5.0):
        return [f"process {pid} ignored SIGTERM for {timeout:g} s: killed with SIGKILL"]
    raise RuntimeError(f"process {pid} survived SIGKILL (stuck in the kernel?)")


# --- leftovers -----------------------------------------------------------------

def _socket_status(path: str) -> str:
    """'absent', 'live' (someone accepts), 'stale' (a socket nobody serves) or 'other'."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "other"
    if not stat.S_ISSOCK(mode):
        return "other"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return "stale"
        except OSError:
            return "other"
    return "live"


def _remove_socket(path: str, status: str) -> list[str]:
    if status == "absent":
        return [f"no UAPI socket at {path}"]
    if status == "live":
        return [f"a live process answers on {path}: left alone"]
    if status == "other":
        raise RuntimeError(f"{path} is not a socket wgebpf can judge stale: left alone")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return [f"removed stale UAPI socket {path}"]


def _remove_tun(name: str, socket_status: str) -> list[str]:
    if socket_status == "live":
        return [f"link {name} kept: a live process serves its UAPI socket"]
    return link.remove_tun(name)


# --- detach ----------------------------------------------------------------------

def detach(name: str, timeout: float = 10.0) -> list[str]:
    """Stop instance `name` if it still runs and remove what it left behind.

    Each step runs even if an earlier one failed; the state file is removed
    only when every step succeeded, so a second detach can retry the rest.
    """
    lines: list[str] = []
    failures = 0

    def step(what: str, fn, *args) -> None:
        nonlocal failures
        try:
            lines.extend(fn(*args))
        except Exception as e:   # one failing step must not stop the others
            failures += 1
            lines.append(f"FAILED {what}: {e}")

    _check_name(name)
    try:
        st = RuntimeState.load(name)
    except StateError as e:
        st, failures = None, failures + 1
        lines.append(f"FAILED reading state: {e}; cleaning up by name only")
    if st is None and not failures:
        lines.append(f"no state file for {name}: removing the link and a stale socket only")

    if st is not None:
        step("stopping the process", _stop_process, st, timeout)
    sockets = [socket_path_for(name)]
    if st is not None and st.socket_path not in sockets:
        sockets.insert(0, st.socket_path)
    statuses = {p: _socket_status(p) for p in sockets}
    live = "live" if "live" in statuses.values() else "dead"

    here = st is None or st.netns is None or st.netns == _current_netns()
    if here:
        step(f"removing link {name}", _remove_tun, name, live)
    for path, status in statuses.items():
        step(f"removing socket {path}", _remove_socket, path, status)
    if not here:
        failures += 1
        lines.append(f"FAILED: {name} was attached in another network namespace (netns inode "
                     f"{st.netns}); run detach inside it to remove the link, routes, tc, "
                     "nftables and XDP leftovers")
    elif st is not None:
        if st.routes:
            step("removing routes", link.remove_routes, st.routes)
        for rec in st.tc_filters:
            step(f"removing tc filter {rec}", tc.remove_filter, rec)
        for table in st.nft_tables:
            step(f"removing nftables table {table}", nftables.remove_table, table)
        if st.xdp:
            step("removing XDP program", xdp_guard.remove_xdp, st.xdp)
        for rec in st.xdp_more:
            step(f"removing XDP program from {rec.get('ifname')}", xdp_guard.remove_xdp, rec)

    if st is not None:
        if failures:
            lines.append(f"kept {st.path}: {failures} step(s) failed; "
                         "run detach again after fixing")
        else:
            st.remove()
            lines.append(f"removed {st.path}")
    return lines
