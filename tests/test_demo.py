"""The README's first command, `./scripts/demo.sh`, run as a user runs it:
its narrated steps must show what they say (the counters per peer in each
step's table, the spoofed datagrams counted and not delivered), it must take
well under a minute, and it must leave nothing behind: none of its
namespaces, no UAPI socket and no process of its interfaces. The same for
Ctrl-C in the middle of it, and for the classic demo (--classic).
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from wgebpf.lab.netns import UAPI_DIR

pytestmark = [pytest.mark.netns, pytest.mark.interop]

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO = [str(REPO / "scripts" / "demo.sh")]
B, C = "198.51.100.2", "198.51.100.3"


def leftovers(output: str) -> list[str]:
    """What a finished demo left: its namespaces (their names are in its
    output, with the run id), UAPI sockets and processes of that run."""
    run_ids = set(re.findall(r"wgebpf-([0-9a-f]{6})-\d+-", output))
    assert run_ids, f"no namespace names in the output:\n{output}"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True,
                        check=True).stdout
    left = []
    for run_id in run_ids:
        left += [line for line in namespaces.splitlines() if f"wgebpf-{run_id}-" in line]
        left += [str(p) for p in UAPI_DIR.glob(f"*{run_id}*")] if UAPI_DIR.exists() else []
        # interface names carry the run id too (wga<id>13, ...)
        left += [line for line in ps.splitlines() if run_id in line and "ps -eo" not in line]
    return left


def section(output: str, step: int) -> str:
    """The lines of narrated step `step` ("==> 1. ..." up to the next "==>")."""
    match = re.search(rf"^==> {step}\. .*?(?=^==> )", output, re.M | re.S)
    assert match, f"no step {step} in:\n{output}"
    return match.group(0)


def table(text: str) -> dict[str, tuple[int, int]]:
    """A step's per-peer rows: {next hop: (A sent it, arrived)}."""
    rows = dict((hop, (int(sent), int(arrived))) for hop, sent, arrived in
                re.findall(r"^\s+[BC]\s+(198\.51\.100\.\d)\s+(\d+)\s+(\d+)$", text, re.M))
    assert set(rows) == {B, C}, text
    return rows


def test_demo_shows_routes_choosing_peers_ecmp_and_a_spoof_dropped(root):
    started = time.monotonic()
    proc = subprocess.run(DEMO, capture_output=True, text=True, timeout=90)
    took = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert took < 60, f"the demo took {took:.0f} s"
    assert "Traceback" not in out + proc.stderr

    # A's AllowedIPs: the tunnel addresses alone
    assert re.search(rf"\t{re.escape(B)}/32 2001:db8:100::2/128$", out, re.M), out
    assert re.search(rf"\t{re.escape(C)}/32 2001:db8:100::3/128$", out, re.M), out

    one = section(out, 1)
    assert f"ip route add 203.0.113.0/24 via {B} dev wga" in one
    assert "5 of 5 replies" in one
    assert table(one) == {B: (5, 5), C: (0, 0)}

    two = section(out, 2)
    assert f"ip route replace 203.0.113.0/24 via {C} dev wga" in two
    assert "5 of 5 replies" in two
    assert table(two) == {B: (0, 0), C: (5, 5)}
    assert "No WireGuard change" in two

    three = section(out, 3)
    assert "fib_multipath_hash_policy=1" in three
    assert re.search(rf"nexthop via {re.escape(B)} dev wga\S+ nexthop via {re.escape(C)}", three)
    rows = table(three)
    assert rows[B][0] > 0 and rows[C][0] > 0, three
    assert rows[B][0] + rows[C][0] == 32, three
    assert all(sent == arrived for sent, arrived in rows.values()), three

    four = section(out, 4)
    dropped = re.search(r"B's dropped_fib .*?(\d+) -> (\d+)$", four, re.M)
    assert dropped and int(dropped[2]) - int(dropped[1]) == 3, four
    delivered = [int(n) for n in re.findall(r"delivered to A's port \d+\s+(\d+)$", four, re.M)]
    assert delivered == [0, 3], four        # B's spoofed: none; C's own: all three
    assert "does not allow" in four, four   # the dishonest-peer log line

    assert out.rstrip().endswith("==> done: the namespaces and everything in them are gone")
    assert leftovers(out) == []


def test_demo_interrupted_removes_everything(root):
    """Ctrl-C (SIGINT to the demo's process group, as a terminal sends it)
    in the middle of step 1."""
    # As a terminal's foreground job: SIGINT at its default. A test run
    # started in the background of a non-interactive shell inherits SIGINT
    # ignored, and Python keeps an ignored SIGINT ignored.
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, process_group=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("==> 1. "):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted; everything it made is removed" in out
    assert leftovers(out) == []


def test_classic_demo_is_still_there(root):
    proc = subprocess.run(DEMO + ["--classic"], capture_output=True, text=True, timeout=90)
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert "a wgebpf host and a wireguard-go host" in out
    assert out.count("3 of 3 replies") == 4, out
    assert "iperf3 TCP A -> B" in out and "iperf3 TCP B -> A" in out
    assert leftovers(out) == []
