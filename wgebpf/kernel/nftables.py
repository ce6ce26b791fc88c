"""The nftables source policy's table: per-peer source sets the admin can read and edit.

With `SourcePolicy = nftables`, policy.c only marks each received packet with
its peer's slot (bits under PeerMark, default 0xffff0000); this table does
the filtering, where `nft list ruleset` shows it:

    table inet wgebpf_wg0 {
        set peer_marks { type mark; elements = { 0x00010000, 0x00020000 } }
        set peer2_v4 { type ipv4_addr; flags interval; elements = { 198.51.100.3, 203.0.113.0/24 } }
        set peer2_v6 { type ipv6_addr; flags interval; elements = { 2001:db8:100::3 } }
        chain prerouting {
            type filter hook prerouting priority mangle; policy accept;
            iifname "wg0" meta mark 0x00020000/16 ip saddr != @peer2_v4 counter drop comment "peer 2 xTIBA5rb: ..."
            iifname "wg0" meta mark 0x00020000/16 ip6 saddr != @peer2_v6 counter drop comment "peer 2 xTIBA5rb: ..."
            iifname "wg0" meta mark != 0x00000000/16 meta mark & 0xffff0000 != @peer_marks counter drop comment "..."
        }
    }

Why `inet wgebpf_<ifname>`: one table per interface, so two wgebpf devices
(or the admin's own tables) never share rules or sets, and removing one is
one `delete table`; `inet` holds the IPv4 and IPv6 rules together; the
`wgebpf_` prefix says who made it, and the name alone is what the
runtime-state file records (state.nft_tables), so `wgebpf detach` finds the
table even after the process died by kill -9. Interface names are at most
15 characters, well inside nftables' name limit.

Why prerouting at priority -150 (mangle): prerouting runs before the
routing decision, so a spoofed packet is gone before any route lookup,
rp_filter, forwarding or local delivery; -150 comes after defragmentation
(-400) and conntrack (-200), so the admin's own rules here may use ct state,
and before destination NAT (-100). A dropped packet's conntrack entry was
never confirmed, so spoofed sources leave nothing in the conntrack table.

The last rule fails closed: a packet carrying a peer mark for which this
table has no rules (a peer the runtime has not added here yet) is dropped.
Unmarked packets (peers with another policy, the control plane's own) pass.

Peer slots go up to 65535, which the default mask's 16 bits hold; a
narrower mask holds only the slots that fit its bits (8 bits: 1..255):
set_peer refuses the others, and
policy.c drops their packets (dropped_peer_mark) rather than let them by
unmarked, which this table would pass.

Elements: the admin may add elements to a peer's sets (`nft add element
inet wgebpf_wg0 peer2_v4 { 192.0.2.0/24 }`). wgebpf re-syncs only its own
prefixes: set_peer() adds the allowed-ips that are missing and removes the
ones it added earlier and no longer wants; it never deletes an element it did
not add (unless asked with exclusive=True). Interval sets refuse overlapping
elements, so where an admin element covers part of an allowed-ips prefix,
wgebpf adds only the rest of it, and where it covers all of it, nothing.
remove_peer() deletes the peer's sets whole, admin elements included: the
slot may go to another peer, who must not inherit them.

Uses the nftables JSON API (Debian's python3-nftables, libnftables). The
library opens its netlink socket when the object is made: an NftSourceFilter
works on the network namespace it was created in. Not thread-safe; the
control plane calls it.
"""

from __future__ import annotations

import subprocess

import ipaddress
import json
from typing import Iterable

import nftables as libnft

from ..wireguard.sourcepolicy import PEER_MARK_DEFAULT

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FAMILY = "inet"
CHAIN = "prerouting"
CHAIN_PRIORITY = -150           # NF_IP_PRI_MANGLE; see the module docstring
MARKS_SET = "peer_marks"
COMMENT_MAX = 100               # nftables takes comments up to 128 bytes


class NftError(RuntimeError):
    """nftables refused a command; the message is nft's."""


def set_name(slot: int, version: int) -> str:
    return f"peer{slot}_v{version}"


