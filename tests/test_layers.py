"""The layering of the package (README, Layout) holds: import-linter's
contract in pyproject.toml, checked by its own command line."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_no_layer_imports_a_layer_above_it():
    lint = shutil.which("lint-imports", path=str(pathlib.Path(sys.executable).parent))
    assert lint, "import-linter is not installed: scripts/setup.sh installs the test extras"
    proc = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout, proc.stdout


def test_every_module_is_in_a_layer():
    """A module at the top of the package escapes the contract."""
    top = {p.name for p in (REPO / "wgebpf").glob("*.py")}
    assert top == {"__init__.py", "cli.py"}, top
