"""`wgebpf bench`: wgebpf against wireguard-go, measured in one run.

Every measurement runs on a fresh copy of the standard two-host topology
of wgebpf.lab.netns (two namespaces joined by one veth cable):

      netns A                                   netns B
   +--------------------------+   tunnel    +--------------------------+
   | wgebpf or wireguard-go   |<===========>| wgebpf or wireguard-go   |
   |   198.51.100.1           |             |   198.51.100.2           |
   |   iperf3 -c, ping        |    veth     |   iperf3 -s              |
   |   192.0.2.1  ------------+-------------+-  192.0.2.2              |
   +--------------------------+             +--------------------------+

Configurations: the pairings wgebpf <-> wgebpf, wgebpf <-> wireguard-go,
wireguard-go <-> wgebpf and wireguard-go <-> wireguard-go; each pairing
with wgebpf in it once per Workers count and PeerSelection mode (the same
on both wgebpf sides). Traffic flows from A to B, so the two mixed
pairings measure both directions: in wgebpf <-> wireguard-go wgebpf
encrypts and wireguard-go decrypts, in wireguard-go <-> wgebpf the other
way round. Both sides' CPU is reported.

The schedule is round-robin: repeat 1 of every configuration, then repeat
2 of every configuration, ... (ABCABC, never AAABBB), so a drift in the
machine's load hits every configuration alike. Each repeat builds its own
topology and removes it, so one crashed daemon spoils one repeat only, and
a configuration that fails is reported as failed while the others go on.

What one repeat measures, A -> B, each step bounded in time:

- TCP, one stream and four (iperf3 -P 4), for `seconds` each: Gbit/s
  received.
- CPU per gigabyte: utime + stime (/proc/PID/stat) of each side's daemon
  and its descendants (wgebpf's attach process and its worker processes;
  plus the reaped children's cutime + cstime, so a worker restarted during
  the run still counts), sampled around the two TCP runs and divided by the
  bytes they delivered: CPU seconds per 10^9 bytes of payload.
- UDP with 64-byte payloads (iperf3 -u -l 64): the highest received packet
  rate at a loss of at most 1 %. A probe at an unlimited offered rate
  gives the saturated receive rate R; the offered rate then starts at
  0.8 R, grows by 1.25 after each pass until a step fails (halves after
  each failure until one passes), then bisects between the highest rate
  that passed and the lowest that failed, for a fixed number of steps.
  The best received rate among the passing steps is reported, and R too
  (as "saturated"). Overload loses packets wherever the slowest stage is,
  so the rate at bounded loss, not R, is the fair comparison.
- Latency: ping -i 0.01 through the idle tunnel: min / avg / max / mdev.

Every value is reported as min / median / max over the repeats; ratios
compare medians with wireguard-go <-> wireguard-go. Results go to
bench.json, bench.md (Markdown tables) and bench.png in the output folder.

With a compared tree (`--compare-tree DIR`, another checkout of wgebpf,
say `git worktree add DIR REV`), each wgebpf configuration runs twice per
repeat, right after each other: once with this code and once with DIR's
(its wgebpf/ and bpf/, through PYTHONPATH). A third table gives this
code's medians over the tree's. Comparing two separate bench runs would
mix the change with the machine's drift between them; alternating inside
one run does not.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import netns

# -- What is compared ---------------------------------------------------------

PAIRINGS: dict[str, tuple[str, str]] = {
    "wgebpf-wgebpf": ("wgebpf", "wgebpf"),
    "wgebpf-wireguard-go": ("wgebpf", "wireguard-go"),     # wgebpf sends
    "wireguard-go-wgebpf": ("wireguard-go", "wgebpf"),     # wgebpf receives
    "wireguard-go-wireguard-go": ("wireguard-go", "wireguard-go"),
}
BASELINE = "wireguard-go-wireguard-go"
SELECTIONS = ("nexthop", "allowedips")

DEFAULT_SYSTEMS = list(PAIRINGS)
DEFAULT_WORKERS = [1, 2]
DEFAULT_SELECTIONS = list(SELECTIONS)
DEFAULT_REPEATS = 3
DEFAULT_SECONDS = 5.0

OUTPUT_FILES = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"
    digits: int  # decimals in the Markdown table


# The metrics of one repeat; the first ones are the table's columns.
METRICS = (
    Metric("tcp1_gbps", "TCP 1 stream", "Gbit/s", "higher", 3),
    Metric("tcp4_gbps", "TCP 4 streams", "Gbit/s", "higher", 3),
    Metric("udp64_kpps", "UDP 64 B, loss <= 1 %", "kpps", "higher", 1),
    Metric("ping_avg_ms", "ping avg", "ms", "lower", 3),
    Metric("cpu_a_s_per_gb", "CPU A (sender)", "s/GB", "lower", 2),
    Metric("cpu_b_s_per_gb", "CPU B (receiver)", "s/GB", "lower", 2),
    Metric("udp64_sat_kpps", "UDP 64 B, saturated", "kpps", "higher", 1),
    Metric("ping_min_ms", "ping min", "ms", "lower", 3),
    Metric("ping_max_ms", "ping max", "ms", "lower", 3),
    Metric("ping_mdev_ms", "ping mdev", "ms", "lower", 3),
)
TABLE_METRICS = METRICS[:6]
METRIC_BY_KEY = {m.key: m for m in METRICS}

UDP_PAYLOAD = 64          # bytes of iperf3 payload per datagram
UDP_MAX_LOSS = 1.0        # percent
UDP_STEP_UP = 1.25        # offered-rate factor after a passing step, until one fails
IPERF3_PORT = 5201
IPERF3_SLACK = 30         # seconds a client may take beyond its -t


@dataclass(frozen=True)
class Setup:
    """One configuration: who runs on A and B, and wgebpf's settings."""

    system: str
    workers: int | None = None      # None for wireguard-go <-> wireguard-go
    selection: str | None = None
    tree: "Tree | None" = None      # run wgebpf from this checkout instead

    @property
    def a(self) -> str:
        return PAIRINGS[self.system][0]

    @property
    def b(self) -> str:
        return PAIRINGS[self.system][1]

    @property
    def id(self) -> str:
        pair = f"{self.a} <-> {self.b}"
        if self.workers is None:
            return pair
        ours = f"{pair}, Workers {self.workers}, {self.selection}"
        return ours if self.tree is None else f"{ours} [{self.tree.label}]"

    @property
    def twin_of(self) -> "Setup":
        """The same configuration with this code."""
        return Setup(self.system, self.workers, self.selection)

    def launch(self) -> dict:
        """How make_side starts the wgebpf sides: with a tree, its code first
        on the path, and started in it (workers of trees before -P in
        pool.launch_process import from their current directory)."""
        if self.tree is None:
            return {}
        path = os.pathsep.join(filter(None, [self.tree.path, os.environ.get("PYTHONPATH")]))
        return {"env": {"PYTHONPATH": path}, "cwd": self.tree.path}

    def extra(self) -> dict[str, str]:
        """wgebpf's own [Interface] keys (ignored by the wireguard-go sides)."""
        if self.workers is None:
            return {}
        return {"Workers": str(self.workers), "PeerSelection": str(self.selection)}


