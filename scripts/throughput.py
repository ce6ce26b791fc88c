"""wgebpf -> wireguard-go beside wireguard-go -> wireguard-go, in one run.

Usage (root):  .venv/bin/python scripts/throughput.py [--seconds 10] [--repeats 3]
                                                      [--output DIR]

A thin wrapper around `wgebpf bench` (wgebpf/lab/bench.py), which superseded
this script: the same two pairings, with wgebpf's default data plane
(PeerSelection nexthop, Workers 2), runs alternating between them. Prints
bench's Markdown table (TCP one and four streams, UDP small packets,
latency, CPU per GB) and writes bench.json / bench.md / bench.png to DIR.
For every configuration run `wgebpf bench` itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgebpf.lab import bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="throughput-out")
    args = parser.parse_args()
    return bench.main(output_dir=args.output, repeats=args.repeats, seconds=args.seconds,
                      systems=["wgebpf-wireguard-go", "wireguard-go-wireguard-go"],
                      workers=[2], selections=["nexthop"])


if __name__ == "__main__":
    sys.exit(main())
