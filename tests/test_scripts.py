"""The README's two commands (scripts/demo.sh, scripts/test.sh) and
scripts/setup.sh, started by a user who is not root on a machine without
sudo: one line saying they need root, exit 1, nothing done. (As root they
run in CI every time: .ci/run is scripts/test.sh.)"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def no_sudo_path():
    """A PATH directory that `nobody` can read, with the basic tools but no
    sudo, whether or not this machine has one."""
    bin_dir = pathlib.Path(tempfile.mkdtemp(prefix="wgebpf-nosudo-"))
    try:
        os.chmod(bin_dir, 0o755)
        for tool in ("bash", "env", "dirname", "basename", "printf"):
            found = shutil.which(tool)
            assert found, tool
            os.symlink(found, bin_dir / tool)
        yield bin_dir
    finally:
        shutil.rmtree(bin_dir)


@pytest.mark.parametrize("script", ["demo.sh", "test.sh", "setup.sh"])
def test_a_non_root_user_without_sudo_is_told_to_be_root(root, script, no_sudo_path):
    proc = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PATH={no_sudo_path}",
                           str(REPO / "scripts" / script)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert proc.stderr == f"{script}: needs root: run it as root (there is no sudo here)\n"
