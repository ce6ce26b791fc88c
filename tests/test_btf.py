"""wgebpf.kernel.btf: struct member offsets from BTF.

Against the running kernel's /sys/kernel/btf/vmlinux (cross-checked with
bpftool's own reading of it), and against small BTF blobs built here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

from wgebpf.kernel import btf

HAVE_VMLINUX = os.path.exists(btf.VMLINUX)


# -- the running kernel ------------------------------------------------------------


@pytest.mark.skipif(not HAVE_VMLINUX, reason="no /sys/kernel/btf/vmlinux")
def test_route_offsets_of_the_running_kernel():
    offsets = btf.route_offsets(btf.load())
    assert set(offsets) == {m[0] for m in btf.ROUTE_MEMBERS} - {"WG_OFF_RT_DST", "WG_OFF_RT6_DST"}
    # rt_gw4 and rt_gw6 share a union; the gateway family precedes it.
    assert offsets["WG_OFF_RT_GW4"] == offsets["WG_OFF_RT_GW6"]
    assert offsets["WG_OFF_RT_GW_FAMILY"] < offsets["WG_OFF_RT_GW4"]
    cflags = btf.route_cflags()
    assert cflags[0] == "-DWG_ROUTE_DST=1"
    assert f"-DWG_OFF_SKB_REFDST={offsets['WG_OFF_SKB_REFDST']}" in cflags


@pytest.mark.skipif(not HAVE_VMLINUX or not shutil.which("bpftool"),
                    reason="needs vmlinux BTF and bpftool")
def test_offsets_agree_with_bpftool():
    """bpftool's JSON dump, walked independently, gives the same offsets."""
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", btf.VMLINUX],
                         check=True, capture_output=True).stdout
    types = {t["id"]: t for t in json.loads(out)["types"]}
    structs = {}
    for t in types.values():
        if t["kind"] == "STRUCT" and t["name"] != "(anon)":
            structs.setdefault(t["name"], t)

    def find(t, name, base=0):
        for m in t.get("members", ()):
            if m["name"] == name:
                return base + m["bits_offset"]
            if m["name"] == "(anon)":
                inner = types[m["type_id"]]
                if inner["kind"] in ("STRUCT", "UNION"):
                    hit = find(inner, name, base + m["bits_offset"])
                    if hit is not None:
                        return hit
        return None

    parsed = btf.load()
    for _macro, struct_name, member, _sizes in btf.ROUTE_MEMBERS:
        assert parsed.member(struct_name, member).offset * 8 == \
            find(structs[struct_name], member), (struct_name, member)


@pytest.mark.skipif(not HAVE_VMLINUX, reason="no /sys/kernel/btf/vmlinux")
def test_load_is_cached_per_process():
    assert btf.load() is btf.load()


# -- synthetic BTF -------------------------------------------------------------------


