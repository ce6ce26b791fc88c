"""wgebpf/control/status_text.py: `wgebpf status NAME`'s readable layout, a
pure function of the status dict (what `--json` prints). Unit tier: a fixed
dict, no root, no namespaces; and the CLI's two outputs over a stub."""

from __future__ import annotations

import base64
import copy
import json
import re

import pytest
from typer.testing import CliRunner

from wgebpf import cli
from wgebpf.control import show
from wgebpf.control.status_text import render_text, short_key

KEY_B = base64.b64encode(bytes(range(32))).decode()
KEY_C = base64.b64encode(bytes(range(1, 33))).decode()
PRIVATE = base64.b64encode(bytes(range(100, 132))).decode()

STATUS = {
    "interface": "wg0",
    "peer_selection": "nexthop",
    "source_policy": "allowedips",
    "listen_port": 51820,
    "peers": {
        KEY_B: {"slot": 1, "endpoint": "192.0.2.2:51821",
                "rx_bytes": 1000, "tx_bytes": 2048, "rx_packets": 10, "tx_packets": 20,
                "handshakes_completed": 3, "handshakes_failed": 1, "handshakes_sent": 4,
                "last_handshake_time": 1700000000.25, "keypair_age_seconds": 12.5,
                "source_policy": "allowedips", "allowed_ips": ["198.51.100.2/32"],
                "drops": {"source_policy": 2, "no_session": 0, "replay": 6}},
        KEY_C: {"slot": 2, "endpoint": None,
                "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0,
                "handshakes_completed": 0, "handshakes_failed": 0, "handshakes_sent": 0,
                "last_handshake_time": 0.0, "keypair_age_seconds": None,
                "source_policy": "off", "allowed_ips": [], "drops": {}},
    },
    "drops": {"no_peer": 5, "replay": 6, "source_policy": 2, "queue_full": 0},
    "handshake_duration_seconds": {"buckets": [[0.001, 0], ["+Inf", 3]],
                                   "sum": 0.009, "count": 3},
    "workers": [
        {"worker": 1, "pid": 4242, "peers": 2, "restarts": 0, "busy_seconds": 1.5,
         "queue_depth": 17, "rx_bytes": 1000, "tx_bytes": 2048, "rx_packets": 10,
         "tx_packets": 20, "alive": True, "packets_by_slot": {"1": 30},
         "fds": 23, "rss_bytes": 31457280},
        {"worker": 2, "pid": None, "peers": 2, "restarts": 3, "busy_seconds": 0.25,
         "queue_depth": 0, "alive": False, "packets_by_slot": {}},
    ],
    "classifier": {"peer": 30, "no_peer": 5},
    "classifier_route": {"mode": "route", "mode_reason": None, "dst": 28,
                         "fallbacks": {"no_dst": 2, "gateway": 0}},
    "nexthops": {"198.51.100.2": {"packets": 30, "bytes": 3072, "public_key": KEY_B},
                 "2001:db8:100::9": {"packets": 1, "bytes": 80, "public_key": None}},
    "policy": {"1": {"accepted": 10, "dropped_allowedips": 2, "dropped_nftables": 0},
               "2": {"accepted": 1, "dropped_allowedips": 0, "dropped_nftables": 0}},
    "xdp_mode": "native",
    "xdp": {"pass": 50, "bad_size": 3},
    "resources": {"control_plane": {"pid": 77, "fds": 19, "rss_bytes": 52428800},
                  "indices": {"total": 3, "handshake": 1, "keypair": 2, "orphaned": 0},
                  "maps": {"peers4": 2, "peers6": 1, "rxindex": 3, "xdp_index": None},
                  "tun_queues": 2},
    # never shown, even if a future status carried it
    "private_key": PRIVATE,
}

SECTIONS = ["interface: wg0", "workers:", "peers:", "drops by reason:", "next-hop traffic:",
            "source policy counters:", "xdp guard:", "resources:"]


def section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def row(lines: list[str], first: str) -> list[str]:
    """The cells of the row whose first cell is `first` (cells split on 2+ spaces)."""
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in {lines}")


@pytest.fixture(scope="module")
def text() -> str:
    return render_text(STATUS)


def test_every_section_present_in_order(text):
    positions = [text.splitlines().index(title) for title in SECTIONS]
    assert positions == sorted(positions)


def test_interface_lines(text):
    head = section(text, "interface: wg0")
    assert "  listening port: 51820" in head
    assert "  peer selection: nexthop" in head
    assert "  peer spread: off" in head                # absent from an old snapshot: off
    assert "  source policy: allowedips" in head
    assert "  classifier: route; fallbacks: 2 no_dst" in head


