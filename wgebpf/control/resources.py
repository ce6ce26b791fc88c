"""Resource figures of a running `wgebpf attach`, for leak hunting
(tests/test_churn.py, scripts/soak.py).

Two views of the same things, so neither has to be trusted alone:
  - `wgebpf status NAME` -> "resources" (wgebpf/control/status.py): what the control
    plane counts itself: its session-index table, the entries of its
    eBPF maps, its TUN queues, and fds/RSS of itself and every worker;
  - the kernel's view: /proc/PID/fd and VmRSS for each process, and the
    eBPF maps the control plane holds open (found through
    /proc/PID/fdinfo, so maps of other instances with the same names are
    never counted), their entries counted with `bpftool map dump`.

Only reads: nothing here changes the instance it looks at.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field

# The maps whose entry count follows peers and sessions; the others are
# fixed-size arrays or bounded LRU tables that cannot leak.
PEER_MAPS = ("wg_peers4", "wg_peers6")          # nexthop.c: LPM tries, prefix -> slot
SESSION_MAPS = ("wg_rxindex", "wgx_index")      # reuseport.c, xdp_guard.c: receiver index
WATCHED_MAPS = PEER_MAPS + SESSION_MAPS


@dataclass
class ProcessUsage:
    pid: int
    fds: int
    rss_bytes: int

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / (1 << 20)


def process_usage(pid: int) -> ProcessUsage | None:
    """fds and RSS of a process from /proc; None when it has exited."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return None
    return ProcessUsage(pid, fds, rss_kib * 1024)


def bpf_map_ids(pid: int) -> dict[int, str]:
    """map id -> name of every eBPF map process `pid` holds an fd of."""
    ids = set()
    fd_dir = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fd_dir):
        try:
            with open(f"{fd_dir}/{fd}") as f:
                for line in f:
                    if line.startswith("map_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue            # closed meanwhile
    names = {}
    for map_id in ids:
        shown = _bpftool("map", "show", "id", str(map_id))
        if shown is not None:
            names[map_id] = shown.get("name", "")
    return names


def bpf_map_entries(pid: int, names: tuple[str, ...] = WATCHED_MAPS) -> dict[str, int]:
    """Entries of the maps called `names` that process `pid` holds, counted
    by bpftool (the kernel's view). A name the process holds twice would
    be summed; wgebpf holds each of these once."""
    counts: dict[str, int] = {}
    for map_id, name in bpf_map_ids(pid).items():
        if name in names:
            dump = _bpftool("map", "dump", "id", str(map_id))
            counts[name] = counts.get(name, 0) + len(dump or [])
    return counts


def _bpftool(*args: str):
    result = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                            timeout=30)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout or "null")


@dataclass
class Snapshot:
    """One look at an instance: its own counts (status) and the kernel's."""

    label: str
    control_plane: ProcessUsage
    workers: dict[int, ProcessUsage]            # worker position -> usage
    worker_restarts: dict[int, int]
    indices: dict[str, int]                     # status.index_counts
    maps: dict[str, int | None]                 # status.map_entry_counts
    kernel_maps: dict[str, int]                 # bpftool, same names
    tun_queues: int | None
    status: dict = field(repr=False, default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        """(what, figure) pairs, for printing side by side."""
        out = [("control plane fds", str(self.control_plane.fds)),
               ("control plane RSS MiB", f"{self.control_plane.rss_mib:.1f}")]
        for position, usage in sorted(self.workers.items()):
            out += [(f"worker {position} fds", str(usage.fds)),
                    (f"worker {position} RSS MiB", f"{usage.rss_mib:.1f}")]
        out += [(f"indices {kind}", str(n)) for kind, n in self.indices.items()]
        out += [(f"map {name} (status/bpftool)",
                 f"{self.maps.get(name)}/{self.kernel_maps.get(name)}") for name in WATCHED_MAPS]
        out.append(("TUN queues", str(self.tun_queues)))
        return out


def snapshot(label: str, status: dict) -> Snapshot:
    """A Snapshot from a fresh `wgebpf status` dict (netns.Wgebpf.status()).

    fds and RSS are read here from /proc rather than taken from the status,
    so they are not the status request's own (its UAPI connection is closed
    by now)."""
    res = status["resources"]
    pid = res["control_plane"]["pid"]
    control = process_usage(pid)
    if control is None:
        raise RuntimeError(f"wgebpf control plane {pid} is gone")
    workers, restarts = {}, {}
    for worker in status["workers"]:
        usage = process_usage(worker["pid"]) if worker.get("pid") else None
        if usage is not None:
            workers[worker["worker"]] = usage
        restarts[worker["worker"]] = worker["restarts"]
    return Snapshot(label, control, workers, restarts, dict(res["indices"]),
                    dict(res["maps"]), bpf_map_entries(pid), res["tun_queues"], status)


def table(snapshots: list[Snapshot]) -> str:
    """The snapshots' figures as columns, one row per figure."""
    labels = [s.label for s in snapshots]
    rows: dict[str, list[str]] = {}
    for i, snap in enumerate(snapshots):
        for what, figure in snap.rows():
            rows.setdefault(what, [""] * len(snapshots))[i] = figure
    width = max(len(w) for w in rows) + 2
    cols = [max(len(label), *(len(r[i]) for r in rows.values())) + 2
            for i, label in enumerate(labels)]
    lines = ["".ljust(width) + "".join(l.rjust(c) for l, c in zip(labels, cols))]
    for what, figures in rows.items():
        lines.append(what.ljust(width) + "".join(f.rjust(c) for f, c in zip(figures, cols)))
    return "\n".join(lines)
