"""Runtime state records and `detach`, against the real kernel.

The detach tests start a child that looks like `wgebpf attach NAME` (a script
named wgebpf), let it create a TUN, addresses, routes with the default-route
rules and a UAPI socket, record them, then end it the way a crash would, and
check that detach leaves the namespace as it was. Everything runs in a fresh
network namespace (the test thread enters it with setns); RUN_DIR and
SOCKET_DIR point into tmp_path.
"""

import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
from pyroute2 import IPRoute

from wgebpf.kernel import link, tc, xdp_guard
from wgebpf.control import state
from wgebpf.control.state import RuntimeState, StateError, detach, is_attach_cmdline
from wgebpf.dataplane.tun import Tun

from nsutil import (BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP, fresh_netns,  # noqa: F401
                    load_const_prog as _load_const_prog, sh as _sh)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """RUN_DIR and SOCKET_DIR in tmp_path (also for children, via the environment)."""
    run, sock = tmp_path / "run", tmp_path / "sock"
    sock.mkdir()
    monkeypatch.setattr(state, "RUN_DIR", str(run))
    monkeypatch.setattr(state, "SOCKET_DIR", str(sock))
    monkeypatch.setenv("WGEBPF_TEST_RUN_DIR", str(run))
    monkeypatch.setenv("WGEBPF_TEST_SOCKET_DIR", str(sock))
    return run, sock



def _ifname() -> str:
    return f"wgt{secrets.token_hex(4)}"


def _snapshot() -> str:
    return _sh("ip link; ip route show table all; ip -6 route show table all; ip rule; ip -6 rule")


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid




# --- save / load ----------------------------------------------------------------

def test_save_load_roundtrip(dirs):
    run, _ = dirs
    st = RuntimeState(name="wgs0", pid=os.getpid(), underlay="eth9",
                      routes=[{"kind": "route", "family": 4, "table": 254,
                               "dst": "198.51.100.0/24"}],
                      tc_filters=[tc.tc_record(7, "eth9", "ffff:fff3", prio=1, clsact=True)],
                      nft_tables=["inet wgebpf_wgs0"],
                      xdp=xdp_guard.xdp_record(7, "eth9", 42, "generic"), extra={"workers": 2})
    assert st.socket_path == os.path.join(state.SOCKET_DIR, "wgs0.sock")
    st.save()
    path = run / "wgs0.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert os.listdir(run) == ["wgs0.json"], "no temporary file left behind"
    assert json.loads(path.read_text())["version"] == 1
    loaded = RuntimeState.load("wgs0")
    assert loaded == st
    assert loaded.pid_start is not None and loaded.netns is not None
    st.routes.append({"kind": "rule"})
    st.save()                                  # rewriting replaces atomically
    assert RuntimeState.load("wgs0").routes == st.routes
    st.remove()
    st.remove()                                # idempotent
    assert RuntimeState.load("wgs0") is None


@pytest.mark.parametrize("content", ["{not json", "[]", '{"name": "other", "pid": 1}',
                                     '{"name": "wgs1"}'])
def test_load_rejects_bad_files(dirs, content):
    run, _ = dirs
    run.mkdir()
    (run / "wgs1.json").write_text(content)
    with pytest.raises(StateError):
        RuntimeState.load("wgs1")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".", "x" * 16])
def test_names_that_could_escape_run_dir_are_refused(dirs, name):
    with pytest.raises(ValueError):
        RuntimeState(name=name, pid=1)
    with pytest.raises(ValueError):
        detach(name)


@pytest.mark.parametrize("argv, name, expected", [
    (["/usr/bin/python3", "/usr/local/bin/wgebpf", "attach", "eth0", "wg0.conf"], "wg0", True),
    (["wgebpf", "attach", "eth0", "/etc/wireguard/wg0.conf"], "wg0", True),
    (["wgebpf", "attach", "eth0", "--name", "wg1", "x.conf"], "wg1", True),
    (["wgebpf", "attach", "eth0", "--name=wg1", "x.conf"], "wg1", True),
    (["python3", "-m", "wgebpf", "attach", "eth0", "wg0.conf"], "wg0", True),
    (["python3", "-m", "wgebpf.cli", "attach", "eth0", "wg0.conf"], "wg0", True),
    (["wgebpf", "attach", "eth0", "wg0.conf"], "wg1", False),       # another interface
    (["wgebpf", "detach", "wg0"], "wg0", False),                    # not an attach
    (["wg0", "attach"], "wg0", False),                              # not wgebpf
    (["vim", "wgebpf", "wg0.conf"], "wg0", False),
    (["python3", "-c", "wgebpf attach wg0"], "wg0", False),
    ([], "wg0", False),
])
def test_is_attach_cmdline(argv, name, expected):
    assert is_attach_cmdline(argv, name) is expected


# --- detach after a crash ---------------------------------------------------------