def test_workers(text):
    lines = section(text, "workers:")
    assert row(lines, "worker")[:7] == ["worker", "pid", "alive", "restarts", "busy s",
                                        "queue", "peers"]
    # A count: every worker serves every peer.
    assert row(lines, "1")[:7] == ["1", "4242", "yes", "0", "1.50", "17", "2"]
    assert row(lines, "2")[:7] == ["2", "-", "no", "3", "0.25", "0", "2"]
    assert "30.00 MiB" in row(lines, "1")


def test_peers(text):
    lines = section(text, "peers:")
    assert row(lines, "peer") == ["peer", "slot", "endpoint", "rx", "tx", "hs ok/failed",
                                   "policy", "drops"]             # no worker: all serve all
    b = row(lines, short_key(KEY_B))
    assert b[1:] == ["1", "192.0.2.2:51821", "1000 B", "2.00 KiB", "3/1", "allowedips",
                     "6 replay, 2 source_policy"]           # zero reasons left out
    c = row(lines, short_key(KEY_C))
    assert c[1:3] == ["2", "(none)"] and c[-1] == "-"


def test_drops_by_reason(text):
    lines = section(text, "drops by reason:")
    assert row(lines, "no_peer") == ["no_peer", "5"]
    assert row(lines, "replay") == ["replay", "6"]
    assert row(lines, "queue_full") == ["queue_full", "0"]


def test_nexthop_traffic(text):
    lines = section(text, "next-hop traffic:")
    assert row(lines, "198.51.100.2") == ["198.51.100.2", short_key(KEY_B), "30", "3.00 KiB"]
    assert row(lines, "2001:db8:100::9") == ["2001:db8:100::9", "(no peer)", "1", "80 B"]


def test_source_policy_counters(text):
    lines = section(text, "source policy counters:")
    assert row(lines, "slot") == ["slot", "peer", "accepted", "dropped_allowedips",
                                  "dropped_nftables"]
    assert row(lines, "1") == ["1", short_key(KEY_B), "10", "2", "0"]


def test_xdp_and_resources(text):
    xdp = section(text, "xdp guard:")
    assert "  mode: native" in xdp and row(xdp, "bad_size") == ["bad_size", "3"]
    res = section(text, "resources:")
    assert "  control plane: pid 77, 19 fds, rss 50.00 MiB" in res
    assert "  tun queues: 2" in res
    assert row(res, "rxindex") == ["rxindex", "3"] and row(res, "xdp_index") == ["xdp_index", "-"]


def test_columns_aligned(text):
    """Each table's rows are as wide as its header row, cell for cell."""
    lines = section(text, "next-hop traffic:")
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    assert lines[1].index("198.51.100.2") == starts[0]
    assert lines[1].rstrip().endswith("3.00 KiB")


def test_no_key_material(text):
    assert PRIVATE not in text and "private" not in text
    # public keys only shortened: no full key, no 32-byte base64 at all
    assert KEY_B not in text and KEY_C not in text
    assert not re.search(r"[A-Za-z0-9+/]{43}=", text)


def test_missing_optional_parts():
    """A bare device (no workers, classifier, policy, XDP, resources) and
    an empty dict still render every section, without a traceback."""
    bare = {k: v for k, v in copy.deepcopy(STATUS).items()
            if k not in ("classifier", "classifier_route", "nexthops", "policy", "xdp",
                         "xdp_mode", "resources", "handshake_duration_seconds")}
    bare["workers"] = []
    for status in (bare, {}, {"interface": "wg9", "peers": {KEY_B: {}}}):
        out = render_text(status)
        for title in SECTIONS[1:]:
            assert title in out.splitlines()
    out = render_text(bare)
    assert section(out, "workers:") == ["  (none: not attached)"]
    assert section(out, "next-hop traffic:") == ["  (classifier not loaded)"]
    assert "  mode: off" in section(out, "xdp guard:")
    assert "  classifier: not loaded" in out


# ---------------------------------------------------------------- the command


@pytest.fixture
def stubbed(monkeypatch):
    snapshot = {k: v for k, v in STATUS.items() if k != "private_key"}
    monkeypatch.setattr(show, "status", lambda name: snapshot)
    return snapshot


def test_cli_default_is_text(stubbed):
    result = CliRunner().invoke(cli.app, ["status", "wg0"])
    assert result.exit_code == 0, result.output
    assert result.output == render_text(stubbed)


def test_cli_json_is_unchanged(stubbed):
    result = CliRunner().invoke(cli.app, ["status", "wg0", "--json"])
    assert result.exit_code == 0, result.output
    assert result.output == json.dumps(stubbed, indent=2, sort_keys=True) + "\n"
    assert json.loads(result.output) == stubbed


def test_peer_spread_line_says_on_when_the_pool_spreads():
    snapshot = {"interface": "wg0", "peer_spread": True, "peers": {}, "workers": []}
    assert "  peer spread: on" in section(render_text(snapshot), "interface: wg0")
