"""The package as a user gets it: a wheel, installed (not editable) into a
fresh venv, run from outside the repository.

The eBPF C lives in the repository's bpf/ and reaches the package through the
link wgebpf/bpf -> ../bpf and [tool.setuptools.package-data]; bcc compiles it
at run time. These tests check that a wheel carries it, that the installed
package finds it inside site-packages (not in a source tree), and that the
installed `wgebpf attach` / `detach` work in a network namespace.

netns: needs root (bcc loads programs; attach creates links).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from wgebpf.lab import netns
from wgebpf.lab.netns import Namespace

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
BPF_SOURCES = sorted(p.name for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h"))

# What a source checkout holds that a build must not see (or that others
# working in the tree may be writing to at the same time).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", ".import_linter_cache",
                                    "bench-out")


def _run(argv, *, timeout: float, cwd: str | os.PathLike, env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


class Installed:
    """A venv with the wheel installed, and a working directory outside the repository."""

    def __init__(self, top: Path, wheel: Path):
        self.top = top
        self.wheel = wheel
        self.venv = top / "venv"
        self.python = self.venv / "bin" / "python"
        self.wgebpf = self.venv / "bin" / "wgebpf"
        self.cwd = top / "elsewhere"
        # Nothing that could point Python back at the source tree.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        self.env["PATH"] = f"{self.venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}"

    def run(self, *argv, timeout: float = 60, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in argv], cwd=self.cwd, env=self.env, input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result


@pytest.fixture(scope="module")
def installed(root):
    """Module scope; needs root. Builds the wheel from a copy of the working
    tree, installs it into a fresh --system-site-packages venv (Debian's bcc
    is a system package), removes it all afterwards."""
    top = Path(tempfile.mkdtemp(prefix="wgebpf-wheel-"))
    try:
        # A copy, so the build's build/ and *.egg-info never land in the
        # repository while others work in it. symlinks=True keeps
        # wgebpf/bpf a link, as in a checkout.
        src = top / "src"
        shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
        wheels = top / "wheels"
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
              "--no-deps", "-w", wheels, src], timeout=120, cwd=top)
        [wheel] = wheels.glob("wgebpf-*.whl")
        _run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", top / "venv"],
             timeout=60, cwd=top)
        _run([top / "venv" / "bin" / "pip", "install", "-q", "--disable-pip-version-check",
              wheel], timeout=180, cwd=top)
        shutil.rmtree(src)      # the installed package must not need its source tree
        (top / "elsewhere").mkdir()
        yield Installed(top, wheel)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_wheel_carries_the_ebpf_sources(installed):
    assert BPF_SOURCES and {"common.h", "tun_steer.c"} <= set(BPF_SOURCES)
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        for name in BPF_SOURCES:
            assert f"wgebpf/bpf/{name}" in names, sorted(n for n in names if "bpf" in n)
            assert whl.read(f"wgebpf/bpf/{name}") == (REPO / "bpf" / name).read_bytes(), name


def test_installed_package_compiles_its_own_ebpf_sources(installed):
    site = installed.run(installed.python, "-c",
                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"
                         ).stdout.strip()
    out = installed.run(installed.python, "-c",
                        "import wgebpf, bcc\n"
                        "from wgebpf.kernel import bpfmaps\n"
                        "print(wgebpf.__file__)\n"
                        "print(bpfmaps.BPF_DIR)\n"
                        "print(bcc.__file__)\n"
                        "bpfmaps.compile_programs('tun_steer.c')\n"
                        "print('compiled')\n", timeout=90).stdout.splitlines()
    package, bpf_dir, bcc_file, done = out
    assert package == f"{site}/wgebpf/__init__.py"
    assert bpf_dir == f"{site}/wgebpf/bpf"
    # Real files inside site-packages, not a link back to a source tree.
    assert not os.path.islink(bpf_dir)
    assert sorted(os.listdir(bpf_dir)) == BPF_SOURCES
    assert bcc_file.startswith("/usr/lib/python3/dist-packages/"), bcc_file
    assert done == "compiled"


def test_installed_attach_and_detach(installed):
    private = installed.run(installed.wgebpf, "genkey").stdout.strip()
    peer = installed.run(installed.wgebpf, "pubkey",
                         input=installed.run(installed.wgebpf, "genkey").stdout).stdout.strip()
    config = installed.top / "wgw.conf"
    config.touch(mode=0o600)
    config.write_text("[Interface]\n"
                      f"PrivateKey = {private}\n"
                      "ListenPort = 51820\n"
                      "Address = 198.51.100.1/24\n"
                      "Workers = 1\n"
                      "\n[Peer]\n"
                      f"PublicKey = {peer}\n"
                      "AllowedIPs = 198.51.100.2/32\n")
    ifname = netns.unique_ifname("wgw")
    socket = netns.UAPI_DIR / f"{ifname}.sock"
    log_path = installed.top / "attach.log"
    with Namespace("wheel") as ns:
        try:
            ns.ip("link", "add", "ul0", "type", "veth", "peer", "name", "ul1")
            ns.ip("link", "set", "ul0", "up")
            ns.ip("link", "set", "ul1", "up")
            with open(log_path, "wb") as log:
                proc = ns.popen([installed.wgebpf, "attach", "ul0", "--config", config,
                                 "--name", ifname], stdout=log, stderr=subprocess.STDOUT,
                                cwd=installed.cwd, env=installed.env)

            def answers() -> bool:
                assert proc.poll() is None, f"attach exited {proc.returncode}:\n" \
                    + log_path.read_text(errors="replace")[-3000:]
                return ns.run(["wg", "show", ifname], check=False).returncode == 0

            assert netns.wait_until(answers, 60, 0.2), log_path.read_text(errors="replace")
            shown = ns.run(["wg", "show", ifname]).stdout
            assert peer in shown and "listening port: 51820" in shown, shown
            assert ns.link_exists(ifname)

            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text(errors="replace")
            detach = installed.run("ip", "netns", "exec", ns.name, installed.wgebpf,
                                   "detach", ifname, check=False, timeout=30)
            assert detach.returncode == 0, detach.stdout + detach.stderr
            assert not ns.link_exists(ifname)
            assert not socket.exists()
        finally:
            if ns.link_exists(ifname) or socket.exists():
                installed.run("ip", "netns", "exec", ns.name, installed.wgebpf,
                              "detach", ifname, check=False, timeout=30)
                socket.unlink(missing_ok=True)


def test_installed_without_the_bench_extra_has_no_matplotlib(installed):
    # matplotlib is the extra `bench`, not a dependency...
    requires = installed.run(installed.python, "-c",
                             "from importlib.metadata import requires\n"
                             "print('\\n'.join(requires('wgebpf')))").stdout.splitlines()
    plot = [r for r in requires if r.startswith("matplotlib")]
    assert plot and all('extra == "bench"' in r for r in plot), requires
    # ...so a plain install has none (Debian's python3-matplotlib is not in
    # scripts/setup.sh's packages), and bench says so before it measures.
    out = installed.cwd / "bench-out"
    result = installed.run(installed.wgebpf, "bench", "--quick", "--output", out, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "wgebpf bench needs matplotlib: pip install 'wgebpf[bench]'\n"
    assert not out.exists()