CHILD = textwrap.dedent("""
    import ipaddress, os, signal, socket, sys, time
    from wgebpf.kernel import link
    from wgebpf.control import state
    from wgebpf.dataplane.tun import Tun
    state.RUN_DIR = os.environ["WGEBPF_TEST_RUN_DIR"]
    state.SOCKET_DIR = os.environ["WGEBPF_TEST_SOCKET_DIR"]
    name, behaviour = sys.argv[2], sys.argv[3]
    st = state.RuntimeState(name=name, pid=os.getpid())
    st.save()                                   # before anything outlives us
    tun = Tun.create(name, queues=2)
    link.configure(name, [ipaddress.ip_interface("192.0.2.1/24"),
                          ipaddress.ip_interface("2001:db8::1/64")], 1420)
    routes = link.add_routes(name, ["198.51.100.0/24", "0.0.0.0/0", "::/0"], "auto", 0)
    st.routes = [r.to_dict() for r in routes]
    st.save()
    uapi = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uapi.bind(st.socket_path)
    uapi.listen()
    if behaviour == "ignores-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    while True:
        time.sleep(60)
""")


@pytest.fixture
def attach_child(netns, dirs, tmp_path):
    """Start fake `wgebpf attach NAME` children; they are killed and reaped at the end."""
    script = tmp_path / "wgebpf"                 # the name detach's cmdline check looks for
    script.write_text(CHILD)
    children = []

    def start(name: str, behaviour: str = "normal") -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, str(script), "attach", name, behaviour],
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout.readline().strip() == "ready"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


@pytest.mark.netns
@pytest.mark.parametrize("ending, expect_line", [
    ("kill -9", "is not running"),
    ("still running", "stopped process"),
    ("ignores-sigterm", "killed with SIGKILL"),
])
def test_detach_removes_everything(attach_child, dirs, ending, expect_line):
    _, sockdir = dirs
    name = _ifname()
    before = _snapshot()
    child = attach_child(name, "ignores-sigterm" if ending == "ignores-sigterm" else "normal")
    recorded = RuntimeState.load(name)
    assert recorded.pid == child.pid and len(recorded.routes) == 7   # 3 routes + 2x2 rules
    assert "suppress_prefixlength 0" in _sh("ip rule") and link.link_exists(name)
    if ending == "kill -9":
        child.kill()
        child.wait()

    lines = detach(name, timeout=0.5)

    text = "\n".join(lines)
    assert expect_line in text, text
    assert "FAILED" not in text, text
    assert child.wait(timeout=5) is not None
    assert not link.link_exists(name)
    assert not (sockdir / f"{name}.sock").exists()
    assert _snapshot() == before, "routes, rules or links left behind"
    assert RuntimeState.load(name) is None
    assert any("removed" in line and ".json" in line for line in lines)
    # A second detach finds nothing and does nothing harmful.
    assert "no state file" in "\n".join(detach(name))


@pytest.mark.netns
def test_detach_without_state_removes_tun_and_stale_socket(netns, dirs):
    _, sockdir = dirs
    name = _ifname()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / f"{name}.sock"))
    stale.close()                                # the file stays, nobody answers
    # A TUN whose owner still holds its fd (a persistent TUN looks the same).
    with Tun.create(name):
        lines = detach(name)
        assert not link.link_exists(name)
    text = "\n".join(lines)
    assert "no state file" in text and f"removed link {name}" in text
    assert "removed stale UAPI socket" in text and "FAILED" not in text
    assert not (sockdir / f"{name}.sock").exists()


@pytest.mark.netns
def test_detach_leaves_a_live_instance_alone(netns, dirs):
    _, sockdir = dirs
    name = _ifname()
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sockdir / f"{name}.sock"))
    live.listen()
    try:
        with Tun.create(name):
            lines = detach(name)
            assert link.link_exists(name)
        assert (sockdir / f"{name}.sock").exists()
        assert "live process" in "\n".join(lines)
    finally:
        live.close()


@pytest.mark.netns
def test_detach_refuses_to_delete_a_link_that_is_not_a_tun(netns, dirs):
    name = _ifname()
    _sh(f"ip link add {name} type veth peer name {name}p")
    lines = detach(name)
    assert link.link_exists(name)
    assert any(line.startswith("FAILED") and "not a TUN" in line for line in lines)


@pytest.mark.netns
def test_detach_does_not_signal_a_stranger(netns, dirs):
    name = _ifname()
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        RuntimeState(name=name, pid=stranger.pid).save()
        lines = detach(name, timeout=0.2)
        assert stranger.poll() is None, "an unrelated process was signalled"
        assert any("not a wgebpf attach" in line for line in lines)
        assert RuntimeState.load(name) is None
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.netns
def test_detach_does_not_signal_a_reused_pid(attach_child):
    name = _ifname()
    child = attach_child(name)
    st = RuntimeState.load(name)
    st.pid_start -= 1                             # as if the pid had been reused since
    st.save()
    lines = detach(name, timeout=0.2)
    assert child.poll() is None
    assert any("belongs to another process" in line for line in lines)


