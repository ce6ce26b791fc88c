"""The nftables source policy's table (wgebpf/kernel/nftables.py), with policy.c marking.

Unit cases first (which prefixes wgebpf adds next to the admin's elements),
then the real thing in a namespace (nft only ever runs inside it): the
Ingress topology of test_bpf_policy.py with every peer on the nftables
policy, and the table installed for its TUN:

    frame from tag s --> tc ingress: wg_policy puts s in the mark (PeerMark 0xffff0000)
        --> nftables prerouting: table inet wgebpf_<tun> drops a peer mark s
            whose source is not in @peer<s>_v4 / @peer<s>_v6 --> UDP socket
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys

import pytest

from nsutil import fresh_netns  # noqa: F401 (the netns fixture)
from test_bpf_policy import PEER_ADDRS, Ingress
from wgebpf.kernel import nftables
from wgebpf.kernel.nftables import NftSourceFilter, uncovered

N = ipaddress.ip_network
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- which prefixes wgebpf adds ----------------------------------------------------

UNCOVERED = [
    # wanted, the admin's elements, what wgebpf adds
    (["203.0.113.0/24"], [], ["203.0.113.0/24"]),
    (["203.0.113.0/25", "203.0.113.128/25"], [], ["203.0.113.0/24"]),       # collapsed
    (["203.0.113.0/24", "203.0.113.7/32"], [], ["203.0.113.0/24"]),         # nested
    (["203.0.113.0/24"], ["203.0.113.0/24"], []),                           # the admin's already
    (["203.0.113.7/32"], ["203.0.113.0/24"], []),                           # covered
    (["203.0.113.0/24"], ["203.0.113.128/25"], ["203.0.113.0/25"]),         # the rest only
    (["203.0.113.0/24"], ["203.0.113.0/26", "203.0.113.192/26"],
     ["203.0.113.64/26", "203.0.113.128/26"]),
    (["203.0.113.0/24"], ["198.51.100.0/24", "2001:db8::/32"], ["203.0.113.0/24"]),
    (["2001:db8:100::/48"], ["2001:db8:100::/49"], ["2001:db8:100:8000::/49"]),
]


@pytest.mark.parametrize("wanted, admin, added", UNCOVERED)
def test_uncovered(wanted, admin, added):
    assert uncovered([N(n) for n in wanted], [N(n) for n in admin]) == [N(n) for n in added]


# -- in a namespace -----------------------------------------------------------------

SLOT = 2
OWN4, OWN6 = PEER_ADDRS[SLOT]


@pytest.fixture
def nft(netns):
    """Function scope; needs `netns`. Ingress on the nftables policy and its
    table, with peer 2 allowed 198.51.100.3, 203.0.113.0/25, 2001:db8:100::3."""
    ing = Ingress("nftables")
    f = None
    try:
        f = NftSourceFilter(ing.name)
        f.install()
        f.set_peer(SLOT, [f"{OWN4}/32", "203.0.113.0/25", f"{OWN6}/128"], "xTIBA5rb")
        yield ing, f
    finally:
        if f is not None:
            f.uninstall()
        ing.close()


def ruleset(ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"], check=True,
                          capture_output=True, text=True).stdout


def set_elements(ns: str, table: str, name: str) -> list[str]:
    out = json.loads(subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "set", "inet", table, name],
        check=True, capture_output=True, text=True).stdout)["nftables"]
    elems = next(item["set"] for item in out if "set" in item).get("elem", [])
    return sorted(e if isinstance(e, str) else f"{e['prefix']['addr']}/{e['prefix']['len']}"
                  for e in elems)


def admin(ns: str, command: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", command], check=True)


def test_a_slot_beyond_the_mask_is_refused(netns):
    """Slots run to 65535; a narrower PeerMark holds fewer, and set_peer
    says so rather than cut the slot to another peer's mark."""
    f = NftSourceFilter("wgx0", mark_mask=0xFF000000)
    try:
        f.install()
        f.set_peer(255, ["203.0.113.0/24"])
        with pytest.raises(ValueError, match="holds slots 1..255"):
            f.set_peer(256, ["198.51.100.0/24"])
        assert set(f.peers()) == {255}
        wide = NftSourceFilter("wgx1")          # the default mask: 16 bits
        assert wide.max_slot == 65535 and wide._mark(65535) == 0xFFFF0000
    finally:
        f.uninstall()


