"""Direct-action bpf filters on a device's clsact hooks (pyroute2), for the
classifier (egress) and the source policy (ingress).

Each loader owns one filter, named exactly by parent, prio and handle, so
removing it never touches anyone else's; the clsact qdisc goes only if we
added it and no filter is left on it.
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .link import link_matches

TC_PARENT_INGRESS = "ffff:fff2"
TC_PARENT_EGRESS = "ffff:fff3"


def attach_filter(ifindex: int, ifname: str, prog_fd: int, prog_id: int, name: str,
                  parent: str, prio: int, handle: int) -> dict:
    """Add clsact (if missing) and the filter; the tc_record for the state file."""
    with IPRoute() as ipr:
        created = _add_clsact(ipr, ifindex)
        try:
            ipr.tc("add-filter", "bpf", ifindex, handle, fd=prog_fd, name=name, parent=parent,
                   prio=prio, classid=1, direct_action=True)
        except BaseException:
            if created:
                _ignore_gone(ipr.tc, "del", "clsact", ifindex)
            raise
    return tc_record(ifindex, ifname, parent, prio=prio, handle=handle, prog_id=prog_id,
                     clsact=created)


def detach_filter(record: dict) -> None:
    """Remove what attach_filter added; a device already gone is fine."""
    ifindex = record["ifindex"]
    with IPRoute() as ipr:
        _ignore_gone(ipr.tc, "del-filter", "bpf", ifindex, record["handle"],
                     parent=record["parent"], prio=record["prio"])
        if record["clsact"] and not _filters_left(ipr, ifindex):
            _ignore_gone(ipr.tc, "del", "clsact", ifindex)


class FilterOwner:
    """attach()/detach() of a loader's one bpf filter. The loader sets
    ifindex, ifname, prog_fd, prog_id and record (None until attached),
    and names its filter with the class attributes below."""

    FILTER_NAME: str
    FILTER_PARENT: str
    FILTER_PRIO: int
    FILTER_HANDLE: int
    record: dict | None

    def attach(self) -> dict:
        """Our filter (and clsact if missing); returns the tc_record for the
        runtime-state file (also in .record)."""
        if self.record is None:
            self.record = attach_filter(self.ifindex, self.ifname, self.prog_fd, self.prog_id,
                                        self.FILTER_NAME, self.FILTER_PARENT, self.FILTER_PRIO,
                                        self.FILTER_HANDLE)
        return self.record

    def detach(self) -> None:
        """Remove what attach() added (clsact too if we added it and it is
        empty now); a device already gone is fine."""
        rec, self.record = self.record, None
        if rec is not None:
            detach_filter(rec)


def _add_clsact(ipr: IPRoute, ifindex: int) -> bool:
    """Add clsact; False if the device already had one (then it is not ours)."""
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
        return False
    return True


def _ignore_gone(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except NetlinkError as e:
        # ENODEV: device gone (and its qdiscs with it); ENOENT/EINVAL: the
        # qdisc or filter is gone already.
        if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            raise


def _filters_left(ipr: IPRoute, ifindex: int) -> bool:
    """Does clsact still hold any filter, on either hook?"""
    for parent in (TC_PARENT_INGRESS, TC_PARENT_EGRESS):
        try:
            # Dumps list a header entry per chain too; real filters have options.
            if any(f.get_attr("TCA_OPTIONS") for f in ipr.get_filters(index=ifindex,
                                                                       parent=parent)):
                return True
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                raise
    return False


def tc_record(ifindex: int, ifname: str, parent: str, *, prio: int | None = None,
              handle: int | None = None, prog_id: int | None = None,
              kind: str = "bpf", clsact: bool = False) -> dict:
    """A tc_filters entry: a filter wgebpf added (and whether it added the clsact qdisc)."""
    rec = {"ifindex": ifindex, "ifname": ifname, "parent": parent, "kind": kind, "clsact": clsact}
    rec.update({k: v for k, v in (("prio", prio), ("handle", handle), ("prog_id", prog_id))
                if v is not None})
    return rec


def remove_filter(rec: dict) -> list[str]:
    """Remove the filter `rec` (tc_record) names, if it is still ours; the
    step `wgebpf detach` runs after a crash, and detach() below."""
    where = f"{rec.get('ifname') or rec['ifindex']} parent {rec.get('parent')}"
    with IPRoute() as ipr:
        if not link_matches(ipr, rec["ifindex"], rec.get("ifname")):
            return [f"tc on {where}: device gone"]
        if rec.get("clsact"):
            if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(rec["ifindex"])):
                return [f"clsact on {rec.get('ifname')}: already gone"]
            ipr.tc("del", "clsact", rec["ifindex"])
            return [f"removed clsact qdisc (and its filters) on {rec.get('ifname')}"]
        parent = rec["parent"]
        matches = [f for f in ipr.get_filters(index=rec["ifindex"], parent=parent)
                   if _filter_is(f, rec)]
        if not matches:
            return [f"tc filter on {where}: none of ours there (already gone)"]
        prio = rec.get("prio") or (matches[0]["info"] >> 16)
        kw = {"parent": parent, "prio": prio}
        if rec.get("handle") is not None:
            kw["handle"] = rec["handle"]
        ipr.tc("del-filter", rec.get("kind", "bpf"), rec["ifindex"], **kw)
        return [f"removed tc filter on {where} prio {prio}"]


def _filter_is(f, rec: dict) -> bool:
    # A filter dump lists one entry per filter chain header plus one per
    # filter; only entries with options are real filters.
    if not f.get_attr("TCA_OPTIONS"):
        return False
    if rec.get("prio") is not None and (f["info"] >> 16) != rec["prio"]:
        return False
    if rec.get("handle") is not None and f["handle"] != rec["handle"]:
        return False
    if rec.get("prog_id") is not None and _bpf_filter_prog_id(f) != rec["prog_id"]:
        return False
    return True


_TCA_BPF_ID = 11


def _bpf_filter_prog_id(f) -> int | None:
    """TCA_BPF_ID of a bpf filter. pyroute2 0.9 does not decode it (it shows
    up as UNKNOWN type 11), so read its 4 raw bytes from the message."""
    opts = f.get_attr("TCA_OPTIONS")
    if opts.get_attr("TCA_BPF_ID") is not None:
        return opts.get_attr("TCA_BPF_ID")
    for key, nla in opts["attrs"]:
        if key == "UNKNOWN" and nla["header"]["type"] == _TCA_BPF_ID:
            return int.from_bytes(nla.data[nla.offset + 4:nla.offset + 8], "little")
    return None
