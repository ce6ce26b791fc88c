"""wgebpf as wg-quick's userspace implementation (`wgebpf-go IFNAME`).

The netns tests run the real /usr/bin/wg-quick inside namespace A of the
standard topology (wgebpf/lab/netns.py), with
WG_QUICK_USERSPACE_IMPLEMENTATION pointing at the venv's wgebpf-go, against
Debian's wireguard-go on B. The wg-quick file lives in a temporary directory
(wg-quick accepts a path); the interface name is unique per run. No DNS= (no
resolvconf) and only specific AllowedIPs (no default-route policy rules).

systemd is not running in CI, so wg-quick@.service itself is not started:
the unit runs exactly `wg-quick up %i` and `wg-quick down %i`, which these
tests run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from wgebpf.control import quick
from wgebpf.control.state import RUN_DIR, is_attach_cmdline
from wgebpf.lab import netns
from wgebpf.lab.netns import A_TUNNEL4, A_TUNNEL6, B_TUNNEL4, B_TUNNEL6

netns_test = pytest.mark.netns
WGEBPF_GO = Path(sys.executable).with_name("wgebpf-go")


# -- settings and arguments (no root needed) ---------------------------------------


def test_settings_from_file_and_environment(tmp_path):
    path = tmp_path / "wg0.wgebpf"
    path.write_text("[wgebpf]\n# comment\nPeerSelection = allowedips\nWorkers = 2\n"
                    "SourcePolicy = fib\nXDP = generic\nMetrics = 127.0.0.1:9586\n")
    env = {"WGEBPF_CONFIG": str(path), "WGEBPF_WORKERS": "1", "WGEBPF_UNDERLAY": "eth0"}
    config, underlay, xdp = quick.build("wg0", env)
    iface = config.interface
    assert (iface.peer_selection, iface.source_policy, iface.workers) == ("allowedips", "fib", 1)
    assert (iface.metrics, underlay, xdp) == ("127.0.0.1:9586", "eth0", "generic")
    assert iface.private_key is None and iface.table == "off" and config.peers == []


def test_settings_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.setattr(quick, "CONFIG_DIR", str(tmp_path))
    config, underlay, xdp = quick.build("wg0", {})
    assert (config.interface.peer_selection, underlay, xdp) == ("nexthop", None, "auto")
    # The file beside the wg-quick one is read when it exists.
    (tmp_path / "wg0.wgebpf").write_text("PeerSelection = allowedips\n")
    assert quick.build("wg0", {})[0].interface.peer_selection == "allowedips"


@pytest.mark.parametrize("env, text, message", [
    ({"WGEBPF_PEER_SELECTION": "fastest"}, None, "WGEBPF_PEER_SELECTION"),
    ({"WGEBPF_XDP": "turbo"}, None, "WGEBPF_XDP"),
    ({"WGEBPF_WORKERS": "0"}, None, "WGEBPF_WORKERS"),
    ({"WGEBPF_UNDERLAY": "a/b"}, None, "WGEBPF_UNDERLAY"),
    ({}, "ListenPort = 1\n", ":1: unknown setting"),
    ({}, "Metrics = 9586\n", ":1: Metrics"),
])
def test_bad_settings_are_refused(tmp_path, env, text, message):
    path = tmp_path / "wg0.wgebpf"
    if text is not None:
        path.write_text(text)
    env = dict(env, WGEBPF_CONFIG=str(path)) if text is not None else env
    with pytest.raises(quick.UsageError, match=message):
        quick.build("wg0", env)


def test_arguments():
    assert quick.parse_argv(["wg0"], {}) == ("wg0", False)
    assert quick.parse_argv(["-f", "wg0"], {}) == ("wg0", True)
    assert quick.parse_argv(["wg0"], {"WG_PROCESS_FOREGROUND": "1"}) == ("wg0", True)
    for bad in ([], ["a", "b"], ["--bogus", "wg0"], ["x" * 16], ["../x"]):
        with pytest.raises(quick.UsageError):
            quick.parse_argv(bad, {})


def test_bad_use_exits_2_before_anything():
    result = subprocess.run([str(WGEBPF_GO)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "Usage: wgebpf-go" in result.stderr
    result = subprocess.run([str(WGEBPF_GO), "wg0"], capture_output=True, text=True,
                            timeout=30, env=dict(os.environ, WGEBPF_XDP="turbo"))
    assert result.returncode == 2 and "WGEBPF_XDP" in result.stderr


def test_wgebpf_ifname_points_to_wgebpf_go():
    # What WG_QUICK_USERSPACE_IMPLEMENTATION=wgebpf makes wg-quick run.
    wgebpf = netns.wgebpf_argv()
    result = subprocess.run(wgebpf + ["wg0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "WG_QUICK_USERSPACE_IMPLEMENTATION=wgebpf-go" in result.stderr, result.stderr


def test_detach_recognises_the_daemon():
    argv = ["/venv/bin/python", "/venv/bin/wgebpf-go", "wg0"]
    assert is_attach_cmdline(argv, "wg0")
    assert is_attach_cmdline(argv[:2] + ["-f", "wg0"], "wg0")
    assert not is_attach_cmdline(argv, "wg1")


# -- wg-quick in namespaces -------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class QuickSide:
    """Host A's interface, brought up and down by the real wg-quick."""

    def __init__(self, topo: netns.TwoHosts, config: netns.InterfaceConfig,
                 settings: str | None = None, env: dict[str, str] | None = None):
        for tool in ("wg-quick", "wg", "wireguard-go", "tc", "nft"):
            assert shutil.which(tool), f"{tool} is not installed (a missing dependency)"
        assert WGEBPF_GO.exists(), f"{WGEBPF_GO} is missing: run ./scripts/setup.sh"
        self.topo, self.ns, self.config = topo, topo.a, config
        self.ifname = netns.unique_ifname("wgq")
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.ifname}-"))
        self.conf = self.dir / f"{self.ifname}.conf"
        self.write(config.to_wg_quick())
        self.log_path = self.dir / "log"
        self.env = dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION=str(WGEBPF_GO),
                        WGEBPF_LOG_FILE=str(self.log_path), **(env or {}))
        self.env.pop("WG_PROCESS_FOREGROUND", None)
        if settings is not None:
            (self.dir / f"{self.ifname}.wgebpf").write_text(settings)
            self.env["WGEBPF_CONFIG"] = str(self.dir / f"{self.ifname}.wgebpf")
        self.pid: int | None = None

    def write(self, text: str) -> None:
        self.conf.touch(0o600)
        self.conf.write_text(text)

    def wg_quick(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.run(["wg-quick", command, str(self.conf)], env=self.env,
                           check=check, timeout=90)

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.ns.run(["wg", *args], check=check)

    def up(self) -> subprocess.CompletedProcess:
        result = self.wg_quick("up")
        with open(os.path.join(RUN_DIR, f"{self.ifname}.json")) as f:
            self.pid = json.load(f)["pid"]
        assert _alive(self.pid)
        return result

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def status(self) -> dict:
        out = self.ns.run(netns.wgebpf_argv() + ["status", self.ifname, "--json"]).stdout
        return json.loads(out)

    def close(self) -> None:
        """Whatever a failed test left: wg-quick down, then detach, then
        the daemon (a process this test started, by its pid) killed."""
        if self.ns.link_exists(self.ifname):
            self.wg_quick("down", check=False)
        if self.pid is not None and _alive(self.pid):
            netns.wait_until(lambda: not _alive(self.pid), 5)
        if self.pid is not None and _alive(self.pid):
            argv = open(f"/proc/{self.pid}/cmdline", "rb").read().split(b"\0")
            if any(a.endswith(b"wgebpf-go") for a in argv):
                os.kill(self.pid, signal.SIGKILL)
        self.ns.run(netns.wgebpf_argv() + ["detach", self.ifname], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def quick_pair(topo):
    """Function scope. make(settings=None, env=None) -> (a: QuickSide, b:
    wireguard-go started on B); A is not up yet."""
    sides = []

    def make(settings: str | None = None, env: dict | None = None):
        a_cfg, b_cfg = netns.side_configs()
        b = topo.track(netns.make_side("wireguard-go", topo.b, b_cfg, tag="wgb"))
        b.start()
        a = QuickSide(topo, a_cfg, settings, env)
        sides.append(a)
        return a, b
    yield make
    for a in sides:
        print(f"===== wgebpf-go {a.ifname} log =====\n{a.log()}")   # shown on failure
        a.close()


def assert_nothing_left(a: QuickSide) -> None:
    ns, name = a.ns, a.ifname
    assert netns.wait_until(lambda: not _alive(a.pid), 10), f"pid {a.pid} still runs"
    assert not ns.link_exists(name)
    assert not (netns.UAPI_DIR / f"{name}.sock").exists()
    assert not os.path.exists(os.path.join(RUN_DIR, f"{name}.json"))
    links = ns.ip("link", "show").stdout
    assert "xdp" not in links and "wgx_guard" not in links, links
    assert "clsact" not in ns.run(["tc", "qdisc", "show"]).stdout
    assert "wgebpf" not in ns.run(["nft", "list", "tables"]).stdout
    assert name not in a.wg("show", "interfaces").stdout.split()
    detach = ns.run(netns.wgebpf_argv() + ["detach", name]).stdout
    assert "no state file" in detach and "removed" not in detach and "stopped" not in detach, \
        detach


@netns_test
def test_wg_quick_up_traffic_down(topo, quick_pair):
    # wgebpf's own settings: Workers from the file beside the config,
    # PeerSelection from the environment.
    a, b = quick_pair(settings="Workers = 1\nSourcePolicy = allowedips\n",
                      env={"WGEBPF_PEER_SELECTION": "allowedips"})
    result = a.up()
    assert f"wgebpf-go {a.ifname}" in result.stderr and "wg setconf" in result.stderr
    dump = netns.parse_dump(a.wg("show", a.ifname, "dump").stdout)
    assert dump.listen_port == netns.A_PORT and dump.public_key == a.config.public_key
    assert list(dump.peers) == [b.public_key]
    status = a.status()
    assert status["peer_selection"] == "allowedips" and len(status["workers"]) == 1
    # The guard sits on the interface that carries the port, and the log says so.
    assert "xdp" in a.ns.ip("link", "show", "dev", topo.underlay_a).stdout
    assert f"XDP guard for UDP port {netns.A_PORT} on {topo.underlay_a} (native)" in a.log()
    assert netns.ping(topo.a, B_TUNNEL4, count=3, timeout=10)
    assert netns.ping(topo.b, A_TUNNEL4, count=3, timeout=10)
    assert netns.ping(topo.a, B_TUNNEL6, count=3, timeout=10)
    assert netns.ping(topo.b, A_TUNNEL6, count=3, timeout=10)
    # The MTU wg-quick computed (the veth's 1500 - 80) is the one in use.
    assert "mtu 1420" in a.ns.ip("link", "show", "dev", a.ifname).stdout

    result = a.wg_quick("down")
    assert f"ip link delete dev {a.ifname}" in result.stderr
    assert_nothing_left(a)
    assert "shutting down" in a.log()


@netns_test
def test_wg_quick_save_strip_syncconf(topo, quick_pair):
    a, b = quick_pair()
    a.up()
    assert netns.ping(topo.a, B_TUNNEL4, count=2, timeout=10)
    original = a.conf.read_text()
    # A peer added live is what `wg-quick save` writes back.
    extra_key = netns.pubkey(netns.genkey())
    a.wg("set", a.ifname, "peer", extra_key, "allowed-ips", "203.0.113.64/26")
    a.wg_quick("save")
    saved = a.conf.read_text()
    assert extra_key in saved and "203.0.113.64/26" in saved
    assert "Address = 198.51.100.1/24" in saved and "ListenPort = 51820" in saved
    assert b.public_key in saved
    # strip: what `wg setconf`/`syncconf` takes; syncconf with the original
    # (stripped) removes the extra peer and keeps the session.
    a.write(original)
    stripped = a.wg_quick("strip").stdout
    assert "Address" not in stripped and b.public_key in stripped
    strip_file = a.dir / "stripped.conf"
    strip_file.touch(0o600)
    strip_file.write_text(stripped)
    before = netns.parse_dump(a.wg("show", a.ifname, "dump").stdout)
    a.wg("syncconf", a.ifname, str(strip_file))
    after = netns.parse_dump(a.wg("show", a.ifname, "dump").stdout)
    assert set(after.peers) == {b.public_key}
    assert after.peers[b.public_key].latest_handshake == before.peers[b.public_key].latest_handshake
    assert netns.ping(topo.b, A_TUNNEL4, count=2, timeout=10)
    # syncconf that adds a peer back.
    strip_file.write_text(stripped + f"\n[Peer]\nPublicKey = {extra_key}\n"
                                      f"AllowedIPs = 203.0.113.64/26\n")
    a.wg("syncconf", a.ifname, str(strip_file))
    assert extra_key in a.wg("show", a.ifname, "peers").stdout
    a.wg_quick("down")
    assert_nothing_left(a)


@netns_test
def test_removing_the_socket_stops_it(topo, quick_pair):
    a, b = quick_pair()
    a.up()
    (netns.UAPI_DIR / f"{a.ifname}.sock").unlink()
    assert_nothing_left(a)
    assert "was removed: shutting down" in a.log()


@netns_test
def test_foreground_and_sigterm(topo, quick_pair):
    # WG_PROCESS_FOREGROUND=1 (as wireguard-go): stays in the foreground,
    # ready when `wg show` answers; SIGTERM takes everything down, exit 0.
    a, b = quick_pair()
    env = dict(a.env, WG_PROCESS_FOREGROUND="1")
    env.pop("WGEBPF_LOG_FILE")
    with open(a.log_path, "wb") as log:
        proc = topo.a.popen([str(WGEBPF_GO), a.ifname], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    a.pid = proc.pid
    assert netns.wait_until(
        lambda: proc.poll() is None and a.wg("show", a.ifname, check=False).returncode == 0,
        30), a.log()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, a.log()
    assert_nothing_left(a)


@netns_test
def test_guard_on_every_carrier_and_detach_after_a_crash(topo, quick_pair):
    # A second interface that can carry the port gets the same guard; after
    # kill -9 (this test's own daemon, by pid) `wgebpf detach` removes the
    # link, the socket and the guard from both.
    a, b = quick_pair()
    other = netns.Namespace("q")
    topo.extra.append(other)            # closed with the topology
    dummy, _ = netns.veth(topo.a, other, ["203.0.113.1/24"], ["203.0.113.3/24"],
                          prefix_a="vq", prefix_b="vr")
    a.up()
    for ifname in (topo.underlay_a, dummy):
        assert "prog/xdp" in topo.a.ip("link", "show", "dev", ifname).stdout, ifname
    assert f"{topo.underlay_a} (native), {dummy} (native)" in a.log(), a.log()
    assert netns.ping(topo.a, B_TUNNEL4, count=2, timeout=10)
    os.kill(a.pid, signal.SIGKILL)
    assert netns.wait_until(lambda: not _alive(a.pid), 10)
    out = topo.a.run(netns.wgebpf_argv() + ["detach", a.ifname]).stdout
    # The TUN went with the process; the socket and the guards stayed.
    assert "removed stale UAPI socket" in out, out
    assert out.count("removed XDP program") == 2, out
    assert_nothing_left(a)


@netns_test
def test_a_failed_start_says_why(topo, quick_pair):
    # The name is taken (by the veth): wgebpf-go exits 1 with the reason,
    # wg-quick fails, and nothing is left.
    a, b = quick_pair()
    result = topo.a.run([str(WGEBPF_GO), topo.underlay_a], check=False, env=a.env)
    assert result.returncode == 1, result
    assert "already exists" in result.stderr, result.stderr
    assert not (netns.UAPI_DIR / f"{topo.underlay_a}.sock").exists()
    assert not os.path.exists(os.path.join(RUN_DIR, f"{topo.underlay_a}.json"))