@pytest.mark.netns
def test_install_shows_in_the_ruleset(netns, nft):
    ing, f = nft
    text = ruleset(netns)
    assert f"table inet wgebpf_{ing.name} {{" in text and f.table_name == f"wgebpf_{ing.name}"
    assert "type filter hook prerouting priority mangle; policy accept;" in text
    assert f'iifname "{ing.name}" meta mark 0x00020000/16 ip saddr != @peer2_v4' in text
    assert f'iifname "{ing.name}" meta mark 0x00020000/16 ip6 saddr != @peer2_v6' in text
    assert 'comment "peer 2 xTIBA5rb: drop IPv4 sources not in @peer2_v4"' in text
    assert "fail closed" in text
    assert set_elements(netns, f.table_name, "peer2_v4") == ["198.51.100.3", "203.0.113.0/25"]
    assert set_elements(netns, f.table_name, "peer2_v6") == ["2001:db8:100::3"]
    assert f.record == f"inet wgebpf_{ing.name}"


@pytest.mark.netns
def test_sources_outside_the_peer_set_are_dropped(nft):
    ing, f = nft
    for source, delivered in [(OWN4, True), ("203.0.113.5", True), ("203.0.113.200", False),
                              (PEER_ADDRS[1][0], False), (OWN6, True),
                              ("2001:db8:300::7", False), (PEER_ADDRS[1][1], False)]:
        assert ing.verdict(SLOT, source) == (delivered, "marked"), source
    assert f.drops() == {0: 0, SLOT: 4}


@pytest.mark.netns
def test_a_peer_without_sets_fails_closed(nft):
    ing, f = nft
    assert ing.verdict(3, PEER_ADDRS[3][0]) == (False, "marked")
    assert f.drops()[0] == 1
    f.set_peer(3, [f"{PEER_ADDRS[3][0]}/32"], "peer3key")
    assert ing.verdict(3, PEER_ADDRS[3][0]) == (True, "marked")
    f.remove_peer(3)
    assert ing.verdict(3, PEER_ADDRS[3][0]) == (False, "marked")


@pytest.mark.netns
def test_peers_on_another_policy_are_not_marked_and_pass(nft):
    ing, _ = nft
    ing.policy.set_peer(1, "off")
    assert ing.verdict(1, "203.0.113.200") == (True, "accepted")


@pytest.mark.netns
def test_admin_element_lets_a_source_through_and_set_peer_keeps_it(netns, nft):
    ing, f = nft
    assert not ing.delivered(SLOT, "192.0.2.7")
    admin(netns, f"nft add element inet {f.table_name} peer2_v4 '{{ 192.0.2.0/24 }}'")
    assert ing.delivered(SLOT, "192.0.2.7")
    # wgebpf re-syncs its own prefixes: drops 203.0.113.0/25, adds 203.0.113.128/25
    f.set_peer(SLOT, [f"{OWN4}/32", "203.0.113.128/25", f"{OWN6}/128"], "xTIBA5rb")
    assert set_elements(netns, f.table_name, "peer2_v4") == [
        "192.0.2.0/24", "198.51.100.3", "203.0.113.128/25"]
    assert ing.delivered(SLOT, "192.0.2.7")
    assert not ing.delivered(SLOT, "203.0.113.5")
    assert ing.delivered(SLOT, "203.0.113.200")
    # unless asked
    f.set_peer(SLOT, [f"{OWN4}/32", f"{OWN6}/128"], "xTIBA5rb", exclusive=True)
    assert set_elements(netns, f.table_name, "peer2_v4") == ["198.51.100.3"]
    assert not ing.delivered(SLOT, "192.0.2.7")