class NftSourceFilter:
    """The table of one wgebpf interface (see the module docstring)."""

    def __init__(self, ifname: str, mark_mask: int = PEER_MARK_DEFAULT):
        self.ifname = ifname
        self.mark_mask = mark_mask
        self.shift = (mark_mask & -mark_mask).bit_length() - 1
        self.max_slot = mark_mask >> self.shift     # the highest slot the mask holds
        self.table_name = f"wgebpf_{ifname}"
        self.installed = False
        self._nft = libnft.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._ours: dict[int, dict[int, set[Network]]] = {}   # slot -> version -> prefixes
        self._rules: dict[int, dict[int, int]] = {}           # slot -> version -> rule handle
        self._comments: dict[int, str] = {}

    @property
    def record(self) -> str:
        """The runtime-state entry (state.nft_tables): "inet wgebpf_<ifname>"."""
        return f"{FAMILY} {self.table_name}"

    # -- table -----------------------------------------------------------------

    def install(self) -> None:
        """Create the table, its chain, the marks set and the fail-closed rule.

        A table of the same name left by an earlier run (kill -9) is replaced.
        """
        if self.installed:
            return
        table = {"family": FAMILY, "name": self.table_name}
        self._run([
            {"add": {"table": table}},           # add + delete: gone whether it existed or not
            {"delete": {"table": table}},
            {"add": {"table": table}},
            {"add": {"chain": {**self._t(), "name": CHAIN, "type": "filter",
                               "hook": "prerouting", "prio": CHAIN_PRIORITY,
                               "policy": "accept"}}},
            {"add": {"set": {**self._t(), "name": MARKS_SET, "type": "mark"}}},
            {"add": {"rule": {**self._t(), "chain": CHAIN, "expr": [
                self._on_device(),
                _match("!=", self._mark_expr(), 0),
                _match("!=", self._mark_expr(), f"@{MARKS_SET}"),
                {"counter": None}, {"drop": None}],
                "comment": "a peer mark with no peer sets here: fail closed"}}},
        ])
        self.installed = True
        self._ours.clear()
        self._rules.clear()
        self._comments.clear()

    def uninstall(self) -> None:
        """Delete the table (rules, sets, admin additions); fine if it is gone."""
        table = {"family": FAMILY, "name": self.table_name}
        self._run([{"add": {"table": table}}, {"delete": {"table": table}}])
        self.installed = False
        self._ours.clear()
        self._rules.clear()
        self._comments.clear()

    def close(self) -> None:
        self.uninstall()

    def __enter__(self) -> "NftSourceFilter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- peers -----------------------------------------------------------------

    def set_peer(self, slot: int, networks: Iterable[str | Network], comment: str = "", *,
                 exclusive: bool = False) -> None:
        """Peer `slot` may send from `networks` (its allowed-ips).

        The first call creates the peer's sets and rules; later calls re-sync
        wgebpf's own elements (module docstring). `comment` names the peer in
        the rules (e.g. its public key's first characters). exclusive=True
        also removes elements wgebpf did not add.
        """
        if not self.installed:
            raise NftError(f"table {self.record} is not installed")
        self._check_slot(slot)
        wanted = {4: [], 6: []}
        for n in networks:
            net = ipaddress.ip_network(n, strict=False)
            wanted[net.version].append(net)
        comment = _clean(comment)
        cmds: list[dict] = []
        new = slot not in self._rules
        if new:
            cmds += self._create_peer(slot)
        for version in (4, 6):
            cmds += self._sync(slot, version, wanted[version], exclusive, present=not new)
        if not new and comment != self._comments.get(slot):
            cmds += [{"replace": {"rule": {**self._rule(slot, v, comment),
                                           "handle": self._rules[slot][v]}}} for v in (4, 6)]
        if new:
            cmds += [{"add": {"rule": self._rule(slot, v, comment)}} for v in (4, 6)]
            cmds.append({"add": {"element": {**self._t(), "name": MARKS_SET,
                                             "elem": [self._mark(slot)]}}})
        out = self._run(cmds, echo=True)
        handles = [c["add"]["rule"]["handle"] for c in out
                   if "add" in c and "rule" in c["add"]]
        if new:
            self._rules[slot] = {4: handles[0], 6: handles[1]}
        self._comments[slot] = comment

    def remove_peer(self, slot: int) -> None:
        """Delete peer `slot`'s rules, sets (admin elements too) and mark."""
        rules = self._rules.pop(slot, None)
        self._ours.pop(slot, None)
        self._comments.pop(slot, None)
        if rules is None:
            return
        cmds = [{"delete": {"element": {**self._t(), "name": MARKS_SET,
                                        "elem": [self._mark(slot)]}}}]
        # Every rule naming the sets must go before the sets can (the admin's too).
        for rule in self._list_rules():
            if rule["handle"] in rules.values() or any(
                    f'"@{set_name(slot, v)}"' in _json_text(rule["expr"]) for v in (4, 6)):
                cmds.append({"delete": {"rule": {**self._t(), "chain": rule["chain"],
                                                 "handle": rule["handle"]}}})
        cmds += [{"delete": {"set": {**self._t(), "name": set_name(slot, v)}}} for v in (4, 6)]
        self._run(cmds)

    def peers(self) -> dict[int, set[Network]]:
        """slot -> the prefixes wgebpf put in its sets (admin elements not included)."""
        return {slot: ours[4] | ours[6] for slot, ours in self._ours.items()}

    def elements(self, slot: int, version: int) -> list[Network]:
        """Every element of a peer's set now (wgebpf's and the admin's), as networks."""
        return [net for _, nets in self._present(slot, version) for net in nets]

    def drops(self) -> dict[int, int]:
        """Packets each peer's rules dropped: {slot: packets}; slot 0 counts the
        fail-closed rule (a mark with no peer sets)."""
        by_handle = {h: slot for slot, hs in self._rules.items() for h in hs.values()}
        out: dict[int, int] = {}
        for rule in self._list_rules():
            counter = next((e["counter"] for e in rule["expr"] if "counter" in e), None)
            if counter is None:
                continue
            if rule["handle"] in by_handle:
                slot = by_handle[rule["handle"]]
            elif rule.get("comment", "").startswith("a peer mark with no peer"):
                slot = 0
            else:
                continue        # the admin's rule
            out[slot] = out.get(slot, 0) + counter["packets"]
        return out

    # -- pieces ----------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        """Refuse a slot the mark mask cannot hold: its mark would be cut to
        other bits (another peer's, or none), so no rule could judge it.
        policy.c drops such a peer's packets (dropped_peer_mark)."""
        if not 1 <= slot <= self.max_slot:
            raise ValueError(f"peer slot {slot} does not fit PeerMark {self.mark_mask:#x}, "
                             f"which holds slots 1..{self.max_slot} (a 16-bit mask such as "
                             f"0xffff0000 holds every peer slot, 1..65535)")

    def _t(self) -> dict:
        return {"family": FAMILY, "table": self.table_name}

    def _mark(self, slot: int) -> int:
        return (slot << self.shift) & self.mark_mask

    def _mark_expr(self) -> dict:
        return {"&": [{"meta": {"key": "mark"}}, self.mark_mask]}

    def _on_device(self) -> dict:
        return _match("==", {"meta": {"key": "iifname"}}, self.ifname)

    def _create_peer(self, slot: int) -> list[dict]:
        return [{"add": {"set": {**self._t(), "name": set_name(slot, v),
                                 "type": f"ipv{v}_addr", "flags": ["interval"]}}}
                for v in (4, 6)]

    def _rule(self, slot: int, version: int, comment: str) -> dict:
        who = f"peer {slot} {comment}".rstrip()
        return {**self._t(), "chain": CHAIN, "expr": [
            self._on_device(),
            _match("==", self._mark_expr(), self._mark(slot)),
            _match("!=", {"payload": {"protocol": "ip" if version == 4 else "ip6",
                                      "field": "saddr"}}, f"@{set_name(slot, version)}"),
            {"counter": None}, {"drop": None}],
            "comment": f"{who}: drop IPv{version} sources not in @{set_name(slot, version)}"}

    def _sync(self, slot: int, version: int, wanted: list[Network], exclusive: bool,
              present: bool) -> list[dict]:
        """Commands that bring wgebpf's elements of one set to `wanted`."""
        current = self._present(slot, version) if present else []
        exact = {nets[0]: raw for raw, nets in current if len(nets) == 1}
        ours_before = {n for n in self._ours.get(slot, {}).get(version, set()) if n in exact}
        if exclusive:
            target = set(ipaddress.collapse_addresses(wanted))
            remove = [raw for raw, nets in current if len(nets) != 1 or nets[0] not in target]
        else:
            admin = [net for raw, nets in current for net in nets
                     if not (len(nets) == 1 and nets[0] in ours_before)]
            target = set(uncovered(wanted, admin))
            remove = [exact[n] for n in ours_before - target]
        add = [_elem(n) for n in sorted(target - set(exact))]
        self._ours.setdefault(slot, {4: set(), 6: set()})[version] = target
        cmds = []
        name = set_name(slot, version)
        if remove:      # before the adds: a prefix may be replaced by its pieces
            cmds.append({"delete": {"element": {**self._t(), "name": name, "elem": remove}}})
        if add:
            cmds.append({"add": {"element": {**self._t(), "name": name, "elem": add}}})
        return cmds

    def _present(self, slot: int, version: int) -> list[tuple[object, list[Network]]]:
        """The set's elements: (element as nft gives it, the networks it covers)."""
        out = self._run([{"list": {"set": {**self._t(), "name": set_name(slot, version)}}}])
        for item in out:
            if "set" in item:
                return [(raw, _networks(raw)) for raw in item["set"].get("elem", [])]
        return []

    def _list_rules(self) -> list[dict]:
        out = self._run([{"list": {"table": {"family": FAMILY, "name": self.table_name}}}])
        return [item["rule"] for item in out if "rule" in item]

    def _run(self, cmds: list[dict], echo: bool = False) -> list[dict]:
        self._nft.set_echo_output(echo)
        rc, out, err = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftError(f"nftables ({self.record}): {err.strip() or 'error ' + str(rc)}")
        if not out:
            return []
        return out.get("nftables", []) if isinstance(out, dict) else []


def uncovered(wanted: Iterable[Network], others: Iterable[Network]) -> list[Network]:
    """The prefixes of `wanted` (collapsed) minus every address in `others`.

    What wgebpf adds to an interval set that already holds `others` (the
    admin's elements): the union becomes wanted | others with no overlap.
    """
    others = list(others)
    out: list[Network] = []
    for net in ipaddress.collapse_addresses(wanted):
        pieces = [net]
        for other in others:
            if other.version != net.version:
                continue
            next_pieces = []
            for piece in pieces:
                if piece.subnet_of(other):
                    continue                                # covered whole
                if other.subnet_of(piece):
                    next_pieces.extend(piece.address_exclude(other))
                else:
                    next_pieces.append(piece)               # disjoint
            pieces = next_pieces
        out.extend(pieces)
    return sorted(ipaddress.collapse_addresses(out)) if out else []


def _match(op: str, left: object, right: object) -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _elem(net: Network) -> object:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _networks(raw: object) -> list[Network]:
    """The networks one set element (nft JSON) covers."""
    if isinstance(raw, dict) and "elem" in raw:         # element with comment/timeout
        raw = raw["elem"]["val"]
    if isinstance(raw, str):
        return [ipaddress.ip_network(raw)]
    if "prefix" in raw:
        p = raw["prefix"]
        return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
    if "range" in raw:
        first, last = (ipaddress.ip_address(a) for a in raw["range"])
        return list(ipaddress.summarize_address_range(first, last))
    raise NftError(f"unexpected set element {raw!r}")


def _clean(comment: str) -> str:
    """Comments end up in `nft list` output inside double quotes."""
    return "".join(c for c in comment if c.isprintable() and c != '"')[:COMMENT_MAX // 2]


def _json_text(value: object) -> str:
    return json.dumps(value)


def remove_table(table: str) -> list[str]:
    """Delete the table `wgebpf detach` found recorded ("inet NAME")."""
    parts = table.split()
    family, tname = (parts[0], parts[1]) if len(parts) == 2 else ("inet", parts[0])
    proc = subprocess.run(["nft", "delete", "table", family, tname],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return [f"removed nftables table {family} {tname}"]
    if "No such file or directory" in proc.stderr:
        return [f"nftables table {family} {tname}: already gone"]
    raise RuntimeError(f"nft delete table {family} {tname}: {proc.stderr.strip()}")
