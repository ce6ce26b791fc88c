"""matplotlib is the optional extra `bench`: without it `wgebpf bench` says
so in one line and exits 2, before it measures or creates anything, and the
rest of wgebpf does not need it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from wgebpf.lab import bench

# Run the CLI with matplotlib made unimportable (a None in sys.modules makes
# `import matplotlib...` raise ImportError), as in an install without the extra.
WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None
from wgebpf.cli import main
sys.argv = ["wgebpf", *sys.argv[1:]]
main()
"""


def without_matplotlib(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, *args],
                          capture_output=True, text=True, timeout=60)


def test_bench_without_matplotlib_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "bench-out"
    result = without_matplotlib("bench", "--quick", "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr == "wgebpf bench needs matplotlib: pip install 'wgebpf[bench]'\n"
    assert result.stdout == ""
    assert not out.exists()


def test_other_commands_do_not_need_matplotlib():
    result = without_matplotlib("genkey")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 44


def test_missing_matplotlib_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    try:
        bench.figure_class()
    except bench.MissingDependency as exc:
        assert str(exc) == bench.MATPLOTLIB_MISSING
        assert "\n" not in str(exc) and "pip install 'wgebpf[bench]'" in str(exc)
    else:
        raise AssertionError("figure_class() did not notice matplotlib is missing")
    assert bench.main(output_dir="/nonexistent/never-made", quick=True) == 2
    assert not Path("/nonexistent/never-made").exists()


def test_figure_class_with_matplotlib_installed():
    # scripts/setup.sh installs the extra, so here it is there.
    assert bench.figure_class().__name__ == "Figure"
