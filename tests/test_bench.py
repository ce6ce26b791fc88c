"""`wgebpf bench`: the plan, the statistics and the reports (unit), and a
quick real run in namespaces whose files are checked (netns)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wgebpf.lab import bench
from wgebpf.lab.bench import Setup

# -- Unit: no root needed --------------------------------------------------------


@pytest.mark.parametrize("systems, workers, selections, quick, expected", [
    (["wireguard-go-wireguard-go"], [1, 2], ["nexthop"], False,
     [Setup("wireguard-go-wireguard-go")]),
    (["wgebpf-wireguard-go"], [1, 2], ["nexthop", "allowedips"], False,
     [Setup("wgebpf-wireguard-go", 1, "nexthop"), Setup("wgebpf-wireguard-go", 1, "allowedips"),
      Setup("wgebpf-wireguard-go", 2, "nexthop"), Setup("wgebpf-wireguard-go", 2, "allowedips")]),
    (bench.DEFAULT_SYSTEMS, [1, 2], ["nexthop", "allowedips"], True,
     [Setup("wgebpf-wgebpf", 1, "nexthop"), Setup("wgebpf-wireguard-go", 1, "nexthop"),
      Setup("wireguard-go-wgebpf", 1, "nexthop"), Setup("wireguard-go-wireguard-go")]),
    (["wireguard-go-wgebpf"], [2], ["allowedips"], False,
     [Setup("wireguard-go-wgebpf", 2, "allowedips")]),
])
def test_plan_setups(systems, workers, selections, quick, expected):
    assert bench.plan_setups(systems, workers, selections, quick) == expected


def test_full_default_plan_has_thirteen_configurations():
    # Three pairings with wgebpf x 2 Workers counts x 2 selections, and the baseline.
    setups = bench.plan_setups(bench.DEFAULT_SYSTEMS, bench.DEFAULT_WORKERS,
                               bench.DEFAULT_SELECTIONS)
    assert len(setups) == 13 and len({s.id for s in setups}) == 13


def test_both_directions_of_the_mixed_pairing():
    assert bench.DEFAULT_SYSTEMS == list(bench.PAIRINGS)
    assert Setup("wgebpf-wireguard-go").a == "wgebpf"
    assert Setup("wgebpf-wireguard-go").b == "wireguard-go"
    assert Setup("wireguard-go-wgebpf").a == "wireguard-go"
    assert Setup("wireguard-go-wgebpf").b == "wgebpf"
    assert Setup("wireguard-go-wgebpf", 1, "nexthop").id == \
        "wireguard-go <-> wgebpf, Workers 1, nexthop"
    assert set(bench._COLOURS) == set(bench.PAIRINGS)


@pytest.mark.parametrize("systems, workers, selections", [
    (["wgebpf-boringtun"], [1], ["nexthop"]),
    (["wgebpf-wgebpf"], [0], ["nexthop"]),
    (["wgebpf-wgebpf"], [1], ["destination"]),
    (["wgebpf-wgebpf"], [], ["nexthop"]),
    ([], [1], ["nexthop"]),
])
def test_plan_setups_refuses(systems, workers, selections):
    with pytest.raises(ValueError):
        bench.plan_setups(systems, workers, selections)


@pytest.mark.parametrize("options", [
    {"workers": "1,x"}, {"workers": "0"}, {"systems": "nope"}, {"selections": "dst"},
    {"repeats": 0}, {"seconds": 0},
])
def test_main_bad_options_exit_2_before_anything_runs(options, capsys):
    assert bench.main(output_dir="/nonexistent/never-made", **options) == 2
    assert "wgebpf bench:" in capsys.readouterr().err
    assert not Path("/nonexistent/never-made").exists()


@pytest.mark.parametrize("values, expected", [
    ([], None),
    ([2.0], {"min": 2.0, "median": 2.0, "max": 2.0, "n": 1}),
    ([3.0, 1.0, 2.0], {"min": 1.0, "median": 2.0, "max": 3.0, "n": 3}),
    ([4.0, 1.0, 2.0, 3.0], {"min": 1.0, "median": 2.5, "max": 4.0, "n": 4}),
])
def test_summarize(values, expected):
    assert bench.summarize(values) == expected


def _config(system, medians, status="ok", errors=None):
    setup = Setup(system, *(() if system == bench.BASELINE else (1, "nexthop")))
    return {"id": setup.id, "system": system, "status": status,
            "summary": {k: {"min": v, "median": v, "max": v, "n": 1} for k, v in medians.items()},
            "runs": [{"repeat": 1, "values": dict(medians), "errors": errors or {}}]}


def _result(configs):
    return {"parameters": {"repeats": 1, "tcp_seconds": 1, "udp_max_loss_percent": 1.0,
                           "udp_payload_bytes": 64, "ping_count": 20, "ping_interval_s": 0.01},
            "machine": {"cpus": 2, "kernel": "test"}, "configurations": configs,
            "ratios": bench.ratios(configs)}


def test_ratios_and_markdown_with_a_failed_configuration():
    base = _config(bench.BASELINE, {"tcp1_gbps": 0.8, "ping_avg_ms": 0.4})
    ours = _config("wgebpf-wireguard-go", {"tcp1_gbps": 0.6, "ping_avg_ms": 0.5})
    back = _config("wireguard-go-wgebpf", {"tcp1_gbps": 0.4})
    broken = _config("wgebpf-wgebpf", {}, status="failed",
                     errors={"setup": "StartError: boom\nlong log", "log": "not shown"})
    result = _result([ours, back, broken, base])
    assert result["ratios"][ours["id"]] == pytest.approx({"tcp1_gbps": 0.75,
                                                          "ping_avg_ms": 1.25})
    assert result["ratios"][back["id"]] == pytest.approx({"tcp1_gbps": 0.5})
    assert "| wireguard-go <-> wgebpf, Workers 1, nexthop | 0.400 (0.400–0.400) |" \
        in bench.render_markdown(result)
    assert result["ratios"][broken["id"]] == {}
    md = bench.render_markdown(result)
    assert f"| {ours['id']} | 0.600 (0.600–0.600) |" in md
    assert f"| {broken['id']} **failed** | failed |" in md
    assert "| 0.75 |" in md
    assert f"- {broken['id']}, repeat 1, setup: StartError: boom" in md
    assert "not shown" not in md


def test_plot_draws_every_pairing_in_its_own_colour(tmp_path):
    configs = [_config(system, {m.key: 1.0 + i for m in bench.TABLE_METRICS})
               for i, system in enumerate(bench.PAIRINGS)]
    path = tmp_path / "bench.png"
    bench.render_plot(_result(configs), path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert len(set(bench._COLOURS.values())) == len(bench.PAIRINGS)


def test_cpu_seconds_counts_a_child_process():
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\n"
                              "time.sleep(30)"])
    try:
        time.sleep(0.05)
        assert child.pid in bench.process_tree(os.getpid())
        mine = bench.cpu_seconds(os.getpid())
        deadline = time.monotonic() + 10
        while bench.cpu_seconds(os.getpid()) - mine < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bench.cpu_seconds(os.getpid()) - mine >= 0.25
    finally:
        child.kill()
        child.wait()


# -- netns: a quick real run -----------------------------------------------------

# -- Unit: a compared tree ------------------------------------------------------


def _tree(path: Path, files=("wgebpf/cli.py", "bpf/common.h")) -> Path:
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("# stand-in\n")
    return path


def test_plan_with_a_tree_runs_each_wgebpf_twin_right_after_it(tmp_path):
    tree = bench.Tree(str(tmp_path), "abc1234")
    setups = bench.plan_setups(["wgebpf-wgebpf", "wireguard-go-wireguard-go"], [1, 2],
                               ["nexthop"], tree=tree)
    assert [s.id for s in setups] == [
        "wgebpf <-> wgebpf, Workers 1, nexthop",
        "wgebpf <-> wgebpf, Workers 1, nexthop [abc1234]",
        "wgebpf <-> wgebpf, Workers 2, nexthop",
        "wgebpf <-> wgebpf, Workers 2, nexthop [abc1234]",
        "wireguard-go <-> wireguard-go"]
    assert setups[1].twin_of == setups[0]
    assert setups[0].launch() == {}
    launch = setups[1].launch()
    assert launch["cwd"] == str(tmp_path)
    assert launch["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)


def test_tree_label_is_the_git_revision_and_says_dirty(tmp_path):
    tree = _tree(tmp_path)
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert bench.Tree.at(str(tree)) == bench.Tree(str(tree), head)
    (tree / "wgebpf/cli.py").write_text("# changed\n")
    assert bench.Tree.at(str(tree)).label == f"{head}-dirty"


def test_tree_outside_git_is_labelled_by_its_folder(tmp_path):
    tree = _tree(tmp_path / "base")
    assert bench.Tree.at(str(tree)).label == "base"


@pytest.mark.parametrize("files", [(), ("wgebpf/cli.py",), ("bpf/common.h",)])
def test_a_folder_without_wgebpf_is_refused_before_anything_runs(tmp_path, files, capsys):
    tree = _tree(tmp_path / "t", files) if files else tmp_path
    with pytest.raises(ValueError, match="expected a checkout of wgebpf"):
        bench.Tree.at(str(tree))
    assert bench.main(output_dir=str(tmp_path / "out"), compare_tree=str(tree)) == 2
    assert "wgebpf bench: compare tree" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tree_ratios_divide_this_codes_medians_by_its_twins(tmp_path):
    tree = bench.Tree(str(tmp_path), "abc1234")
    ours = _config("wgebpf-wgebpf", {"tcp1_gbps": 1.1, "cpu_b_s_per_gb": 6.0})
    twin_setup = Setup("wgebpf-wgebpf", 1, "nexthop", tree)
    twin = dict(_config("wgebpf-wgebpf", {"tcp1_gbps": 1.0, "cpu_b_s_per_gb": 8.0}),
                id=twin_setup.id, tree=tree.path, twin_of=ours["id"])
    base = _config(bench.BASELINE, {"tcp1_gbps": 0.5})
    result = _result([ours, twin, base])
    result["tree_ratios"] = bench.tree_ratios([ours, twin, base])
    result["parameters"]["compare_tree"] = {"path": tree.path, "label": tree.label}
    assert result["tree_ratios"] == {
        ours["id"]: pytest.approx({"tcp1_gbps": 1.1, "cpu_b_s_per_gb": 0.75})}
    assert result["ratios"][twin["id"]] == pytest.approx({"tcp1_gbps": 2.0})
    md = bench.render_markdown(result)
    assert "on the compared tree abc1234, measured alternating in this run" in md
    assert f"| {ours['id']} | 1.10 | - | - | - | - | 0.75 |" in md
    bench.render_plot(result, tmp_path / "bench.png")   # the twin drawn hatched


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.netns
@pytest.mark.timeout(150)
def test_quick_bench_writes_every_configuration_and_metric(tmp_path):
    out = tmp_path / "bench-out"
    proc = subprocess.run([str(Path(sys.executable).with_name("wgebpf")), "bench", "--quick",
                           "--workers", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=140)  # ~25 s idle
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads((out / "bench.json").read_text())
    expected = {s.id for s in bench.plan_setups(bench.DEFAULT_SYSTEMS, [2],
                                                bench.DEFAULT_SELECTIONS, quick=True)}
    assert {c["id"] for c in result["configurations"]} == expected
    for c in result["configurations"]:
        assert c["status"] == "ok", (c["id"], c["runs"][0]["errors"])
        s = {k: v["median"] for k, v in c["summary"].items()}
        assert set(s) == {m.key for m in bench.METRICS}, c["id"]
        where = f"{c['id']}: {s}"
        assert 0.01 < s["tcp1_gbps"] < 100 and 0.01 < s["tcp4_gbps"] < 100, where
        assert 1 < s["udp64_kpps"] <= s["udp64_sat_kpps"] * 2, where
        assert 0 < s["ping_min_ms"] <= s["ping_avg_ms"] <= s["ping_max_ms"] < 1000, where
        assert 0 <= s["ping_mdev_ms"], where
        # A gigabyte costs some CPU, and less than the whole machine for a minute.
        assert 0.1 < s["cpu_a_s_per_gb"] < 120 and 0.1 < s["cpu_b_s_per_gb"] < 120, where
    assert set(result["ratios"]) == expected - {"wireguard-go <-> wireguard-go"}

    table = (out / "bench.md").read_text()
    assert table in proc.stdout  # main prints the same table
    for cid in expected:
        assert f"| {cid} |" in table

    png = (out / "bench.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.image
    image = matplotlib.image.imread(out / "bench.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_progress_says_what_runs_now_and_time_left_in_plain_lines(tmp_path, monkeypatch, capsys):
    """Not a terminal (pytest's capture): one plain line per run started and
    per run finished, naming the configuration, runs done and time left."""
    def fake_repeat(setup, plan):
        return {"values": {"tcp1_gbps": 1.0}, "errors": {}, "detail": {}, "seconds": 0.0}
    monkeypatch.setattr(bench, "run_repeat", fake_repeat)
    monkeypatch.setattr(bench, "render_plot", lambda result, path: None)
    bench.run(str(tmp_path), ["wgebpf-wgebpf", "wireguard-go-wireguard-go"], [2], ["nexthop"],
              repeats=2, seconds=1, quick=False)
    lines = capsys.readouterr().err.splitlines()
    running = [line for line in lines if "running" in line]
    assert len(running) == 4
    assert running[0].startswith("bench: [1/2] running wgebpf <-> wgebpf, Workers 2, nexthop; "
                                 "0 of 4 runs done, about ")
    assert running[3].startswith("bench: [2/2] running wireguard-go <-> wireguard-go; "
                                 "3 of 4 runs done, about ")
    assert all(line.endswith("min left") for line in running)
    assert not any("\r" in line or "\033" in line for line in lines)


@pytest.mark.netns
@pytest.mark.timeout(150)
def test_compare_tree_runs_the_trees_own_code(tmp_path):
    """A copy of this code whose package records each process importing it:
    the twin's daemons and their workers, not the bench itself."""
    repo = Path(__file__).resolve().parent.parent
    tree = tmp_path / "tree"
    for part in ("wgebpf", "bpf"):
        shutil.copytree(repo / part, tree / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    imports = tmp_path / "imports"
    init = tree / "wgebpf" / "__init__.py"
    init.write_text(init.read_text() + "\nimport os as _os\n"
                    f"with open({str(imports)!r}, 'a') as _f:\n"
                    "    _f.write(f'{_os.getpid()}\\n')\n")
    out = tmp_path / "out"
    code = bench.main(output_dir=str(out), systems=["wgebpf-wgebpf"], workers="2",
                      selections="nexthop", quick=True, compare_tree=str(tree))
    result = json.loads((out / "bench.json").read_text())
    assert code == 0, [r["errors"] for c in result["configurations"] for r in c["runs"]]
    ours, twin = result["configurations"]
    assert twin["id"] == f"{ours['id']} [tree]" and twin["twin_of"] == ours["id"]
    assert set(result["tree_ratios"][ours["id"]]) == {m.key for m in bench.METRICS}
    # Two daemons with two workers each (and the CLI's helpers: wgebpf show/status).
    pids = set(imports.read_text().split())
    assert len(pids) >= 6
    assert str(os.getpid()) not in pids
