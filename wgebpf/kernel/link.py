"""Link, address and route configuration of the wgebpf device (pyroute2 IPRoute).

This is what wg-quick does with `ip`, done over netlink, with every route and
rule it adds returned as a JSON-friendly record so a later `wgebpf detach`
can undo exactly that, even after the instance died by kill -9.

Table semantics follow wg-quick(8):
  off      no routes at all;
  NUMBER   every AllowedIPs network routed through the device in that table;
  auto     (the default) every network in the main table, unless a main-table
           route through the device already covers it (wg-quick's
           `ip route show dev NAME match NET`); a /0 instead gets the
           default-route recipe: the /0 in table T (T = the fwmark), the rule
           `not fwmark T lookup T`, and the rule `lookup main
           suppress_prefixlength 0`, so the tunnel's own marked UDP still
           leaves by the old default route while everything else is tunnelled
           and more specific main-table routes (the LAN) keep winning.

Not done here: wg-quick's nftables/iptables marks and src_valid_mark for the
/0 recipe (they belong with the firewall code, which records its nft tables).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RT_SCOPE_LINK = 253
RTPROT_BOOT = 3                # what `ip route add` uses, so our routes look like wg-quick's
IFA_F_NODAD = 0x02
FIB_RULE_INVERT = 0x02         # fib_rule_hdr.flags: the `not` in `not fwmark X`
DEFAULT_FWMARK_TABLE = 51820   # wg-quick's first choice when no FwMark is set

# Errors that mean "the thing we wanted to delete is already gone".
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)

Network = IPv4Network | IPv6Network


class LinkError(Exception):
    """A link, address or route operation failed."""


class HookError(Exception):
    """A PreUp/PostUp/PreDown/PostDown command exited non-zero."""

    def __init__(self, cmd: str, returncode: int, stderr: str):
        self.cmd, self.returncode, self.stderr = cmd, returncode, stderr
        tail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"hook `{cmd}` failed with exit status {returncode}{tail}")


@dataclass(frozen=True)
class RouteRecord:
    """One route or rule wgebpf added, enough to delete exactly it again."""

    kind: str                               # "route" or "rule"
    family: int                             # 4 or 6
    table: int
    dst: str | None = None                  # route: "198.51.100.0/24"
    ifname: str | None = None               # route: the device (for messages)
    ifindex: int | None = None              # route: oif
    priority: int | None = None             # rule
    fwmark: int | None = None               # rule: `not fwmark X`
    suppress_prefixlength: int | None = None  # rule

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "RouteRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        fam = "-6 " if self.family == 6 else ""
        if self.kind == "route":
            return f"route {fam}{self.dst} dev {self.ifname} table {_table_name(self.table)}"
        what = f"not fwmark {self.fwmark:#x} " if self.fwmark is not None else ""
        if self.suppress_prefixlength is not None:
            what += f"suppress_prefixlength {self.suppress_prefixlength} "
        return f"rule {fam}{self.priority}: {what}lookup {_table_name(self.table)}"


def _table_name(table: int) -> str:
    return "main" if table == RT_TABLE_MAIN else str(table)


def _af(family: int) -> int:
    return socket.AF_INET6 if family == 6 else socket.AF_INET


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkError(f"no interface named {name}")
    return found[0]


# --- the link ------------------------------------------------------------------

def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=name))


def link_kind(name: str) -> str | None:
    """IFLA_INFO_KIND of `name` ("tun", "veth", ...), None if absent or physical."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        link = ipr.get_links(found[0])[0]
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def remove_link(name: str) -> bool:
    """Delete link `name`; True if it existed."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code in _GONE:
                return False   # vanished under us, e.g. its TUN owner just exited
            raise LinkError(f"cannot delete {name}: {e}") from e
    return True


def configure(name: str, addresses: list[IPv4Interface | IPv6Interface], mtu: int) -> None:
    """Set the MTU, add the addresses and bring `name` up.

    IPv6 addresses get IFA_F_NODAD: duplicate address detection on a
    point-to-point tunnel only delays use of the address (it stays
    "tentative" and unbindable for a second or more) and can find nothing.
    An address that is already there is fine (re-running configure).
    """
    with IPRoute() as ipr:
        index = _index(ipr, name)
        try:
            ipr.link("set", index=index, mtu=mtu)
        except NetlinkError as e:
            raise LinkError(f"cannot set MTU {mtu} on {name}: {e}") from e
        for iface in addresses:
            iface = ipaddress.ip_interface(iface)
            flags = IFA_F_NODAD if iface.version == 6 else 0
            try:
                ipr.addr("add", index=index, address=str(iface.ip),
                         prefixlen=iface.network.prefixlen, flags=flags)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise LinkError(f"cannot add address {iface} to {name}: {e}") from e
        try:
            ipr.link("set", index=index, state="up")
        except NetlinkError as e:
            raise LinkError(f"cannot bring {name} up: {e}") from e
        v6 = [a for a in addresses if ipaddress.ip_interface(a).version == 6]
        _wait_ipv6_ready(ipr, index, v6)


def _wait_ipv6_ready(ipr: IPRoute, index: int, addresses: list, timeout: float = 1.0) -> None:
    """Wait until each IPv6 address has its local route.

    Even with NODAD the kernel finishes an address in a work item after the
    link comes up; until then packets to it are not delivered (seen here:
    about 1 in 20 times a packet written at once was lost). A link without
    carrier never finishes, so this gives up quietly after `timeout`.
    """
    want = {str(ipaddress.ip_interface(a).ip) for a in addresses}
    deadline = time.monotonic() + timeout
    while want and time.monotonic() < deadline:
        for route in ipr.get_routes(family=socket.AF_INET6, table=RT_TABLE_LOCAL):
            if route.get("RTA_OIF") == index:
                want.discard(route.get("RTA_DST"))
        if want:
            time.sleep(0.001)


def enable_forwarding(name: str) -> None:
    """Enable IPv4 and IPv6 forwarding on `name`.

    bpf_fib_lookup from the tc egress hook returns FWD_DISABLED unless the
    device forwards (docs/platform-notes.md, item 1). /proc/sys/net is resolved in the
    calling thread's network namespace.
    """
    paths = [f"/proc/sys/net/ipv4/conf/{name}/forwarding"]
    if os.path.isdir("/proc/sys/net/ipv6/conf"):   # absent when IPv6 is disabled
        paths.append(f"/proc/sys/net/ipv6/conf/{name}/forwarding")
    for path in paths:
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as e:
            raise LinkError(f"cannot enable forwarding ({path}): {e.strerror}") from e


# --- routes --------------------------------------------------------------------

def _parse_table(table: str | int | None) -> str | int:
    """'off', 'auto', or a table number (wg-quick also accepts 'main')."""
    if table is None or table == "" or table == "auto":
        return "auto"
    if table == "off":
        return "off"
    if table == "main":
        return RT_TABLE_MAIN
    try:
        number = int(table)
    except (TypeError, ValueError):
        raise ValueError(f"Table must be off, auto, main or a number, not {table!r}") from None
    if not 0 < number < 2**32:
        raise ValueError(f"table number {number} out of range")
    return number


def _covered_on_device(ipr: IPRoute, index: int, net: Network) -> bool:
    """wg-quick's `ip route show dev NAME match NET`: a main-table route via the
    device whose prefix contains NET (connected routes included)."""
    for route in ipr.get_routes(family=_af(net.version), table=RT_TABLE_MAIN):
        if route.get("RTA_OIF") != index:
            continue
        dst = route.get("RTA_DST") or ("::" if net.version == 6 else "0.0.0.0")
        prefix = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
        if net.subnet_of(prefix):
            return True
    return False


def _free_table(ipr: IPRoute, start: int = DEFAULT_FWMARK_TABLE) -> int:
    """First table number from `start` with no IPv4 or IPv6 routes (wg-quick's search)."""
    used = {r.get("RTA_TABLE") for fam in (socket.AF_INET, socket.AF_INET6)
            for r in ipr.get_routes(family=fam)}
    table = start
    while table in used:
        table += 1
    return table


def _default_rule_priority(ipr: IPRoute, family: int) -> int:
    """The priority the kernel gives a rule added without one: one below the
    second rule in the list (the first is `lookup local` at 0). Choosing it
    here, not leaving it to the kernel, tells us which rule to delete later."""
    prios = sorted(r.get("FRA_PRIORITY", 0) for r in ipr.get_rules(family=_af(family)))
    if len(prios) >= 2 and prios[1] > 0:
        return prios[1] - 1
    return 0


def _add_route(ipr: IPRoute, name: str, index: int, net: Network, table: int) -> RouteRecord:
    record = RouteRecord("route", net.version, table, dst=str(net), ifname=name, ifindex=index)
    try:
        ipr.route("add", **_route_args(record))
    except NetlinkError as e:
        raise LinkError(f"cannot add {record.describe()}: {e}") from e
    return record


def _route_args(record: RouteRecord) -> dict:
    # The same arguments add and delete: IPv4 deletion matches protocol and
    # scope too, so a mismatch would leave the route in place.
    net = ipaddress.ip_network(record.dst)
    kw = dict(family=_af(record.family), dst=str(net.network_address), dst_len=net.prefixlen,
              oif=record.ifindex, table=record.table, proto=RTPROT_BOOT)
    if record.family == 4:
        kw["scope"] = RT_SCOPE_LINK   # as `ip route add NET dev X` does for a route with no gateway
    return kw


def _add_rule(ipr: IPRoute, family: int, table: int, *, fwmark: int | None = None,
              suppress_prefixlength: int | None = None) -> RouteRecord:
    priority = _default_rule_priority(ipr, family)
    record = RouteRecord("rule", family, table, priority=priority, fwmark=fwmark,
                         suppress_prefixlength=suppress_prefixlength)
    try:
        ipr.rule("add", **_rule_args(record))
    except NetlinkError as e:
        raise LinkError(f"cannot add {record.describe()}: {e}") from e
    return record


def _rule_args(record: RouteRecord) -> dict:
    kw = dict(family=_af(record.family), table=record.table, priority=record.priority)
    if record.fwmark is not None:
        kw.update(fwmark=record.fwmark, flags=FIB_RULE_INVERT)
    if record.suppress_prefixlength is not None:
        # pyroute2 names it after FRA_SUPPRESS_PREFIXLEN and ignores unknown keys.
        kw["suppress_prefixlen"] = record.suppress_prefixlength
    return kw


def add_routes(name: str, networks: list, table: str | int | None = "auto",
               fwmark: int = 0) -> list[RouteRecord]:
    """Route `networks` (AllowedIPs) through `name` with wg-quick's Table semantics.

    `fwmark` is the device's FwMark; with `auto` and a /0 it is also the table
    number. If it is 0, the first free table from 51820 is chosen as wg-quick
    does, and the caller must set the device's fwmark to it (fwmark_of()).
    On failure everything added so far is removed again, then LinkError.
    """
    mode = _parse_table(table)
    if mode == "off":
        return []
    # wg-quick adds the most specific networks first (sort -nr on the length).
    nets = sorted({ipaddress.ip_network(n, strict=False) for n in networks},
                  key=lambda n: (-n.prefixlen, n.version, n.network_address.packed))
    records: list[RouteRecord] = []
    try:
        with IPRoute() as ipr:
            index = _index(ipr, name)
            for net in nets:
                if mode != "auto":
                    records.append(_add_route(ipr, name, index, net, mode))
                elif net.prefixlen == 0:
                    records += _add_default(ipr, name, index, net, fwmark or None, records)
                elif not _covered_on_device(ipr, index, net):
                    records.append(_add_route(ipr, name, index, net, RT_TABLE_MAIN))
    except BaseException:
        _undo(records)
        raise
    return records


def _undo(records: list[RouteRecord]) -> None:
    # Best effort while another error is on its way up: that one matters more.
    try:
        remove_routes(records)
    except Exception:
        pass


def _add_default(ipr: IPRoute, name: str, index: int, net: Network, fwmark: int | None,
                 so_far: list[RouteRecord]) -> list[RouteRecord]:
    # Both /0s (v4 and v6) share one table, as in wg-quick.
    table = fwmark or fwmark_of(so_far) or _free_table(ipr)
    added = [_add_route(ipr, name, index, net, table)]
    try:
        added.append(_add_rule(ipr, net.version, table, fwmark=table))
        added.append(_add_rule(ipr, net.version, RT_TABLE_MAIN, suppress_prefixlength=0))
    except BaseException:
        _undo(added)
        raise
    return added


def fwmark_of(records: list) -> int | None:
    """The fwmark the default-route recipe in `records` expects on the device."""
    for r in records:
        r = r if isinstance(r, RouteRecord) else RouteRecord.from_dict(r)
        if r.kind == "rule" and r.fwmark is not None:
            return r.fwmark
    return None


def remove_routes(records) -> list[str]:
    """Delete the routes and rules in `records` (RouteRecords or their dicts).

    Idempotent: ones already gone (a route dies with its link; rules do not)
    are skipped. Every record is tried; if any deletion really failed,
    LinkError lists them after the others were done. Returns what was done.
    """
    done: list[str] = []
    failed: list[str] = []
    recs = [r if isinstance(r, RouteRecord) else RouteRecord.from_dict(r) for r in records]
    with IPRoute() as ipr:
        for rec in reversed(recs):
            try:
                if rec.kind == "rule":
                    ipr.rule("del", **_rule_args(rec))
                else:
                    ipr.route("del", **_route_args(rec))
                done.append(f"removed {rec.describe()}")
            except NetlinkError as e:
                if e.code in _GONE:
                    done.append(f"{rec.describe()}: already gone")
                else:
                    failed.append(f"{rec.describe()}: {e}")
    if failed:
        raise LinkError("could not remove " + "; ".join(failed))
    return done


# --- hooks ---------------------------------------------------------------------

def run_hooks(commands: list[str], name: str, timeout: float | None = None) -> None:
    """Run PreUp/PostUp/PreDown/PostDown commands as wg-quick does.

    '%i' becomes the interface name; each runs with `bash -c`, in order; the
    first failure raises HookError with its stderr (also passed on to ours,
    as the user would see it under wg-quick).
    """
    for template in commands:
        cmd = template.replace("%i", name)
        print(f"[#] {cmd}", file=sys.stderr)
        try:
            proc = subprocess.run(["bash", "-c", cmd], stdin=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise HookError(cmd, -1, f"timed out after {timeout} s") from e
        if proc.stderr:
            sys.stderr.write(proc.stderr)
        if proc.returncode != 0:
            raise HookError(cmd, proc.returncode, proc.stderr)


def link_matches(ipr: IPRoute, ifindex: int, ifname: str | None) -> bool:
    """Is ifindex still the device we recorded (and not a reused index)?"""
    try:
        dev = ipr.get_links(ifindex)[0]
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise
    return ifname is None or dev.get("IFLA_IFNAME") == ifname


def remove_tun(name: str) -> list[str]:
    """Delete TUN device `name` that a dead instance left; never another
    kind of link that happens to share the name."""
    if not link_exists(name):
        return [f"no link {name}"]
    kind = link_kind(name)
    if kind != "tun":
        # Never delete someone's veth or bridge because it shares the name.
        raise RuntimeError(f"link {name} is a {kind or 'physical device'}, not a TUN: left alone")
    return [f"removed link {name}" if remove_link(name) else f"link {name} vanished by itself"]
