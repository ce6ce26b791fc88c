#!/usr/bin/env python3
"""Soak test (not in CI): wgebpf A and wireguard-go B on the standard
two-host topology (wgebpf/lab/netns.py), traffic for --minutes, a rekey every
--rekey seconds (WGEBPF_TEST_REKEY_AFTER_TIME, test-only), and every
--kill-every seconds one worker process SIGKILLed, the workers in turn.

Reports at the start, every --report-every seconds and at the end: fds and RSS of the
control plane and of every worker, session indices and eBPF map entries,
drops by reason, handshakes and bytes. Ends with a start/end table and
exit code 0 when traffic flowed to the end and every killed worker came
back, else 1.

    sudo .venv/bin/python scripts/soak.py                  # 10 minutes
    sudo .venv/bin/python scripts/soak.py --minutes 1      # a quick check

Its namespaces are removed on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgebpf.lab import netns  # noqa: E402
from wgebpf.control import resources  # noqa: E402
from wgebpf.lab.netns import B_TUNNEL4  # noqa: E402
from wgebpf.kernel.xdp_guard import DROP_REASONS as XDP_DROP_REASONS  # noqa: E402

IPERF_PORT = 5201


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long (default 10)")
    parser.add_argument("--rekey", type=float, default=10,
                        help="REKEY_AFTER_TIME on A, seconds (default 10)")
    parser.add_argument("--kill-every", type=float, default=60,
                        help="SIGKILL a worker this often, seconds (default 60; 0: never)")
    parser.add_argument("--report-every", type=float, default=60,
                        help="report this often, seconds (default 60)")
    parser.add_argument("--rate", default="100M",
                        help="iperf3 target rate A -> B (default 100M; 0: unlimited)")
    parser.add_argument("--workers", default="auto", help="Workers on A (default auto)")
    return parser.parse_args(argv)


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.duration = args.minutes * 60
        self.kills: list[dict] = []
        self.problems: list[str] = []

    # -- set-up -----------------------------------------------------------------

    def start(self, topo: netns.TwoHosts) -> None:
        self.topo = topo
        # A alone knows B's endpoint, so A initiates every rekey.
        self.a, self.b = netns.make_pair(
            topo, endpoints="a", a_env={"WGEBPF_TEST_REKEY_AFTER_TIME": str(self.args.rekey)},
            a_extra={"Workers": self.args.workers})
        if not netns.ping(topo.a, B_TUNNEL4):
            raise RuntimeError("no tunnel from A to B")
        self.iperf_server = topo.b.popen(["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not netns.wait_until(lambda: netns._listening(topo.b, IPERF_PORT), 10):
            raise RuntimeError("iperf3 server did not start")
        # One long TCP flow; a killed worker costs it a re-handshake, and
        # TCP retransmits across the gap.
        self.iperf = topo.a.popen(
            ["iperf3", "-c", B_TUNNEL4, "-p", str(IPERF_PORT), "-t", str(round(self.duration)),
             "-b", self.args.rate, "-i", "10", "-J", "--connect-timeout", "5000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.started = time.monotonic()

    # -- the loop -----------------------------------------------------------------

    def run(self) -> resources.Snapshot:
        """Kill and report on their own schedules until the time is up;
        returns the starting snapshot."""
        first = self.report("start")
        next_kill = self.args.kill_every or float("inf")
        next_report = self.args.report_every
        turn = 0
        while self.elapsed() < self.duration:
            due = min(next_kill, next_report, self.duration)
            time.sleep(min(1.0, max(0.0, due - self.elapsed())))
            if self.iperf.poll() is not None:
                self.problems.append(f"iperf3 ended early at {self.elapsed():.0f} s")
                break
            if self.elapsed() >= self.duration:
                break
            if self.elapsed() >= next_kill:
                turn += 1
                self.kill_worker(turn)
                next_kill += self.args.kill_every
            if self.elapsed() >= next_report:
                self.report(f"minute {round(next_report / 60)}")
                next_report += self.args.report_every
        return first

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill_worker(self, turn: int) -> None:
        """SIGKILL worker number `turn` (round robin), by the PID the control
        plane reports, after checking that it is the control plane's child."""
        status = self.a.status()
        workers = status["workers"]
        worker = workers[(turn - 1) % len(workers)]
        pid = worker["pid"]
        if parent_pid(pid) != self.a.pid:
            raise RuntimeError(f"worker pid {pid} is not a child of wgebpf {self.a.pid}")
        b_slot = status["peers"][self.b.public_key]["slot"]
        os.kill(pid, signal.SIGKILL)
        kill = {"worker": worker["worker"], "pid": pid, "owned_b": b_slot in worker["peers"],
                "restarts": worker["restarts"]}
        self.kills.append(kill)
        back = netns.wait_until(lambda: self.restarted(kill), 20, 0.25)
        new_pid = self.worker(kill["worker"]).get("pid")
        print(f"[{self.elapsed():5.0f} s] killed worker {kill['worker']} (pid {pid}"
              f"{', owns B' if kill['owned_b'] else ''}): "
              + (f"restarted as pid {new_pid}" if back else "NOT restarted within 20 s"),
              flush=True)
        if not back:
            self.problems.append(f"worker {kill['worker']} not restarted after kill {turn}")

    def worker(self, position: int) -> dict:
        return next(w for w in self.a.status()["workers"] if w["worker"] == position)

    def restarted(self, kill: dict) -> bool:
        worker = self.worker(kill["worker"])
        return (worker["alive"] and worker["pid"] != kill["pid"]
                and worker["restarts"] > kill["restarts"])

    # -- reports ----------------------------------------------------------------

    def report(self, label: str) -> resources.Snapshot:
        status = self.a.status()
        snap = resources.snapshot(label, status)
        peer = status["peers"][self.b.public_key]
        procs = [f"control plane {snap.control_plane.fds} fds "
                 f"{snap.control_plane.rss_mib:.1f} MiB"]
        procs += [f"worker {pos} (pid {u.pid}) {u.fds} fds {u.rss_mib:.1f} MiB"
                  for pos, u in sorted(snap.workers.items())]
        drops = {k: v for k, v in status["drops"].items() if v}
        xdp_drops = {k: v for k, v in status.get("xdp", {}).items()
                     if v and k in XDP_DROP_REASONS}
        print(f"[{self.elapsed():5.0f} s] {label}\n"
              f"  {' | '.join(procs)}\n"
              f"  handshakes: {peer['handshakes_completed']} completed, "
              f"{peer['handshakes_sent']} initiations sent, {peer['handshakes_failed']} failed"
              f" | worker restarts {sum(snap.worker_restarts.values())}\n"
              f"  bytes to B {peer['tx_bytes']:,}, from B {peer['rx_bytes']:,}\n"
              f"  indices {snap.indices} | map entries {snap.maps} (bpftool {snap.kernel_maps})"
              f" | TUN queues {snap.tun_queues}\n"
              f"  drops {drops or 'none'} | XDP {xdp_drops or 'none'}", flush=True)
        return snap

    def finish(self, first: resources.Snapshot) -> int:
        out, err = self.iperf.communicate(timeout=60)
        result = json.loads(out or "{}")
        last = self.report("end")
        print("\nstart vs end:\n" + resources.table([first, last]))
        if self.iperf.returncode != 0 or "error" in result:
            self.problems.append(f"iperf3: {result.get('error') or err.strip()}")
        else:
            self.print_iperf(result)
        if not netns.ping(self.topo.a, B_TUNNEL4):
            self.problems.append("no ping A -> B at the end")
        for problem in self.problems:
            print("PROBLEM:", problem)
        return 1 if self.problems else 0

    def print_iperf(self, result: dict) -> None:
        per_interval = [round(i["sum"]["bits_per_second"] / 1e6, 1)
                        for i in result.get("intervals", [])]
        end = result["end"]
        print(f"iperf3: {end['sum_received']['bytes']:,} bytes received by B, "
              f"{end['sum_sent'].get('retransmits', 0)} retransmits; "
              f"Mbit/s per 10 s: {per_interval}")
        stalls = [i for i, r in enumerate(per_interval) if r == 0]
        if stalls:
            self.problems.append(f"iperf3 carried nothing in 10-s interval(s) {stalls}")


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces: the fields after its ')'.
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def on_sigterm(signum, frame) -> None:
    # Unwind like Ctrl-C, so the `with` below removes the namespaces.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("soak.py needs root (network namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, on_sigterm)
    soak = Soak(args)
    print(f"soak: {args.minutes:g} min, rekey every {args.rekey:g} s, a worker killed every "
          f"{args.kill_every:g} s, iperf3 at {args.rate}", flush=True)
    with netns.TwoHosts() as topo:
        try:
            soak.start(topo)
            first = soak.run()
            return soak.finish(first)
        except KeyboardInterrupt:
            print("\ninterrupted: removing the namespaces", file=sys.stderr)
            return 130
        except Exception:
            print(topo.logs()[-5000:], file=sys.stderr)
            raise


if __name__ == "__main__":
    sys.exit(main())
