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

import ctypes
import errno
import json
import os
import platform
import signal
import socket
import stat
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import link

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


def tc_record(ifindex: int, ifname: str, parent: str, *, prio: int | None = None,
              handle: int | None = None, prog_id: int | None = None,
              kind: str = "bpf", clsact: bool = False) -> dict:
    """A tc_filters entry: a filter wgebpf added (and whether it added the clsact qdisc)."""
    rec = {"ifindex": ifindex, "ifname": ifname, "parent": parent, "kind": kind, "clsact": clsact}
    rec.update({k: v for k, v in (("prio", prio), ("handle", handle), ("prog_id", prog_id))
                if v is not None})
    return rec


def xdp_record(ifindex: int, ifname: str, prog_id: int, mode: str) -> dict:
    """The xdp entry: which program wgebpf attached where, in which mode."""
    if mode not in _XDP_MODE_FLAGS:
        raise ValueError(f"XDP mode must be one of {sorted(_XDP_MODE_FLAGS)}, not {mode!r}")
    return {"ifindex": ifindex, "ifname": ifname, "prog_id": prog_id, "mode": mode}


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
    """Does `argv` run `wgebpf ... attach ...` for interface `name`?

    The program is a word named wgebpf (the console script, or `-m wgebpf`);
    after `attach`, the name must appear as a word, as --name/--interface
    value, or as the stem of a config file (/etc/wireguard/NAME.conf).
    """
    start = None
    for i, arg in enumerate(argv):
        base = os.path.basename(arg)
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
    if not link.link_exists(name):
        return [f"no link {name}"]
    if socket_status == "live":
        return [f"link {name} kept: a live process serves its UAPI socket"]
    kind = link.link_kind(name)
    if kind != "tun":
        # Never delete someone's veth or bridge because it shares the name.
        raise RuntimeError(f"link {name} is a {kind or 'physical device'}, not a TUN: left alone")
    return [f"removed link {name}" if link.remove_link(name) else f"link {name} vanished by itself"]


def _link_matches(ipr: IPRoute, ifindex: int, ifname: str | None) -> bool:
    """Is ifindex still the device we recorded (and not a reused index)?"""
    try:
        dev = ipr.get_links(ifindex)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise
    return ifname is None or dev.get("IFLA_IFNAME") == ifname


def _remove_tc(rec: dict) -> list[str]:
    where = f"{rec.get('ifname') or rec['ifindex']} parent {rec.get('parent')}"
    with IPRoute() as ipr:
        if not _link_matches(ipr, rec["ifindex"], rec.get("ifname")):
            return [f"tc on {where}: device gone"]
        if rec.get("clsact"):
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(rec["ifindex"])):
                return [f"clsact on {rec.get('ifname')}: already gone"]
            ipr.tc("del", "clsact", rec["ifindex"])
            return [f"removed clsact qdisc (and its filters) on {rec.get('ifname')}"]
        parent = rec["parent"]
        matches = [f for f in ipr.get_filters(index=rec["ifindex"], parent=parent)
                   if _filter_is(f, rec)]
        if not matches:
            return [f"tc filter on {where}: none of ours there (already gone)"]
        prio = rec.get("prio") or (matches[0]["info"] >> 16)
        kw = {"parent": parent, "prio": prio}
        if rec.get("handle") is not None:
            kw["handle"] = rec["handle"]
        ipr.tc("del-filter", rec.get("kind", "bpf"), rec["ifindex"], **kw)
        return [f"removed tc filter on {where} prio {prio}"]


def _filter_is(f, rec: dict) -> bool:
    # A filter dump lists one entry per filter chain header plus one per
    # filter; only entries with options are real filters.
    if not f.get_attr("TCA_OPTIONS"):
        return False
    if rec.get("prio") is not None and (f["info"] >> 16) != rec["prio"]:
        return False
    if rec.get("handle") is not None and f["handle"] != rec["handle"]:
        return False
    if rec.get("prog_id") is not None and _bpf_filter_prog_id(f) != rec["prog_id"]:
        return False
    return True


_TCA_BPF_ID = 11


