"""The spreading simulation (wgebpf/lab/spread.py), run small: the real
counter allocator, the steering formula and the replay windows together.

The default models the design of 467f6ce: the receiving workers share one
replay window per session, recorded under its lock once per burst, with
UDP GRO merging bursts that are steered by their first message. The
per-worker windows it replaced are run too, to show why: with GRO they
accept duplicates, or, with the owner check, drop genuine messages."""

import json

import pytest

from wgebpf.lab import spread
from wgebpf.wireguard.replay import COUNTER_WINDOW_SIZE

MESSAGES = 30000


def run(*argv):
    return spread.main(["--messages", str(MESSAGES), "--no-model", "--no-sweep",
                        "--no-compare", *argv])


def check_delivered_once(r):
    assert r["duplicates_injected"] > 0 and r["duplicates_accepted"] == 0
    assert r["duplicates_rejected"] == r["duplicates_injected"]
    assert r["messages_dropped"] == 0 and r["foreign_dropped"] == r["beyond_window"] == 0
    assert r["delivered"] == r["counters_sent"] == MESSAGES


@pytest.mark.parametrize("senders,receivers", [(1, 1), (4, 4), (3, 5), (8, 2)])
def test_shared_window_with_gro_accepts_no_duplicate_and_drops_nothing(senders, receivers):
    r = run("--senders", str(senders), "--receivers", str(receivers), "--duplicates", "0.05")
    assert r["design"] == "shared" and r["gro"]
    check_delivered_once(r)
    assert r["sender_reordering_max"] < r["bound"]
    assert r["reordering"]["max"] < COUNTER_WINDOW_SIZE
    assert sum(r["receiver_load"]) == MESSAGES + r["duplicates_injected"]
    # One lock per burst that had something to record, not one per message.
    assert 0 < r["locks"] <= sum(r["receiver_bursts"]) < MESSAGES / 10


@pytest.mark.parametrize("workers", [2, 4])
def test_every_receiver_gets_traffic(workers):
    """The mixed run number spreads even one sending worker's blocks
    (k % W == w) over every receiver."""
    r = run("--senders", str(workers), "--receivers", str(workers), "--duplicates", "0.05")
    check_delivered_once(r)
    assert min(r["receiver_load"]) > MESSAGES / workers / 3
    assert r["sender_reach"] == [workers] * workers


def test_the_lock_catches_twins_in_flight():
    """A duplicate can pass the unlocked pre-check while its twin is opened
    by another worker; only the locked accept refuses it."""
    r = run("--duplicates", "0.05")
    assert r["caught_under_lock"] > 0 and r["duplicates_accepted"] == 0


def test_per_worker_windows_with_gro_accept_duplicates():
    """The reason for the shared window: GRO hands a worker counters of
    other workers' runs, and a copy steered elsewhere is accepted again."""
    unchecked = run("--per-worker-windows", "--no-owner-check", "--duplicates", "0.05")
    assert unchecked["design"] == "per-worker"
    assert unchecked["duplicates_accepted"] > 0


def test_the_owner_check_drops_messages_instead():
    checked = run("--per-worker-windows", "--duplicates", "0.05")
    assert checked["design"] == "per-worker+owner"
    assert checked["duplicates_accepted"] == 0
    assert checked["foreign_dropped"] > 0 and checked["messages_dropped"] > 0


def test_without_gro_per_worker_windows_were_enough():
    r = run("--no-gro", "--per-worker-windows", "--no-owner-check", "--duplicates", "0.05")
    check_delivered_once(r)


def test_side_by_side_on_the_same_traffic(capsys):
    r = spread.main(["--messages", str(MESSAGES), "--no-model", "--no-sweep",
                     "--duplicates", "0.05"])
    c = r["compare"]
    assert c["shared"]["duplicates_accepted"] == c["shared"]["messages_dropped"] == 0
    assert c["per-worker"]["duplicates_accepted"] > 0
    assert c["per-worker+owner"]["messages_dropped"] > 0
    assert c["shared"]["receiver_load"] == c["per-worker"]["receiver_load"]
    out = capsys.readouterr().out
    assert "duplicates ACCEPTED" in out and "side by side" in out


def test_one_sender_is_in_order_before_the_network():
    r = run("--senders", "1", "--jitter", "0", "--duplicates", "0")
    assert r["sender_reordering_max"] == 0 and r["reordering"]["max"] == 0
    assert r["skipped"] == 0


def test_sweep_model_and_json(capsys):
    r = spread.main(["--messages", "6000", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [row["workers"] for row in out["spread_check"]] == [2, 4, 8]
    for row in out["spread_check"]:
        assert min(row["receiver_load"]) > 0
        assert row["duplicates_accepted"] == row["messages_dropped"] == 0
    rows = out["model"]["rows"]
    assert [row["cores"] for row in rows] == list(range(1, 17))
    assert all(a["pps"] <= b["pps"] + 1e-9 for a, b in zip(rows, rows[1:]))
    costs = r["model"]["costs"]
    for key in ("c_seal", "c_open", "c_udp", "c_take", "c_would", "c_accept", "c_lock"):
        assert 0 < costs[key] < 1e-3, key
    assert any("lock" in a for a in out["model"]["assumptions"])
