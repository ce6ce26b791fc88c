"""`python -m wgebpf.lab.scale --peers N`: wgebpf with N peers on one interface.

The topology: a LAN (wgebpf.lab.netns.Lan) joining three namespaces.

    netns A: wgebpf, N peers        netns B: wireguard-go       netns S: the swarm
      192.0.2.1  UDP 51820            192.0.2.2  UDP 51821         192.0.2.32 .. (one
      198.51.100.1/24                 = peer 0 of A's config       address per ~K/200
      2001:db8:100::1/64              198.51.100.2                 peers), peers 1..K
      the sink (UDP 9999)             2001:db8:100::1:0            (wgebpf/lab/swarm.py)
            \\______________________________|______________________________/
                                     LAN (a bridge)

Addresses of the N peers (all on-link on A's interface, so Table = auto adds
no route per peer, and N is not limited by the documentation prefixes):
peer i has the IPv6 /128 2001:db8:100::1:0 + i (2001:db8:100::/64 holds any
N), and the IPv4 /32 198.51.100.(2 + i) for i < IPV4_PEERS only, since
198.51.100.0/24 has no room for more. Every peer has a key of its own, no
endpoint (A learns it), PeerSelection = nexthop and the SourcePolicy given
(--source-policy, default allowedips): the swarm's packets come from each
peer's own /128, so every policy accepts them.

What it measures (each can be skipped with --skip NAME):
  load        `wgebpf attach` start to UAPI answering, and to all N peers in
              `wg show NAME peers`; at N and at a baseline of a few peers
  memory      RSS and PSS of the control plane and each worker, and the
              memlock of the instance's eBPF maps (/proc/PID/fdinfo of their
              fds, names from bpftool), at the baseline, at N, and at N with
              K sessions: bytes per peer
  show        `wg show NAME`, `wg showconf NAME` and a Prometheus scrape:
              seconds and bytes, idle and after the handshakes
  handshakes  the swarm impersonates K peers, all initiating at once from
              many source addresses: completions a second, time to all
  throughput  iperf3 TCP A -> B (wireguard-go) with and without M swarm
              peers each sending a small packet a second, alternating
  churn       `wg set NAME peer KEY allowed-ips ...` and `... remove`, timed,
              while a ping A -> B runs; lost pings are counted
The trickle's delivery (every trickling peer's rx in `wg show` grew, the sink
heard from each) is checked whether or not throughput is measured. The swarm
starts with the handshakes step: skipping it skips throughput and the trickle.
Handshakes all at once exceed the responder's under-load threshold (64 a
second), so most peers first get a cookie reply and complete on their retry
REKEY_TIMEOUT later, as real peers would: `peak_completions_1s` is then the
closer figure for the control plane's capacity (or pace them with --rate).

Everything is bounded: each wait has a time limit scaled with N, the swarm
and the sink exit on their own after a limit, and every namespace goes at
exit. Results: progress lines on stdout, the report as JSON (--json FILE).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..wireguard import keys
from . import bench, netns

A_UNDERLAY, B_UNDERLAY = "192.0.2.1", "192.0.2.2"
SWARM_FIRST_SOURCE = 32          # the swarm's addresses: 192.0.2.32 upwards
SWARM_MAX_SOURCES = 200
A_PORT, B_PORT = 51820, 51821
A_TUNNEL4, A_TUNNEL6 = "198.51.100.1", "2001:db8:100::1"
PEER6_BASE = ipaddress.IPv6Address("2001:db8:100::1:0")     # peer i: + i
EXTRA6_BASE = ipaddress.IPv6Address("2001:db8:100::2:0")    # peers added by churn
IPV4_PEERS = 250                 # 198.51.100.2 .. .251
SINK_PORT = 9999
METRICS_PORT = 9586
MAX_PEERS = 70_000               # keys and addresses are made for at most this many
STEPS = ("baseline", "load", "memory", "show", "handshakes", "throughput", "churn")


def log(text: str) -> None:
    print(f"[scale {time.monotonic() - _T0:7.1f}s] {text}", flush=True)


_T0 = time.monotonic()


# -- Peers and configs ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerKey:
    number: int
    private: str
    public: str

    @property
    def v6(self) -> str:
        return str(PEER6_BASE + self.number)

    @property
    def v4(self) -> str | None:
        return f"198.51.100.{2 + self.number}" if self.number < IPV4_PEERS else None

    def allowed_ips(self) -> list[str]:
        return [f"{self.v4}/32"] * (self.v4 is not None) + [f"{self.v6}/128"]


def make_keys(count: int, first: int = 0) -> list[PeerKey]:
    """Fresh key pairs, made in-process (10,000 `wg genkey` runs take a minute)."""
    out = []
    for number in range(first, first + count):
        private = keys.generate_private_key()
        out.append(PeerKey(number, keys.encode(private), keys.encode(keys.public_key(private))))
    return out


def a_config(private: str, peers: list[PeerKey], opts: "Options") -> str:
    """A's wgebpf config, rendered straight to text (N peers of a few lines each)."""
    lines = ["[Interface]", f"PrivateKey = {private}", f"ListenPort = {A_PORT}",
             f"Address = {A_TUNNEL4}/24, {A_TUNNEL6}/64", "PeerSelection = nexthop",
             f"SourcePolicy = {opts.source_policy}", f"Metrics = 127.0.0.1:{METRICS_PORT}"]
    if opts.workers:
        lines.append(f"Workers = {opts.workers}")
    for peer in peers:
        lines += ["", "[Peer]", f"PublicKey = {peer.public}",
                  f"AllowedIPs = {', '.join(peer.allowed_ips())}"]
        if peer.number == 0:
            lines.append(f"Endpoint = {B_UNDERLAY}:{B_PORT}")
    return "\n".join(lines) + "\n"