class Builder:
    """A little-endian BTF blob: types in order (ids from 1), a string table."""

    def __init__(self):
        self.strings = b"\0"
        self.types = b""
        self.next_id = 1

    def _name(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def _add(self, record: bytes) -> int:
        self.types += record
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int) -> int:
        return self._add(struct.pack("<III", self._name(name), 1 << 24, size)
                         + struct.pack("<I", size * 8))

    def ptr(self, target: int) -> int:
        return self._add(struct.pack("<III", 0, 2 << 24, target))

    def typedef(self, name: str, target: int) -> int:
        return self._add(struct.pack("<III", self._name(name), 8 << 24, target))

    def array(self, elem: int, index: int, n: int) -> int:
        return self._add(struct.pack("<III", 0, 3 << 24, 0) + struct.pack("<III", elem, index, n))

    def struct(self, name: str, size: int, members, union: bool = False) -> int:
        kind = 5 if union else 4
        head = struct.pack("<III", self._name(name), (kind << 24) | len(members), size)
        body = b"".join(struct.pack("<III", self._name(n), t, bits) for n, t, bits in members)
        return self._add(head + body)

    def blob(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", btf.BTF_MAGIC, 1, 0, 24, 0, len(self.types),
                          len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def route_structs(b: Builder, *, skip: tuple[str, str] | None = None) -> None:
    """The members ROUTE_MEMBERS names, laid out as on some kernel."""
    u8, u16, u32, u64 = (b.int_(n, s) for n, s in
                         (("u8", 1), ("u16", 2), ("unsigned int", 4), ("long unsigned int", 8)))
    in6 = b.array(u8, u32, 16)
    void_ptr = b.ptr(0)
    layout = {
        "sk_buff": [("len", u32, 0), ("_skb_refdst", u64, 88 * 8)],
        "dst_entry": [("dev", void_ptr, 0), ("ops", void_ptr, 64)],
        "dst_ops": [("family", u16, 0)],
        "net_device": [("ifindex", b.typedef("int", u32), 224 * 8)],
        "rtable": [("dst", 0, 0), ("rt_gw_family", u8, 152 * 8), ("", 0, 156 * 8)],
        "rt6_info": [("dst", 0, 0), ("rt6i_gateway", in6, 188 * 8), ("rt6i_flags", u32, 216 * 8)],
    }
    dst_entry = None
    gw_union = b.struct("", 16, [("rt_gw4", u32, 0), ("rt_gw6", in6, 0)], union=True)
    for name in ("dst_entry", "sk_buff", "dst_ops", "net_device", "rtable", "rt6_info"):
        members = []
        for member, t, bits in layout[name]:
            if (name, member) == skip:
                continue
            if member == "dst":
                t = dst_entry
            if name == "rtable" and member == "":
                t = gw_union
            members.append((member, t, bits))
        type_id = b.struct(name, 256, members)
        if name == "dst_entry":
            dst_entry = type_id


def test_synthetic_offsets_walk_anonymous_unions_and_typedefs():
    b = Builder()
    route_structs(b)
    offsets = btf.route_offsets(btf.Btf(b.blob()))
    assert offsets == {"WG_OFF_SKB_REFDST": 88, "WG_OFF_DST_OPS": 8, "WG_OFF_DST_DEV": 0,
                       "WG_OFF_DST_OPS_FAMILY": 0, "WG_OFF_DEV_IFINDEX": 224,
                       "WG_OFF_RT_GW_FAMILY": 152, "WG_OFF_RT_GW4": 156, "WG_OFF_RT_GW6": 156,
                       "WG_OFF_RT6_GATEWAY": 188, "WG_OFF_RT6_FLAGS": 216}


@pytest.mark.parametrize("missing", [("sk_buff", "_skb_refdst"), ("rtable", ""),
                                     ("rt6_info", "rt6i_flags")])
def test_a_missing_member_is_a_clear_error(missing):
    b = Builder()
    route_structs(b, skip=missing)
    with pytest.raises(btf.BtfError, match="has no member"):
        btf.route_offsets(btf.Btf(b.blob()))


def test_a_member_of_another_size_is_refused():
    b = Builder()
    u16 = b.int_("u16", 2)
    b.struct("sk_buff", 256, [("_skb_refdst", u16, 88 * 8)])
    with pytest.raises(btf.BtfError, match="_skb_refdst is 2 bytes, expected 8"):
        btf.route_offsets(btf.Btf(b.blob()))


def test_a_missing_struct_is_a_clear_error():
    b = Builder()
    b.int_("int", 4)
    with pytest.raises(btf.BtfError, match="struct sk_buff not in BTF"):
        btf.route_offsets(btf.Btf(b.blob()))


@pytest.mark.parametrize("data, message", [
    (b"", "too short"),
    (b"\x00" * 32, "not BTF"),
])
def test_not_btf(data, message):
    with pytest.raises(btf.BtfError, match=message):
        btf.Btf(data)


def test_truncated_type_section():
    b = Builder()
    b.struct("s", 8, [("a", 0, 0), ("b", 0, 32)])
    blob = bytearray(b.blob())
    struct.pack_into("<I", blob, 12, len(b.types) - 4)     # type_len cut into the record
    with pytest.raises(btf.BtfError, match="ends inside a record"):
        btf.Btf(bytes(blob))


def test_unreadable_file_is_a_btf_error(tmp_path):
    with pytest.raises(btf.BtfError, match="cannot read"):
        btf.load(str(tmp_path / "none"))