@pytest.mark.netns
def test_admin_element_overlapping_an_allowed_ip(netns, nft):
    """Interval sets refuse overlaps: wgebpf adds the part the admin's element
    does not cover, and gives it back when the allowed-ip goes."""
    ing, f = nft
    admin(netns, f"nft add element inet {f.table_name} peer2_v4 '{{ 203.0.113.128/26 }}'")
    f.set_peer(SLOT, [f"{OWN4}/32", "203.0.113.0/24"], "xTIBA5rb")
    assert set_elements(netns, f.table_name, "peer2_v4") == [
        "198.51.100.3", "203.0.113.0/25", "203.0.113.128/26", "203.0.113.192/26"]
    assert ing.delivered(SLOT, "203.0.113.130") and ing.delivered(SLOT, "203.0.113.200")
    f.set_peer(SLOT, [f"{OWN4}/32"], "xTIBA5rb")
    assert set_elements(netns, f.table_name, "peer2_v4") == ["198.51.100.3", "203.0.113.128/26"]
    assert f.peers()[SLOT] == {N(f"{OWN4}/32")}


@pytest.mark.netns
def test_comment_change_and_remove_peer(netns, nft):
    ing, f = nft
    admin(netns, f"nft add rule inet {f.table_name} prerouting ip saddr @peer2_v4 counter"
                 f" comment '\"the admin counts peer 2\"'")
    f.set_peer(SLOT, [f"{OWN4}/32"], 'new"key')
    text = ruleset(netns)
    assert 'comment "peer 2 newkey: drop IPv4' in text and "xTIBA5rb" not in text
    f.remove_peer(SLOT)
    text = ruleset(netns)
    assert "peer2_v4" not in text and "0x00020000" not in text
    assert "the admin counts peer 2" not in text      # it named the set: gone with it
    assert "fail closed" in text
    assert not ing.delivered(SLOT, OWN4)              # no sets: fail closed


@pytest.mark.netns
def test_uninstall_removes_the_table_and_install_replaces_a_stale_one(netns, nft):
    ing, f = nft
    f.uninstall()
    assert f.table_name not in ruleset(netns)
    f.uninstall()                                      # idempotent
    assert ing.delivered(SLOT, "203.0.113.200")        # nothing filters now
    admin(netns, f"nft add table inet {f.table_name} && nft add set inet {f.table_name}"
                 " leftover '{ type ipv4_addr; }'")
    f.install()
    text = ruleset(netns)
    assert "leftover" not in text and "fail closed" in text


@pytest.mark.netns
def test_runtime_state_removes_the_table_after_kill_9(netns):
    """A process that dies by SIGKILL leaves its table; the state file's
    record ("inet wgebpf_<ifname>") is all `wgebpf detach` needs."""
    code = ("import sys; from wgebpf.kernel.nftables import NftSourceFilter;"
            "f = NftSourceFilter('wgk0'); f.install(); f.set_peer(1, ['192.0.2.0/24'], 'k');"
            "print(f.record, flush=True); sys.stdin.read()")
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        record = proc.stdout.readline().strip()
        assert record == "inet wgebpf_wgk0"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert "table inet wgebpf_wgk0" in ruleset(netns)
        assert nftables.remove_table(record) == ["removed nftables table inet wgebpf_wgk0"]
        assert "wgebpf_wgk0" not in ruleset(netns)
        assert nftables.remove_table(record) == ["nftables table inet wgebpf_wgk0: already gone"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.netns
def test_set_peer_before_install_is_an_error(netns):
    f = NftSourceFilter("wgnone0")
    with pytest.raises(RuntimeError, match="not installed"):
        f.set_peer(1, ["192.0.2.0/24"])
    f.uninstall()                                      # nothing there: fine