def b_config(b: PeerKey, a_private: str) -> netns.InterfaceConfig:
    """wireguard-go B, which is peer 0 of A."""
    cfg = netns.InterfaceConfig(b.private, B_PORT, [f"{b.v4}/24", f"{b.v6}/64"])
    a_public = keys.encode(keys.public_key(keys.decode(a_private)))
    cfg.peers.append(netns.PeerConfig(a_public, [f"{A_TUNNEL4}/32", f"{A_TUNNEL6}/128"],
                                      f"{A_UNDERLAY}:{A_PORT}"))
    return cfg


# -- Options -------------------------------------------------------------------------------


@dataclass
class Options:
    peers: int
    trickle: int
    handshakes: int
    baseline: int = 10
    workers: int | None = None
    source_policy: str = "allowedips"
    skip: frozenset = frozenset()
    seconds: int = 5                 # per iperf3 run
    repeats: int = 3                 # of each throughput condition
    trickle_period: float = 1.0
    churn_rounds: int = 5
    rate: float = 0.0                # swarm initiations a second, 0 = all at once
    retry_after: float = 5.0         # REKEY_TIMEOUT, as a real peer
    trickle_check_seconds: float = 3.0

    @property
    def swarm(self) -> int:
        """Swarm size: enough peers for both the handshakes and the trickle."""
        return min(self.peers - 1, max(self.handshakes, self.trickle))

    def load_timeout(self, peers: int) -> float:
        return 60 + peers * 0.05

    def handshake_timeout(self) -> float:
        return 30 + self.swarm / 20


# -- Processes that talk JSON lines ----------------------------------------------------


class LineProcess:
    """A process in a namespace that takes commands on stdin and prints one JSON
    object per line; a thread queues the lines so waits have time limits."""

    def __init__(self, ns: netns.Namespace, argv: list[str], on_progress=None):
        self.proc = ns.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.on_progress = on_progress or (lambda event: None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.lines.put({"event": "garbage", "line": line})
        self.lines.put({"event": "eof"})

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, event: str, timeout: float) -> dict:
        """The next line of kind `event`; others go to on_progress."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise bench.MeasureError(f"no {event!r} within {timeout:.0f} s")
            if item["event"] == event:
                return item
            if item["event"] == "eof":
                raise bench.MeasureError(f"exited before {event!r}: {self.stderr()}")
            self.on_progress(item)

    def ask(self, command: str, event: str, timeout: float = 10) -> dict:
        self.send(command)
        return self.wait(event, timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return (self.proc.stderr.read() or "")[-2000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        netns._stop_process(self.proc, signal.SIGTERM, 5)


def module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "wgebpf.lab.swarm", *args]


# -- The topology ----------------------------------------------------------------------


class Topology:
    """A, B and the swarm's namespace S on one LAN (see the module docstring)."""

    def __init__(self, swarm_sources: int):
        self.lan = netns.Lan()
        self.a = netns.Namespace("a")
        self.b = netns.Namespace("b")
        self.s = netns.Namespace("s")
        self.underlay_a = self.lan.join(self.a, [f"{A_UNDERLAY}/24"])
        self.underlay_b = self.lan.join(self.b, [f"{B_UNDERLAY}/24"])
        self.sources = [f"192.0.2.{SWARM_FIRST_SOURCE + i}" for i in range(swarm_sources)]
        self.underlay_s = self.lan.join(self.s, [f"{self.sources[0]}/24"])
        batch = "".join(f"addr add {addr}/24 dev {self.underlay_s}\n"
                        for addr in self.sources[1:])
        netns.run(["ip", "-n", self.s.name, "-batch", "-"], input=batch)

    def close(self) -> None:
        for ns in (self.s, self.b, self.a):
            ns.close()
        self.lan.close()