@pytest.mark.netns
def test_detach_from_another_namespace_keeps_kernel_objects(netns, dirs):
    name = _ifname()
    st = RuntimeState(name=name, pid=_dead_pid(), netns=1)
    st.save()
    with Tun.create(name):
        lines = detach(name)
        assert link.link_exists(name)
    assert any("another network namespace" in line for line in lines)
    assert RuntimeState.load(name) is not None, "kept for a detach in the right namespace"


@pytest.mark.netns
def test_detach_with_unreadable_state_still_cleans_by_name(netns, dirs):
    run, _ = dirs
    name = _ifname()
    run.mkdir()
    (run / f"{name}.json").write_text("{garbage")
    with Tun.create(name):
        lines = detach(name)
        assert not link.link_exists(name)
    assert lines[0].startswith("FAILED reading state")
    assert (run / f"{name}.json").exists()


# --- detach: tc, XDP and nftables leftovers ----------------------------------------

@pytest.fixture
def veth(netns):
    name = _ifname()
    _sh(f"ip link add {name} type veth peer name {name}p; ip link set {name} up")
    with IPRoute() as ipr:
        yield name, ipr.link_lookup(ifname=name)[0]


def _add_tc_filter(ipr: IPRoute, index: int) -> int:
    fd, prog_id = _load_const_prog(BPF_PROG_TYPE_SCHED_CLS, 0)
    try:
        ipr.tc("add", "clsact", index)
        ipr.tc("add-filter", "bpf", index, ":1", fd=fd, name="wgebpf_test",
               parent="ffff:fff3", classid=1, direct_action=True)
    finally:
        os.close(fd)
    return prog_id


def _add_tc_filter_ipr(index: int) -> int:
    with IPRoute() as ipr:
        return _add_tc_filter(ipr, index)


def _detach_with(name: str, **records) -> list[str]:
    RuntimeState(name=name, pid=_dead_pid(), **records).save()
    return detach(name)


@pytest.mark.netns
@pytest.mark.parametrize("record, filter_left, clsact_left", [
    (dict(clsact=True), False, False),            # we made the clsact qdisc: remove it
    (dict(clsact=False), False, True),            # someone else's qdisc: only our filter
    (dict(clsact=False, prog_id=999999), True, True),   # the filter there is not ours
])
def test_detach_removes_recorded_tc(veth, dirs, record, filter_left, clsact_left):
    name, index = veth
    prog_id = _add_tc_filter_ipr(index)
    record = dict(record)
    record.setdefault("prog_id", prog_id)
    rec = tc.tc_record(index, name, "ffff:fff3", **record)
    lines = _detach_with(_ifname(), tc_filters=[rec])
    assert "FAILED" not in "\n".join(lines), lines
    assert ("bpf" in _sh(f"tc filter show dev {name} egress")) is filter_left
    assert ("clsact" in _sh(f"tc qdisc show dev {name}")) is clsact_left


@pytest.mark.netns
@pytest.mark.parametrize("recorded, removed", [(True, True), (False, False)])
def test_detach_removes_only_our_xdp_program(veth, dirs, recorded, removed):
    name, index = veth
    fd, prog_id = _load_const_prog(BPF_PROG_TYPE_XDP, 2)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd),
                                                        ("IFLA_XDP_FLAGS", 1 << 1)]})
    finally:
        os.close(fd)
    assert f"prog/xdp id {prog_id}" in _sh(f"ip link show {name}")
    rec = xdp_guard.xdp_record(index, name, prog_id if recorded else prog_id + 1000, "generic")
    lines = _detach_with(_ifname(), xdp=rec)
    assert "FAILED" not in "\n".join(lines), lines
    assert (f"prog/xdp id {prog_id}" not in _sh(f"ip link show {name}")) is removed


@pytest.mark.netns
def test_detach_removes_recorded_nft_tables(netns, dirs):
    ours = f"wgebpf_{secrets.token_hex(3)}"
    _sh(f"nft add table inet {ours}; nft add table ip keepme")
    lines = _detach_with(_ifname(), nft_tables=[f"inet {ours}", "ip gone_already"])
    text = "\n".join(lines)
    assert f"removed nftables table inet {ours}" in text and "already gone" in text
    tables = _sh("nft list tables")
    assert ours not in tables and "keepme" in tables


@pytest.mark.netns
def test_detach_records_on_a_vanished_device_are_done(netns, dirs):
    """tc and XDP records on a device that no longer exists (the TUN itself
    after a crash) count as removed."""
    gone = 999
    lines = _detach_with(_ifname(),
                         tc_filters=[tc.tc_record(gone, "wgtgone", "ffff:fff2", clsact=True)],
                         xdp=xdp_guard.xdp_record(gone, "wgtgone", 1, "generic"))
    text = "\n".join(lines)
    assert "FAILED" not in text and text.count("device gone") == 2, text
