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

from .state import tc_record

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