# -- Measuring one instance ----------------------------------------------------------


def wg_peers(side: netns.Wgebpf) -> int:
    out = side.ns.run(["wg", "show", side.ifname, "peers"], check=False, timeout=120)
    return len(out.stdout.split()) if out.returncode == 0 else -1


def attach(topo: Topology, a_private: str, peers: list[PeerKey], opts: Options
           ) -> tuple[netns.Wgebpf, dict]:
    """Start wgebpf with `peers`; time to UAPI and to all peers visible."""
    text = a_config(a_private, peers, opts)
    cfg = netns.InterfaceConfig(a_private)
    side = netns.Wgebpf(topo.a, netns.unique_ifname("wgs"), cfg, topo.underlay_a,
                        config_text=text)
    timeout = opts.load_timeout(len(peers))
    t0 = time.monotonic()
    side.start(timeout)
    uapi = time.monotonic() - t0
    if not netns.wait_until(lambda: wg_peers(side) >= len(peers), timeout, 0.05):
        raise bench.MeasureError(f"{wg_peers(side)} of {len(peers)} peers visible "
                                 f"after {timeout:.0f} s")
    return side, {"peers": len(peers), "config_bytes": len(text), "uapi_s": uapi,
                  "all_peers_s": time.monotonic() - t0}


def proc_memory(pid: int) -> dict | None:
    """Rss and Pss of one process, in bytes (smaps_rollup)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {m[1].lower(): int(m[2]) * 1024
              for m in re.finditer(r"^(Rss|Pss):\s+(\d+) kB", text, re.M)}
    return {"pid": pid, "rss": values.get("rss", 0), "pss": values.get("pss", 0)}


def bpf_maps(pids: list[int]) -> dict:
    """The eBPF maps the processes hold fds of, deduplicated by id: memlock from
    /proc/PID/fdinfo (the kernel's charge for each map), names from bpftool."""
    maps: dict[int, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            try:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            mid, mem = re.search(r"^map_id:\s+(\d+)", info, re.M), \
                re.search(r"^memlock:\s+(\d+)", info, re.M)
            if mid and mem:
                maps[int(mid[1])] = int(mem[1])
    names = {m["id"]: m.get("name", "?") for m in bench_bpftool_maps()}
    by_name: dict[str, int] = {}
    for mid, mem in maps.items():
        by_name[names.get(mid, f"id{mid}")] = by_name.get(names.get(mid, f"id{mid}"), 0) + mem
    return {"count": len(maps), "memlock": sum(maps.values()), "by_name": by_name}


def bench_bpftool_maps() -> list[dict]:
    out = netns.run(["bpftool", "-j", "map", "show"], check=False, timeout=60)
    try:
        return json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return []


def memory(side: netns.Wgebpf) -> dict:
    """Memory of the control plane, each worker (its children) and the maps."""
    pids = bench.process_tree(side.pid)
    procs = [m for m in map(proc_memory, pids) if m]
    control = next(m for m in procs if m["pid"] == side.pid)
    workers = [m for m in procs if m["pid"] != side.pid]
    maps = bpf_maps([m["pid"] for m in procs])
    return {"control": control, "workers": workers, "bpf": maps,
            "rss": sum(m["rss"] for m in procs), "pss": sum(m["pss"] for m in procs)}


def per_peer(small: dict, large: dict, peers: int) -> dict:
    """Bytes per peer between two memory figures `peers` peers apart."""
    def slope(a: float, b: float) -> float:
        return (b - a) / peers if peers else 0.0
    wk = lambda m, k: sum(w[k] for w in m["workers"])     # noqa: E731
    return {"control_rss": slope(small["control"]["rss"], large["control"]["rss"]),
            "control_pss": slope(small["control"]["pss"], large["control"]["pss"]),
            "workers_rss": slope(wk(small, "rss"), wk(large, "rss")),
            "workers_pss": slope(wk(small, "pss"), wk(large, "pss")),
            "bpf_memlock": slope(small["bpf"]["memlock"], large["bpf"]["memlock"]),
            "total_pss": slope(small["pss"], large["pss"]) +
            slope(small["bpf"]["memlock"], large["bpf"]["memlock"])}


def timed(ns: netns.Namespace, argv: list[str], repeats: int = 3) -> dict:
    """Median wall time and output bytes of a command run `repeats` times."""
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.monotonic()
        out = subprocess.run(ns._argv(argv), capture_output=True, timeout=300)
        times.append(time.monotonic() - t0)
        if out.returncode != 0:
            raise bench.MeasureError(f"{' '.join(argv)}: {out.stderr.decode()[-300:]}")
        size = len(out.stdout)
    return {"seconds": statistics.median(times), "max_seconds": max(times), "bytes": size}


def show_times(side: netns.Wgebpf) -> dict:
    url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
    return {"wg_show": timed(side.ns, ["wg", "show", side.ifname]),
            "wg_showconf": timed(side.ns, ["wg", "showconf", side.ifname]),
            "wg_show_dump": timed(side.ns, ["wg", "show", side.ifname, "dump"]),
            "metrics": timed(side.ns, ["curl", "-sf", "--max-time", "60", url])}


# -- The swarm ---------------------------------------------------------------------------


def swarm_spec(topo: Topology, a_public: str, swarm: list[PeerKey], opts: Options) -> dict:
    return {"server": [A_UNDERLAY, A_PORT], "server_public_key": a_public,
            "sources": topo.sources, "mtu": 1420,
            "inner_destination": A_TUNNEL6, "sink_port": SINK_PORT,
            "peers": [[p.private, p.v6] for p in swarm],
            "trickle_peers": opts.trickle, "rate": opts.rate,
            "retry_after": opts.retry_after,
            "handshake_timeout": opts.handshake_timeout(),
            "max_seconds": 600 + opts.handshake_timeout() + 4 * opts.repeats * (
                opts.seconds + 10)}


def start_swarm(topo: Topology, spec: dict, tmp: Path) -> LineProcess:
    path = tmp / "swarm.json"
    path.touch(0o600)                      # private keys inside
    path.write_text(json.dumps(spec))

    def progress(event: dict) -> None:
        if event["event"] == "progress":
            log(f"handshakes: {event['completed']}/{event['peers']} completed, "
                f"{event['cookie_replies']} cookie replies, {event['retries']} retries")
    swarm = LineProcess(topo.s, module_argv("run", "--spec", str(path)), progress)
    swarm.wait("ready", 60)
    return swarm


def start_sink(topo: Topology, seconds: float) -> LineProcess:
    sink = LineProcess(topo.a, module_argv("sink", "--port", str(SINK_PORT),
                                           "--max-seconds", str(seconds)))
    sink.wait("ready", 30)
    return sink


def handshaken(side: netns.Wgebpf, swarm: list[PeerKey]) -> int:
    """Swarm peers with a handshake in A's `wg show` (A's own view)."""
    dump = side.dump()
    return sum(1 for p in swarm if dump.peers.get(p.public) and
               dump.peers[p.public].latest_handshake > 0)


def rx_bytes(side: netns.Wgebpf) -> dict[str, int]:
    return {key: p.rx_bytes for key, p in side.dump().peers.items()}


def trickle_check(side, swarm_proc, sink, trickling: list[PeerKey], before: dict) -> dict:
    """Did every trickling peer's data arrive, counted against it in `wg show`?"""
    after = rx_bytes(side)
    grew = [p for p in trickling if after.get(p.public, 0) > before.get(p.public, 0)]
    sent = swarm_proc.ask("report", "report")
    heard = sink.ask("report", "report")["per_source"]
    return {"trickling": len(trickling), "rx_grew": len(grew),
            "sink_sources": sum(1 for p in trickling if heard.get(p.v6)),
            "sink_packets": sum(heard.get(p.v6, 0) for p in trickling),
            "sent": sent["data_sent"], "sent_min_per_peer": sent["data_sent_min_per_peer"],
            "rx_bytes_min": min((after.get(p.public, 0) - before.get(p.public, 0)
                                 for p in trickling), default=0),
            "swarm": {k: v for k, v in sent.items() if k != "data_sent_per_peer"}}


def throughput(topo: Topology, swarm_proc: LineProcess, opts: Options) -> dict:
    """iperf3 A -> B, alternating trickle off / on, `repeats` of each."""
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(opts.repeats):
        for cond in ("off", "on"):
            swarm_proc.ask(f"trickle {opts.trickle_period if cond == 'on' else 0}",
                           "trickle")
            time.sleep(1.0)               # let the trickle reach its pace
            data = bench.iperf3_run(topo.a, topo.b, f"198.51.100.2", opts.seconds)
            gbps = data["end"]["sum_received"]["bits_per_second"] / 1e9
            runs[cond].append(gbps)
            log(f"throughput repeat {r + 1}/{opts.repeats}, trickle {cond}: "
                f"{gbps:.3f} Gbit/s")
    swarm_proc.ask("trickle 0", "trickle")
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    return {"gbps_off": runs["off"], "gbps_on": runs["on"], "median_off": off,
            "median_on": on, "ratio_on_off": on / off if off else None,
            "seconds": opts.seconds, "trickle_period": opts.trickle_period}


# -- Churn ----------------------------------------------------------------------------------


def churn(side: netns.Wgebpf, opts: Options, first: int) -> dict:
    """Add and remove peers with `wg set` while a ping A -> B runs."""
    ping = side.ns.popen(["ping", "-n", "-i", "0.02", "-w", "600", "198.51.100.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    adds, removes, errors = [], [], []
    try:
        time.sleep(0.5)
        for peer in make_keys(opts.churn_rounds, first):
            adds.append(time_wg_set(side, ["peer", peer.public, "allowed-ips",
                                           f"{EXTRA6_BASE + peer.number}/128"]))
            if peer.public not in side.dump().peers:
                errors.append(f"added peer {peer.public} not in wg show")
            removes.append(time_wg_set(side, ["peer", peer.public, "remove"]))
            if peer.public in side.dump().peers:
                errors.append(f"removed peer {peer.public} still in wg show")
        time.sleep(0.5)
    finally:
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=10)
    answered = len(set(re.findall(r"icmp_seq=(\d+)", out)))
    sent = re.search(r"(\d+) packets transmitted", out)
    # Pinged every 20 ms and stopped 0.5 s after the last change, the echo
    # sent just before SIGINT is the only one that may still be in flight.
    lost = max(0, int(sent[1]) - answered - 1) if sent else None
    return {"rounds": opts.churn_rounds, "add_s_median": statistics.median(adds),
            "add_s": adds, "remove_s_median": statistics.median(removes),
            "remove_s": removes, "ping_answered": answered,
            "ping_sent": int(sent[1]) if sent else None,
            "ping_lost": lost,
            "peers_after": wg_peers(side), "errors": errors}


def time_wg_set(side: netns.Wgebpf, args: list[str]) -> float:
    t0 = time.monotonic()
    side.set(*args)
    return time.monotonic() - t0


# -- The whole run ------------------------------------------------------------------------


class Run:
    """One benchmark run: the report fills in step by step; a failing step is
    recorded under errors and the steps that do not need it go on."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.report: dict = {"peers": opts.peers, "options": _jsonable(opts), "errors": {}}
        self.tmp = Path(tempfile.mkdtemp(prefix="wgebpf-scale-"))

    def step(self, name: str, fn):
        if name in self.opts.skip:
            return None
        log(f"{name} ...")
        t0 = time.monotonic()
        try:
            result = fn()
        except Exception as exc:          # one step failing must not lose the others
            self.report["errors"][name] = f"{type(exc).__name__}: {exc}"[:4000]
            log(f"{name} FAILED: {exc}"[:600])
            return None
        log(f"{name} done in {time.monotonic() - t0:.1f} s: {brief(result)}")
        return result

    def run(self) -> dict:
        opts = self.opts
        a_private = keys.encode(keys.generate_private_key())
        a_public = keys.encode(keys.public_key(keys.decode(a_private)))
        log(f"making {opts.peers} peer keys")
        peers = make_keys(opts.peers)
        topo = Topology(max(1, min(SWARM_MAX_SOURCES, opts.swarm)))
        try:
            self.baseline(topo, a_private, peers)
            self.at_n(topo, a_private, a_public, peers)
        finally:
            topo.close()
        return self.report

    def baseline(self, topo: Topology, a_private: str, peers: list[PeerKey]) -> None:
        if "baseline" in self.opts.skip:
            return

        def measure() -> dict:
            side, load = attach(topo, a_private, peers[:self.opts.baseline], self.opts)
            try:
                return {"load": load, "memory": memory(side)}
            finally:
                side.close()
        self.report["baseline"] = self.step("baseline", measure)

    def at_n(self, topo, a_private, a_public, peers) -> None:
        opts, report = self.opts, self.report
        b = netns.WireGuardGo(topo.b, netns.unique_ifname("wgb"), b_config(peers[0], a_private))
        b.start()
        try:
            side, report["load"] = attach(topo, a_private, peers, opts)
        except Exception as exc:
            report["errors"]["load"] = f"{type(exc).__name__}: {exc}"[:4000]
            log(f"attach with {opts.peers} peers FAILED: {exc}"[:800])
            b.close()
            return
        log(f"load: UAPI after {report['load']['uapi_s']:.2f} s, all {opts.peers} peers "
            f"after {report['load']['all_peers_s']:.2f} s")
        try:
            if not netns.ping(topo.a, "198.51.100.2", count=3, timeout=10):
                report["errors"]["ping"] = "no ping A -> B through the tunnel"
            self.measure_at_n(topo, side, a_public, peers)
        finally:
            side.close()
            b.close()

    def measure_at_n(self, topo, side, a_public, peers) -> None:
        opts, report = self.opts, self.report
        report["memory"] = {"n_idle": self.step("memory", lambda: memory(side))}
        report["show"] = {"idle": self.step("show", lambda: show_times(side))}
        swarm = peers[1:1 + opts.swarm]
        if "handshakes" not in opts.skip and swarm:
            self.with_swarm(topo, side, a_public, swarm)
        report["churn"] = self.step("churn", lambda: churn(side, opts, MAX_PEERS))
        self.per_peer()

    def with_swarm(self, topo, side, a_public, swarm: list[PeerKey]) -> None:
        opts, report = self.opts, self.report
        spec = swarm_spec(topo, a_public, swarm, opts)
        sink = start_sink(topo, spec["max_seconds"])
        proc = start_swarm(topo, spec, self.tmp)
        try:
            hs = self.step("handshakes", lambda: self.handshakes(side, proc, swarm))
            report["handshakes"] = hs
            report["memory"]["n_sessions"] = self.step("memory", lambda: memory(side))
            report["show"]["after_handshakes"] = self.step("show", lambda: show_times(side))
            trickling = swarm[:opts.trickle]
            before = rx_bytes(side)
            report["throughput"] = self.step("throughput",
                                             lambda: throughput(topo, proc, opts))
            if report["throughput"] is None and trickling:
                proc.ask(f"trickle {opts.trickle_period}", "trickle")
                time.sleep(opts.trickle_check_seconds)
                proc.ask("trickle 0", "trickle")
            time.sleep(0.5)                   # the last packets, and workers' counters
            report["trickle"] = self.step(
                "trickle", lambda: trickle_check(side, proc, sink, trickling, before))
        finally:
            proc.close()
            sink.close()

    def handshakes(self, side, proc: LineProcess, swarm: list[PeerKey]) -> dict:
        result = proc.wait("handshakes", self.opts.handshake_timeout() + 30)
        result["seen_by_wgebpf"] = handshaken(side, swarm)
        return result

    def per_peer(self) -> None:
        base = (self.report.get("baseline") or {}).get("memory")
        mem = self.report.get("memory") or {}
        span = self.opts.peers - self.opts.baseline
        for key in ("n_idle", "n_sessions"):
            if base and mem.get(key):
                mem[f"per_peer_{key}"] = per_peer(base, mem[key], span)


def brief(result) -> str:
    if not isinstance(result, dict):
        return str(result)
    keys_ = [k for k, v in result.items() if isinstance(v, (int, float, str)) or v is None]
    return ", ".join(f"{k}={_fmt(result[k])}" for k in keys_[:8])


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _jsonable(opts: Options) -> dict:
    return {k: sorted(v) if isinstance(v, frozenset) else v for k, v in opts.__dict__.items()}


# -- Summary and command line -------------------------------------------------------------


def summary(report: dict) -> list[str]:
    """The headline figures, one per line."""
    out = [f"peers: {report['peers']}"]
    load = report.get("load")
    if load:
        out.append(f"load: UAPI {load['uapi_s']:.2f} s, all peers {load['all_peers_s']:.2f} s")
    mem = report.get("memory") or {}
    for key in ("per_peer_n_idle", "per_peer_n_sessions"):
        if mem.get(key):
            m = mem[key]
            out.append(f"memory per peer ({key[9:]}): control RSS {m['control_rss']:.0f} B, "
                       f"workers RSS {m['workers_rss']:.0f} B, eBPF maps "
                       f"{m['bpf_memlock']:.0f} B, PSS + maps {m['total_pss']:.0f} B")
    for when, show in (report.get("show") or {}).items():
        if show:
            out.append(f"show ({when}): " + ", ".join(
                f"{k} {v['seconds']:.3f} s {v['bytes']} B" for k, v in show.items()))
    hs = report.get("handshakes")
    if hs:
        out.append(f"handshakes: {hs['completed']}/{hs['peers']} in "
                   f"{_fmt(hs['seconds_to_last'])} s, {_fmt(hs['completions_per_s'])}/s "
                   f"(peak {hs['peak_completions_1s']} in 1 s), cookie replies "
                   f"{hs['cookie_replies']}, retries {hs['retries']}")
    tp = report.get("throughput")
    if tp:
        out.append(f"throughput: {tp['median_off']:.3f} Gbit/s alone, {tp['median_on']:.3f} "
                   f"with the trickle: ratio {_fmt(tp['ratio_on_off'])}")
    tr = report.get("trickle")
    if tr:
        out.append(f"trickle: {tr['rx_grew']}/{tr['trickling']} peers' rx grew, sink heard "
                   f"{tr['sink_sources']}")
    ch = report.get("churn")
    if ch:
        out.append(f"churn: add {ch['add_s_median']:.3f} s, remove {ch['remove_s_median']:.3f} s"
                   f" (medians of {ch['rounds']}), pings lost {ch['ping_lost']}")
    out += [f"error in {k}: {v[:300]}" for k, v in report["errors"].items()]
    return out


def parse_args(argv: list[str] | None) -> tuple[Options, str | None]:
    p = argparse.ArgumentParser(prog="python -m wgebpf.lab.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, required=True, help="N: peers in the config")
    p.add_argument("--trickle", type=int, help="M: swarm peers trickling (min(1000, N-1))")
    p.add_argument("--handshakes", type=int, help="K: swarm peers handshaking (min(1000, N-1))")
    p.add_argument("--baseline", type=int, default=10, help="peers of the baseline instance")
    p.add_argument("--workers", type=int, help="Workers (default: wgebpf's, one per CPU)")
    p.add_argument("--source-policy", default="allowedips",
                   choices=("allowedips", "fib", "nftables", "off"))
    p.add_argument("--seconds", type=int, default=5, help="per iperf3 run")
    p.add_argument("--repeats", type=int, default=3, help="of each throughput condition")
    p.add_argument("--churn-rounds", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.0,
                   help="swarm initiations a second (0: all at once)")
    p.add_argument("--retry-after", type=float, default=5.0,
                   help="seconds before an unanswered initiation is sent again")
    p.add_argument("--skip", action="append", default=[], choices=STEPS,
                   help="skip a step (repeatable)")
    p.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    if not 2 <= a.peers <= MAX_PEERS:
        p.error(f"--peers must be 2..{MAX_PEERS}")
    default = min(1000, a.peers - 1)
    trickle = min(a.peers - 1, default if a.trickle is None else a.trickle)
    handshakes = min(a.peers - 1, default if a.handshakes is None else a.handshakes)
    opts = Options(a.peers, trickle, handshakes, min(a.baseline, a.peers - 1), a.workers,
                   a.source_policy, frozenset(a.skip), a.seconds, a.repeats,
                   churn_rounds=max(1, a.churn_rounds), rate=a.rate,
                   retry_after=a.retry_after)
    return opts, a.json


def main(argv: list[str] | None = None) -> int:
    opts, json_path = parse_args(argv)
    if os.geteuid() != 0:
        print("wgebpf.lab.scale needs root (network namespaces)", file=sys.stderr)
        return 2
    report = Run(opts).run()
    for line in summary(report):
        print(line)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        log(f"report written to {json_path}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
