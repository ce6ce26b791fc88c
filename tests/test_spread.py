"""The spreading simulation (wgebpf/lab/spread.py), run small: the real
counter allocator, the steering formula and the replay windows together."""

import json

from wgebpf.lab import spread
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE


def run(*argv):
    return spread.main(["--messages", "30000", "--no-model", *argv])


def test_no_duplicate_accepted_and_reordering_within_bounds(capsys):
    for senders, receivers in [(1, 1), (4, 4), (3, 5), (8, 2)]:
        r = run("--senders", str(senders), "--receivers", str(receivers), "--duplicates", "0.05")
        assert r["duplicates_injected"] > 0 and r["duplicates_accepted"] == 0
        assert r["duplicates_rejected"] == r["duplicates_injected"]
        assert r["sender_reordering_max"] < r["bound"]
        assert r["reordering"]["max"] < COUNTER_WINDOW_SIZE and r["beyond_window"] == 0
        assert r["delivered"] == r["counters_sent"] == 30000
        assert sum(r["receiver_load"]) == 30000 + r["duplicates_injected"]
        assert min(r["receiver_load"]) > 0
    assert "duplicates ACCEPTED" in capsys.readouterr().out


def test_gro_merging_needs_the_owner_check():
    """GRO hands a worker counters of other workers' runs; recording them
    lets a later copy, steered to the owner, be accepted again."""
    unchecked = run("--gro", "--no-owner-check", "--duplicates", "0.05")
    assert unchecked["duplicates_accepted"] > 0
    checked = run("--gro", "--duplicates", "0.05")
    assert checked["duplicates_accepted"] == 0 and checked["foreign_dropped"] > 0


def test_one_sender_is_in_order_before_the_network():
    r = run("--senders", "1", "--jitter", "0", "--duplicates", "0")
    assert r["sender_reordering_max"] == 0 and r["reordering"]["max"] == 0
    assert r["skipped"] == 0


def test_model_rows_and_json(capsys):
    r = spread.main(["--messages", "2000", "--json"])
    out = json.loads(capsys.readouterr().out)
    rows = out["model"]["rows"]
    assert [row["cores"] for row in rows] == list(range(1, 17))
    assert all(a["pps"] <= b["pps"] + 1e-9 for a, b in zip(rows, rows[1:]))
    costs = r["model"]["costs"]
    assert 0 < costs["c_seal"] < 1e-3 and 0 < costs["c_open"] < 1e-3
    assert out["model"]["assumptions"]
