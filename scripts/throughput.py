"""iperf3 throughput of wgebpf -> wireguard-go beside wireguard-go -> wireguard-go.

Usage (root):  .venv/bin/python scripts/throughput.py [--seconds 10] [--repeats 3]

Builds the standard two-host topology (wgebpf/netns.py) twice in one run:
one with wgebpf on host A, one with wireguard-go on host A; host B runs
wireguard-go in both. Then runs iperf3 TCP A -> B through each tunnel,
alternating between the two so that drifts in machine load hit both alike,
and prints min/median/max of each and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgebpf import netns  # noqa: E402

SETUPS = (("wgebpf -> wireguard-go", "wgebpf"),
          ("wireguard-go -> wireguard-go", "wireguard-go"))


def measure(seconds: float, repeats: int) -> dict[str, list[float]]:
    """bits/s per setup, `repeats` runs each, alternating."""
    results: dict[str, list[float]] = {label: [] for label, _ in SETUPS}
    topologies = []
    try:
        for label, impl in SETUPS:
            topo = netns.TwoHosts()
            topologies.append((label, topo))
            netns.make_pair(topo, impl, "wireguard-go")
            if not netns.ping(topo.a, netns.B_TUNNEL4, count=3, timeout=10):
                raise RuntimeError(f"{label}: no ping through the tunnel\n{topo.logs()}")
        for run in range(1, repeats + 1):
            for label, topo in topologies:
                bps = netns.iperf3(topo.a, topo.b, netns.B_TUNNEL4, seconds)
                results[label].append(bps)
                print(f"run {run}/{repeats}  {label:<30} {bps / 1e9:7.3f} Gbit/s", flush=True)
    finally:
        for _, topo in topologies:
            topo.close()
    return results


def report(results: dict[str, list[float]], seconds: float) -> None:
    print(f"\niperf3 TCP A -> B, {seconds:g} s per run, Gbit/s")
    print(f"{'setup':<30} {'min':>7} {'median':>7} {'max':>7}")
    for label, values in results.items():
        g = [v / 1e9 for v in values]
        print(f"{label:<30} {min(g):7.3f} {statistics.median(g):7.3f} {max(g):7.3f}")
    ours, theirs = (statistics.median(results[label]) for label, _ in SETUPS)
    print(f"\nratio of medians (wgebpf / wireguard-go): {ours / theirs:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    report(measure(args.seconds, args.repeats), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