def _bpf_filter_prog_id(f) -> int | None:
    """TCA_BPF_ID of a bpf filter. pyroute2 0.9 does not decode it (it shows
    up as UNKNOWN type 11), so read its 4 raw bytes from the message."""
    opts = f.get_attr("TCA_OPTIONS")
    if opts.get_attr("TCA_BPF_ID") is not None:
        return opts.get_attr("TCA_BPF_ID")
    for key, nla in opts["attrs"]:
        if key == "UNKNOWN" and nla["header"]["type"] == _TCA_BPF_ID:
            return int.from_bytes(nla.data[nla.offset + 4:nla.offset + 8], "little")
    return None


def _remove_nft(table: str) -> list[str]:
    parts = table.split()
    family, tname = (parts[0], parts[1]) if len(parts) == 2 else ("inet", parts[0])
    proc = subprocess.run(["nft", "delete", "table", family, tname],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return [f"removed nftables table {family} {tname}"]
    if "No such file or directory" in proc.stderr:
        return [f"nftables table {family} {tname}: already gone"]
    raise RuntimeError(f"nft delete table {family} {tname}: {proc.stderr.strip()}")


# XDP attach flags (<linux/if_link.h>) and the IFLA_XDP_*_PROG_ID per mode.
_XDP_FLAGS_REPLACE = 1 << 4
_XDP_MODE_FLAGS = {"generic": 1 << 1, "native": 1 << 2, "offload": 1 << 3}
_XDP_MODE_ATTR = {"generic": "IFLA_XDP_SKB_PROG_ID", "native": "IFLA_XDP_DRV_PROG_ID",
                  "offload": "IFLA_XDP_HW_PROG_ID"}


def _xdp_attached(ipr: IPRoute, ifindex: int) -> dict[str, int]:
    """mode -> attached program id on `ifindex`."""
    xdp = ipr.get_links(ifindex)[0].get("IFLA_XDP")
    if not xdp:
        return {}
    found = {m: xdp.get(attr) for m, attr in _XDP_MODE_ATTR.items() if xdp.get(attr)}
    # With a single program the kernel reports only IFLA_XDP_PROG_ID and the mode.
    mode = {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("IFLA_XDP_ATTACHED"))
    if mode and xdp.get("IFLA_XDP_PROG_ID"):
        found.setdefault(mode, xdp.get("IFLA_XDP_PROG_ID"))
    return found


def _remove_xdp(rec: dict) -> list[str]:
    where = rec.get("ifname") or rec["ifindex"]
    with IPRoute() as ipr:
        if not _link_matches(ipr, rec["ifindex"], rec.get("ifname")):
            return [f"XDP on {where}: device gone"]
        attached = _xdp_attached(ipr, rec["ifindex"])
        mode = rec.get("mode") or next(
            (m for m, pid in attached.items() if pid == rec["prog_id"]), "generic")
        if attached.get(mode) != rec["prog_id"]:
            now = attached.get(mode)
            return [f"XDP on {where}: program {rec['prog_id']} not attached"
                    + (f" (program {now} is, left alone)" if now else "")]
        # XDP_FLAGS_REPLACE with the expected program makes the kernel detach
        # only if ours is still the one attached, closing the check-then-act race.
        prog_fd = _bpf_prog_fd_by_id(rec["prog_id"])
        try:
            ipr.link("set", index=rec["ifindex"], xdp={"attrs": [
                ("IFLA_XDP_FD", -1),
                ("IFLA_XDP_FLAGS", _XDP_MODE_FLAGS[mode] | _XDP_FLAGS_REPLACE),
                ("IFLA_XDP_EXPECTED_FD", prog_fd)]})
        finally:
            os.close(prog_fd)
    return [f"removed XDP program {rec['prog_id']} ({mode}) from {where}"]


_BPF_PROG_GET_FD_BY_ID = 13
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280}   # bpf(2) syscall numbers


def _bpf_prog_fd_by_id(prog_id: int) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(prog_id.to_bytes(4, "little"), 16)
    fd = libc.syscall(nr, _BPF_PROG_GET_FD_BY_ID, attr, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF program {prog_id}: {os.strerror(err)}")
    return fd


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
            step(f"removing tc filter {rec}", _remove_tc, rec)
        for table in st.nft_tables:
            step(f"removing nftables table {table}", _remove_nft, table)
        if st.xdp:
            step("removing XDP program", _remove_xdp, st.xdp)

    if st is not None:
        if failures:
            lines.append(f"kept {st.path}: {failures} step(s) failed; "
                         "run detach again after fixing")
        else:
            st.remove()
            lines.append(f"removed {st.path}")
    return lines