@dataclass(frozen=True)
class Tree:
    """Another checkout of wgebpf to run beside this code."""

    path: str
    label: str      # its git revision, or the folder's name

    @classmethod
    def at(cls, path: str) -> "Tree":
        """The checkout at path; ValueError when it holds no wgebpf to run."""
        path = os.path.abspath(path)
        for needed in ("wgebpf/cli.py", "bpf"):
            if not os.path.exists(os.path.join(path, needed)):
                raise ValueError(f"compare tree {path}: no {needed} there "
                                 "(expected a checkout of wgebpf, e.g. from git worktree add)")
        return cls(path, _revision(path) or os.path.basename(path))


def _revision(path: str) -> str | None:
    """`git describe` of a checkout (with -dirty), or None outside git."""
    try:
        out = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass(frozen=True)
class Plan:
    """How long each measurement runs (iperf3 takes whole seconds)."""

    repeats: int
    seconds: int          # per TCP run
    udp_seconds: int      # per UDP step
    udp_steps: int        # bisection steps after the probe
    ping_count: int
    ping_interval: float = 0.01

    @classmethod
    def make(cls, repeats: int, seconds: float, quick: bool) -> "Plan":
        if quick:
            return cls(repeats=1, seconds=1, udp_seconds=1, udp_steps=2, ping_count=20)
        whole = max(1, math.ceil(seconds))
        return cls(repeats=max(1, repeats), seconds=whole,
                   udp_seconds=max(1, min(2, whole // 2)), udp_steps=3, ping_count=200)

    def estimate(self, n_setups: int) -> float:
        """Rough wall-clock seconds for the whole run (set-up and waits included)."""
        per = 2 * self.seconds + (1 + self.udp_steps) * (self.udp_seconds + 1) \
            + self.ping_count * self.ping_interval + 8
        return per * n_setups * self.repeats


def plan_setups(systems: list[str], workers: list[int], selections: list[str],
                quick: bool = False, tree: Tree | None = None) -> list[Setup]:
    """Every configuration to measure, in schedule order.

    quick keeps the first Workers count and the first selection only, so a
    quick run has one configuration per pairing. With a tree, each wgebpf
    configuration is followed by its twin running the tree's code.
    """
    for system in systems:
        if system not in PAIRINGS:
            raise ValueError(f"unknown system {system!r} (known: {', '.join(PAIRINGS)})")
    for sel in selections:
        if sel not in SELECTIONS:
            raise ValueError(f"unknown PeerSelection {sel!r} (known: {', '.join(SELECTIONS)})")
    for n in workers:
        if not 1 <= n <= 255:
            raise ValueError(f"Workers must be 1..255, not {n}")
    if not systems:
        raise ValueError("no systems to compare")
    if any("wgebpf" in PAIRINGS[s] for s in systems) and not (workers and selections):
        raise ValueError("wgebpf configurations need at least one Workers count and selection")
    if quick:
        workers, selections = workers[:1], selections[:1]
    setups = []
    for system in systems:
        if "wgebpf" not in PAIRINGS[system]:
            setups.append(Setup(system))
            continue
        for n in workers:
            for sel in selections:
                setups.append(Setup(system, n, sel))
                if tree is not None:
                    setups.append(Setup(system, n, sel, tree))
    return setups


# -- CPU time of a daemon and its descendants ---------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2:].split()


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants alive now (every namespace shares our PID space)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime over pid's process tree, in seconds.

    A live descendant counts its own time; one that exited and was reaped
    has moved its time into its parent's cutime/cstime, so nothing is lost
    or counted twice.
    """
    ticks = 0
    for p in process_tree(pid):
        fields = _stat_fields(p)
        if fields:  # fields[11..14] are stat fields 14..17: utime stime cutime cstime
            ticks += sum(int(v) for v in fields[11:15])
    return ticks / CLOCK_TICKS


# -- iperf3 and ping ----------------------------------------------------------


class MeasureError(RuntimeError):
    """One measurement failed; the repeat records it and goes on."""


def _listening(ns: netns.Namespace, port: int) -> bool:
    out = ns.run(["ss", "-Htln", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


@contextlib.contextmanager
def iperf3_server(ns: netns.Namespace, port: int = IPERF3_PORT) -> Iterator[None]:
    """A one-off iperf3 server (-1) in ns, stopped on exit whatever happened."""
    proc = ns.popen(["iperf3", "-s", "-1", "-p", str(port)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not netns.wait_until(lambda: _listening(ns, port) or proc.poll() is not None, 10):
            raise MeasureError("iperf3 server did not start listening")
        if proc.poll() is not None:
            raise MeasureError(f"iperf3 server exited {proc.returncode}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def iperf3_client(ns: netns.Namespace, addr: str, seconds: int, *args: str,
                  port: int = IPERF3_PORT) -> dict:
    """iperf3 -c addr for `seconds` (whole seconds), its JSON report."""
    argv = ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "5000", *args]
    try:
        out = ns.run(argv, check=False, timeout=seconds + IPERF3_SLACK)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"iperf3 {' '.join(args)} took over {seconds + IPERF3_SLACK} s")
    try:
        data = json.loads(out.stdout or "{}")
    except json.JSONDecodeError:
        data = {}
    if out.returncode != 0 or "error" in data or "end" not in data:
        raise MeasureError(f"iperf3 {' '.join(args)}: "
                           f"{data.get('error') or out.stderr.strip() or 'no report'}")
    return data


def iperf3_run(client: netns.Namespace, server: netns.Namespace, addr: str,
               seconds: int, *args: str) -> dict:
    with iperf3_server(server):
        return iperf3_client(client, addr, seconds, *args)


def measure_tcp(pair: "Pair", streams: int, seconds: int) -> dict:
    """TCP A -> B with `streams` parallel streams; bytes, Gbit/s, CPU of each side."""
    with iperf3_server(pair.topo.b):
        cpu_a, cpu_b = pair.cpu()
        data = iperf3_client(pair.topo.a, netns.B_TUNNEL4, seconds, "-P", str(streams))
        cpu_a2, cpu_b2 = pair.cpu()
    received = data["end"]["sum_received"]
    if received["bytes"] <= 0:
        raise MeasureError(f"TCP x{streams}: no bytes arrived")
    return {"bytes": int(received["bytes"]),
            "gbps": received["bits_per_second"] / 1e9,
            "cpu_a_s": cpu_a2 - cpu_a, "cpu_b_s": cpu_b2 - cpu_b}


def _udp_step(pair: "Pair", seconds: int, offered_pps: float | None) -> dict:
    """One iperf3 UDP run at offered_pps (None: unlimited)."""
    rate = "0" if offered_pps is None else str(int(offered_pps * UDP_PAYLOAD * 8))
    data = iperf3_run(pair.topo.a, pair.topo.b, netns.B_TUNNEL4, seconds,
                      "-u", "-l", str(UDP_PAYLOAD), "-b", rate)
    sent, got = data["end"]["sum_sent"], data["end"]["sum_received"]
    received = max(0, got["packets"] - got["lost_packets"])
    return {"offered_pps": offered_pps,
            "sent_pps": sent["packets"] / max(sent["seconds"], 1e-9),
            "received_pps": received / max(got["seconds"], 1e-9),
            "loss_percent": float(got["lost_percent"])}


def measure_udp(pair: "Pair", seconds: int, steps: int) -> dict:
    """The highest received rate at <= 1 % loss; see the module docstring."""
    probe = _udp_step(pair, seconds, None)
    tried = [probe]
    saturated = probe["received_pps"]
    if saturated <= 0:
        raise MeasureError("UDP: nothing arrived at an unlimited offered rate")
    best = probe if probe["loss_percent"] <= UDP_MAX_LOSS else None
    # The probe's own offered rate bounds nothing useful (the sender outruns
    # everything), so the upper bound stays open until a step fails.
    lo, hi = 0.0, None
    offered = 0.8 * saturated
    for _ in range(0 if best else steps):
        time.sleep(0.3)  # let the previous step's queues drain
        step = _udp_step(pair, seconds, offered)
        tried.append(step)
        if step["loss_percent"] <= UDP_MAX_LOSS:
            if best is None or step["received_pps"] > best["received_pps"]:
                best = step
            lo = offered
            offered = offered * UDP_STEP_UP if hi is None else (lo + hi) / 2
        else:
            hi = offered
            offered = (lo + hi) / 2 if lo > 0 else offered / 2
    if best is None:
        last = tried[-1]
        raise MeasureError(f"UDP: no offered rate had loss <= {UDP_MAX_LOSS:g} % in "
                           f"{len(tried)} steps (last: {last['offered_pps']:.0f} pps, "
                           f"{last['loss_percent']:.1f} % lost)")
    return {"pps": best["received_pps"], "saturated_pps": saturated, "best": best,
            "steps": tried}


_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def measure_ping(pair: "Pair", count: int, interval: float) -> dict:
    """ping A -> B: min/avg/max/mdev in ms and the loss."""
    deadline = math.ceil(count * interval) + 5
    out = pair.topo.a.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval),
                           "-w", str(deadline), netns.B_TUNNEL4],
                          check=False, timeout=deadline + 10)
    match = _RTT.search(out.stdout)
    if not match:
        raise MeasureError(f"ping: no replies ({out.stdout.strip() or out.stderr.strip()})")
    sent, got = netns.ping_stats(out.stdout)
    lo, avg, hi, mdev = map(float, match.groups())
    return {"min_ms": lo, "avg_ms": avg, "max_ms": hi, "mdev_ms": mdev,
            "sent": sent, "received": got}


# -- One repeat of one configuration ------------------------------------------


class Pair:
    """A fresh topology with the two sides of a Setup running."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.topo = netns.TwoHosts()
        try:
            a_cfg, b_cfg = netns.side_configs()
            a_cfg.extra.update(setup.extra())
            b_cfg.extra.update(setup.extra())
            self.b = self.topo.track(netns.make_side(
                setup.b, self.topo.b, b_cfg, underlay=self.topo.underlay_b, tag="wgb",
                **setup.launch()))
            self.b.start()
            self.a = self.topo.track(netns.make_side(
                setup.a, self.topo.a, a_cfg, underlay=self.topo.underlay_a, tag="wga",
                **setup.launch()))
            self.a.start()
            # The first ping also makes the handshake, outside every measurement.
            if not netns.ping(self.topo.a, netns.B_TUNNEL4, count=3, timeout=10):
                raise MeasureError("no ping through the tunnel after start")
        except Exception as exc:
            exc.daemon_logs = self.logs()   # the reason is there, and gone after close
            self.close()
            raise

    def cpu(self) -> tuple[float, float]:
        return cpu_seconds(self.a.pid), cpu_seconds(self.b.pid)

    def alive(self) -> str | None:
        """None when both daemons still run, else which one died."""
        for side, name in ((self.a, "A"), (self.b, "B")):
            if side.proc is None or side.proc.poll() is not None:
                return f"{name} ({side.kind}) exited"
        return None

    def logs(self, limit: int = 2000) -> str:
        return self.topo.logs()[-limit:]

    def close(self) -> None:
        self.topo.close()


def _step(errors: dict, name: str, fn: Callable[[], dict], pair: Pair) -> dict | None:
    """Run one measurement; a failure is recorded under `name`, not raised."""
    try:
        result = fn()
    except (MeasureError, netns.CommandError, subprocess.TimeoutExpired,
            KeyError, ValueError) as exc:
        dead = pair.alive()
        errors[name] = f"{exc}" + (f"; {dead}" if dead else "")
        return None
    return result


def run_repeat(setup: Setup, plan: Plan) -> dict:
    """All measurements of one repeat: {"values": {metric: v}, "errors": {...}, ...}."""
    values: dict[str, float] = {}
    errors: dict[str, str] = {}
    detail: dict[str, dict] = {}
    started = time.monotonic()
    try:
        pair = Pair(setup)
    except Exception as exc:  # any set-up failure fails this repeat only
        errors = {"setup": f"{type(exc).__name__}: {exc}"}
        if getattr(exc, "daemon_logs", ""):
            errors["log"] = exc.daemon_logs
        return {"values": {}, "errors": errors,
                "detail": {}, "seconds": time.monotonic() - started}
    try:
        tcp = {}
        for streams, key in ((1, "tcp1"), (4, "tcp4")):
            r = _step(errors, key, lambda: measure_tcp(pair, streams, plan.seconds),
                      pair)
            if r:
                tcp[key] = detail[key] = r
                values[f"{key}_gbps"] = r["gbps"]
        if tcp:  # CPU per GB over whichever TCP runs succeeded
            moved = sum(r["bytes"] for r in tcp.values()) / 1e9
            values["cpu_a_s_per_gb"] = sum(r["cpu_a_s"] for r in tcp.values()) / moved
            values["cpu_b_s_per_gb"] = sum(r["cpu_b_s"] for r in tcp.values()) / moved
        else:
            errors["cpu"] = "no TCP run succeeded"
        r = _step(errors, "udp64",
                  lambda: measure_udp(pair, plan.udp_seconds, plan.udp_steps), pair)
        if r:
            detail["udp64"] = r
            values["udp64_kpps"] = r["pps"] / 1e3
            values["udp64_sat_kpps"] = r["saturated_pps"] / 1e3
        r = _step(errors, "ping",
                  lambda: measure_ping(pair, plan.ping_count, plan.ping_interval), pair)
        if r:
            detail["ping"] = r
            for k in ("min", "avg", "max", "mdev"):
                values[f"ping_{k}_ms"] = r[f"{k}_ms"]
        if errors:
            errors["log"] = pair.logs()
    finally:
        pair.close()
    return {"values": values, "errors": errors, "detail": detail,
            "seconds": time.monotonic() - started}


# -- The whole run --------------------------------------------------------------


def summarize(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values),
            "max": max(values), "n": len(values)}


def _status(runs: list[dict]) -> str:
    metric_keys = {m.key for m in METRICS}
    complete = sum(1 for r in runs if metric_keys <= r["values"].keys())
    if complete == len(runs):
        return "ok"
    return "failed" if not any(r["values"] for r in runs) else "partial"


def _ratio_row(ours: dict, theirs: dict) -> dict[str, float]:
    """ours' median / theirs' median for every metric both have."""
    row = {}
    for m in METRICS:
        a, b = ours["summary"].get(m.key), theirs["summary"].get(m.key)
        if a and b and b["median"] > 0:
            row[m.key] = a["median"] / b["median"]
    return row


def ratios(configs: list[dict]) -> dict[str, dict[str, float]]:
    """Each configuration's medians over the baseline's."""
    base = next((c for c in configs if c["system"] == BASELINE), None)
    if base is None:
        return {}
    return {c["id"]: _ratio_row(c, base) for c in configs if c["system"] != BASELINE}


def tree_ratios(configs: list[dict]) -> dict[str, dict[str, float]]:
    """This code's medians over its twin's on the compared tree."""
    by_id = {c["id"]: c for c in configs}
    return {c["twin_of"]: _ratio_row(by_id[c["twin_of"]], c)
            for c in configs if c.get("twin_of") in by_id}


def _machine() -> dict:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(),
            "wireguard_go": version(["wireguard-go", "--version"]),
            "iperf3": version(["iperf3", "--version"])}


def _command() -> str:
    if Path(sys.argv[0]).name == "wgebpf":
        return shlex.join(["wgebpf", *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def _log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _time_left(t0: float, done: int, total: int, plan: "Plan", setups: list) -> str:
    """About how long the rest takes: the plan's estimate until a run has
    finished, then the mean of the runs so far."""
    if done:
        per = (time.monotonic() - t0) / done
    else:
        per = plan.estimate(len(setups)) / total
    return f"about {math.ceil(per * (total - done) / 60)} min left"


def _progress(text: str) -> None:
    """What runs now: one line rewritten in place on a terminal, a plain line
    otherwise (a log file or CI keeps every one)."""
    if sys.stderr.isatty():
        print(f"\r\033[Kbench: {text}", end="", file=sys.stderr, flush=True)
    else:
        _log(text)


def _brief(values: dict) -> str:
    parts = []
    for key, fmt in (("tcp1_gbps", "tcp1 {:.2f} Gbit/s"), ("tcp4_gbps", "tcp4 {:.2f} Gbit/s"),
                     ("udp64_kpps", "udp {:.0f} kpps"), ("ping_avg_ms", "ping {:.3f} ms"),
                     ("cpu_a_s_per_gb", "cpu A {:.1f} s/GB"),
                     ("cpu_b_s_per_gb", "cpu B {:.1f} s/GB")):
        if key in values:
            parts.append(fmt.format(values[key]))
    return ", ".join(parts)


def run(output_dir: str, systems: list[str], workers: list[int], selections: list[str],
        repeats: int, seconds: float, quick: bool, tree: Tree | None = None) -> dict:
    """Measure every configuration (round-robin over repeats), write
    bench.json, bench.md and bench.png into output_dir, return the result."""
    setups = plan_setups(list(systems), list(workers), list(selections), quick, tree)
    plan = Plan.make(repeats, seconds, quick)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _log(f"{len(setups)} configurations x {plan.repeats} repeats, about "
         f"{plan.estimate(len(setups)) / 60:.0f} min; results in {out}")
    started, t0 = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    load_before = os.getloadavg()
    runs: dict[Setup, list[dict]] = {s: [] for s in setups}
    total, done = plan.repeats * len(setups), 0
    for rep in range(1, plan.repeats + 1):
        for setup in setups:
            _progress(f"[{rep}/{plan.repeats}] running {setup.id}; "
                      f"{done} of {total} runs done, {_time_left(t0, done, total, plan, setups)}")
            result = run_repeat(setup, plan)
            done += 1
            # Other work on the machine skews a repeat: keep the evidence with it.
            result["repeat"], result["loadavg_1min"] = rep, round(os.getloadavg()[0], 2)
            runs[setup].append(result)
            failed = ", ".join(k for k in result["errors"] if k != "log")
            if sys.stderr.isatty():
                print("\r\033[K", end="", file=sys.stderr)
            _log(f"[{rep}/{plan.repeats}] {setup.id}: {_brief(result['values'])}"
                 + (f"  FAILED: {failed}" if failed else ""))
    configs = []
    for setup in setups:
        rs = runs[setup]
        summary = {m.key: summarize([r["values"][m.key] for r in rs if m.key in r["values"]])
                   for m in METRICS}
        configs.append({
            "id": setup.id, "system": setup.system, "a": setup.a, "b": setup.b,
            "workers": setup.workers, "selection": setup.selection,
            "tree": setup.tree and setup.tree.path,
            "twin_of": setup.tree and setup.twin_of.id,
            "status": _status(rs),
            "summary": {k: v for k, v in summary.items() if v is not None},
            "runs": rs,
        })
    result = {
        "version": 1,
        "command": _command(),
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "machine": dict(_machine(), loadavg_before=load_before,
                        loadavg_after=os.getloadavg()),
        "parameters": {"systems": list(systems), "workers": list(workers),
                       "selections": list(selections), "quick": quick,
                       "compare_tree": tree and {"path": tree.path, "label": tree.label},
                       "repeats": plan.repeats, "tcp_seconds": plan.seconds,
                       "udp_step_seconds": plan.udp_seconds, "udp_steps": plan.udp_steps,
                       "udp_payload_bytes": UDP_PAYLOAD, "udp_max_loss_percent": UDP_MAX_LOSS,
                       "ping_count": plan.ping_count, "ping_interval_s": plan.ping_interval,
                       "direction": "A -> B"},
        "metrics": {m.key: {"label": m.label, "unit": m.unit, "better": m.better}
                    for m in METRICS},
        "baseline": BASELINE,
        "configurations": configs,
    }
    result["ratios"] = ratios(configs)
    result["tree_ratios"] = tree_ratios(configs)
    result["files"] = {k: str(out / v) for k, v in OUTPUT_FILES.items()}
    (out / OUTPUT_FILES["json"]).write_text(json.dumps(result, indent=2) + "\n")
    (out / OUTPUT_FILES["markdown"]).write_text(render_markdown(result))
    render_plot(result, out / OUTPUT_FILES["plot"])
    _log(f"done in {result['duration_s'] / 60:.1f} min: "
         + ", ".join(str(out / v) for v in OUTPUT_FILES.values()))
    return result


# -- Reporting ------------------------------------------------------------------


def _cell(summary: dict | None, digits: int) -> str:
    if not summary:
        return "failed"
    f = f"{{:.{digits}f}}"
    return (f"{f.format(summary['median'])} "
            f"({f.format(summary['min'])}–{f.format(summary['max'])})")


def render_markdown(result: dict) -> str:
    """The comparison as Markdown: medians with (min–max), then ratios."""
    p = result["parameters"]
    lines = [
        f"Median (min–max) of {p['repeats']} repeat(s), traffic A -> B; "
        f"TCP {p['tcp_seconds']} s per run; UDP: highest received rate with "
        f"<= {p['udp_max_loss_percent']:g} % loss, {p['udp_payload_bytes']}-byte payloads; "
        f"ping: {p['ping_count']} at {p['ping_interval_s']:g} s; CPU: seconds of the "
        f"daemon's processes per 10^9 bytes over the TCP runs.",
        "",
        "| Configuration | " + " | ".join(f"{m.label} ({m.unit})" for m in TABLE_METRICS)
        + " |",
        "| --- |" + " ---: |" * len(TABLE_METRICS),
    ]
    failures = []
    for c in result["configurations"]:
        name = c["id"] + ("" if c["status"] == "ok" else f" **{c['status']}**")
        cells = [_cell(c["summary"].get(m.key), m.digits) for m in TABLE_METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for r in c["runs"]:
            for what, err in r["errors"].items():
                if what != "log":
                    failures.append(f"- {c['id']}, repeat {r['repeat']}, {what}: "
                                    f"{err.splitlines()[0][:200]}")
    if result.get("ratios"):
        lines += _ratio_table(f"Ratio of medians to {Setup(BASELINE).id} "
                              "(above 1: more throughput, or more latency / CPU):",
                              result["ratios"])
    if result.get("tree_ratios"):
        label = result["parameters"]["compare_tree"]["label"]
        lines += _ratio_table(f"Ratio of this code's medians to the same configuration on "
                              f"the compared tree {label}, measured alternating in this run "
                              "(above 1: more throughput, or more latency / CPU):",
                              result["tree_ratios"])
    if failures:
        lines += ["", "Failures:", "", *failures]
    return "\n".join(lines) + "\n"


def _ratio_table(title: str, rows: dict[str, dict[str, float]]) -> list[str]:
    lines = ["", title, "",
             "| Configuration | " + " | ".join(m.label for m in TABLE_METRICS) + " |",
             "| --- |" + " ---: |" * len(TABLE_METRICS)]
    for cid, row in rows.items():
        cells = [f"{row[m.key]:.2f}" if m.key in row else "-" for m in TABLE_METRICS]
        lines.append(f"| {cid} | " + " | ".join(cells) + " |")
    return lines


_COLOURS = {"wgebpf-wgebpf": "#1f77b4", "wgebpf-wireguard-go": "#2ca02c",
            "wireguard-go-wgebpf": "#ff7f0e", "wireguard-go-wireguard-go": "#7f7f7f"}


# matplotlib is the optional extra `bench` (pyproject.toml): only the plot
# needs it, so it is imported here, lazily, and checked before anything runs.
MATPLOTLIB_MISSING = "wgebpf bench needs matplotlib: pip install 'wgebpf[bench]'"


class MissingDependency(RuntimeError):
    """An optional dependency bench needs is not installed; str() is one line."""


def figure_class():
    """matplotlib's Figure (no pyplot: no GUI backend, no global state), or
    MissingDependency when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency(MATPLOTLIB_MISSING) from None
    return Figure


def render_plot(result: dict, path: Path) -> None:
    """Horizontal bars (median, whiskers min..max), one panel per table metric."""
    Figure = figure_class()

    configs = result["configurations"]
    labels = [c["id"].replace(", Workers", "\nWorkers") for c in configs]
    rows, cols = 2, 3
    fig = Figure(figsize=(15, 2.2 + 0.55 * len(configs) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True)
    ys = list(range(len(configs)))
    for ax, m in zip(axes.flat, TABLE_METRICS):
        for y, c in zip(ys, configs):
            s = c["summary"].get(m.key)
            if not s:
                ax.text(0, y, " failed", va="center", color="red")
                continue
            # The compared tree's twin: the same colour, hatched.
            ax.barh(y, s["median"], color=_COLOURS.get(c["system"], "C0"),
                    hatch="//" if c.get("tree") else None, edgecolor="white",
                    xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], capsize=3)
        ax.set_title(f"{m.label} ({m.unit}), {m.better} is better", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(ys, labels, fontsize=8)
    axes.flat[0].invert_yaxis()  # shared y: the first configuration on top everywhere
    p = result["parameters"]
    fig.suptitle(f"wgebpf bench: median, whiskers min–max of {p['repeats']} repeat(s); "
                 f"{result['machine']['cpus']} CPUs, kernel {result['machine']['kernel']}",
                 fontsize=11)
    fig.savefig(path, dpi=100)


# -- Entry point ----------------------------------------------------------------


def _int_list(value) -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [int(v) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"workers: expected whole numbers like 1,2, not {value!r}") from None


def _str_list(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def main(**options) -> int:
    """`wgebpf bench`: run, write the files, print the Markdown table.

    Options (all optional): output_dir (or output), systems, workers,
    selections (lists, or comma-separated strings), repeats, seconds, quick,
    compare_tree (a checkout of wgebpf to run beside this code).
    Returns 0 when every configuration produced results, 1 when one failed
    completely or bench could not run, 2 for bad options or a missing
    matplotlib (the `bench` extra).
    """
    def opt(name: str, default):
        value = options.get(name)
        return default if value is None else value

    try:
        kwargs = dict(
            output_dir=str(opt("output_dir", opt("output", "bench-out"))),
            systems=_str_list(opt("systems", DEFAULT_SYSTEMS)),
            workers=_int_list(opt("workers", DEFAULT_WORKERS)),
            selections=_str_list(opt("selections", DEFAULT_SELECTIONS)),
            repeats=int(opt("repeats", DEFAULT_REPEATS)),
            seconds=float(opt("seconds", DEFAULT_SECONDS)),
            quick=bool(opt("quick", False)),
            tree=Tree.at(str(options["compare_tree"])) if options.get("compare_tree") else None)
        plan_setups(kwargs["systems"], kwargs["workers"], kwargs["selections"])
        if kwargs["repeats"] < 1 or kwargs["seconds"] <= 0:
            raise ValueError("repeats and seconds must be positive")
    except ValueError as exc:
        print(f"wgebpf bench: {exc}", file=sys.stderr)
        return 2
    try:
        figure_class()      # now, not after minutes of measuring
    except MissingDependency as exc:
        print(exc, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("wgebpf bench needs root (network namespaces): sudo wgebpf bench",
              file=sys.stderr)
        return 1
    try:
        result = run(**kwargs)
    except (OSError, netns.CommandError) as exc:
        print(f"wgebpf bench: {exc}", file=sys.stderr)
        return 1
    finally:
        netns.close_all()
    print(render_markdown(result), end="")
    return 1 if any(c["status"] == "failed" for c in result["configurations"]) else 0


if __name__ == "__main__":
    sys.exit(main())
