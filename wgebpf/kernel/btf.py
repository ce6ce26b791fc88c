"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

The classifier (bpf/nexthop.c) reads the route the kernel attached to a
packet (skb->_skb_refdst and the rtable / rt6_info behind it) with
bpf_probe_read_kernel. Those structs are kernel-internal: their layout
changes between versions and configs, and the headers bcc compiles against
(Debian's 6.1) are wrong for newer kernels. So the offsets come from the
running kernel's own type information at load time and reach the C code as
-D flags (route_cflags()).

The parser reads the raw BTF format (include/uapi/linux/btf.h): a header,
a type section of variable-length records (type ids count from 1 in order),
and a string section. One pass indexes where every record starts and the
ids of named structs; members are decoded only for the structs asked about,
walking into anonymous struct/union members (where e.g. dst_entry.dev lives
beside dev_rcu). The parsed file is cached per process: it is about 5 MB.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"

BTF_MAGIC = 0xEB9F

# Kinds (BTF_KIND_*) and the bytes each record carries after its 12-byte head.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_SIZED = {INT, STRUCT, UNION, ENUM, ENUM64, FLOAT}
POINTER_SIZE = 8
SPAN_MAX = 64       # nexthop.c's WG_SPAN_MAX: members it reads in one go


class BtfError(Exception):
    """The BTF is missing, malformed, or lacks a member we need."""


@dataclass(frozen=True)
class Member:
    offset: int     # bytes from the start of the outermost struct
    size: int       # bytes


class Btf:
    """Type lookups over one BTF blob (vmlinux's, or a test's)."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF too short for its header")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"not BTF (magic {magic:#x}; big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types = hdr_len + type_off
        self._strings = hdr_len + str_off
        end = self._types + type_len
        if end > len(data) or self._strings + str_len > len(data):
            raise BtfError("BTF sections run past the end of the data")
        self._pos = [0]                 # type id -> record position (id 0 is void)
        self._structs: dict[str, int] = {}
        pos = self._types
        while pos < end:
            name_off, info = struct.unpack_from("<II", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind in _PER_MEMBER:
                extra = vlen * _PER_MEMBER[kind]
            else:
                extra = _FIXED_EXTRA.get(kind, 0)
            if kind == 0 or kind > ENUM64:
                raise BtfError(f"unknown BTF kind {kind} at type {len(self._pos)}")
            if kind == STRUCT and name_off:
                # The first definition wins: vmlinux has each struct once.
                self._structs.setdefault(self._string(name_off), len(self._pos))
            self._pos.append(pos)
            pos += 12 + extra
        if pos != end:
            raise BtfError("BTF type section ends inside a record")

    # -- raw access ------------------------------------------------------------

    def _string(self, off: int) -> str:
        start = self._strings + off
        return self._data[start:self._data.index(b"\0", start)].decode()

    def _head(self, type_id: int) -> tuple[str, int, int, int, int]:
        """(name, kind, vlen, kind_flag, size_or_type) of a type id."""
        if not 0 < type_id < len(self._pos):
            raise BtfError(f"type id {type_id} out of range")
        pos = self._pos[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        return (self._string(name_off), (info >> 24) & 0x1F, info & 0xFFFF,
                info >> 31, size_or_type)

    def size_of(self, type_id: int) -> int:
        """Size in bytes of a type, through typedefs and qualifiers."""
        for _ in range(32):
            _name, kind, _vlen, _kf, size_or_type = self._head(type_id)
            if kind in _SIZED:
                return size_or_type
            if kind == PTR:
                return POINTER_SIZE
            if kind == ARRAY:
                elem, _index, nelems = struct.unpack_from(
                    "<III", self._data, self._pos[type_id] + 12)
                return self.size_of(elem) * nelems
            if kind not in _MODIFIERS:
                raise BtfError(f"type {type_id} (kind {kind}) has no size")
            type_id = size_or_type
        raise BtfError(f"type {type_id}: too many typedef/qualifier levels")

    def _members(self, type_id: int):
        """(name, type id, bit offset) of a struct/union's direct members."""
        _name, kind, vlen, kind_flag, _size = self._head(type_id)
        pos = self._pos[type_id] + 12
        for i in range(vlen):
            name_off, member_type, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            # kind_flag: the top byte is a bitfield size, the rest the bit offset
            yield self._string(name_off), member_type, (offset & 0xFFFFFF) if kind_flag else offset

    def _strip(self, type_id: int) -> tuple[int, int]:
        """(type id, kind) behind typedefs and qualifiers."""
        for _ in range(32):
            _name, kind, _vlen, _kf, size_or_type = self._head(type_id)
            if kind not in _MODIFIERS:
                return type_id, kind
            type_id = size_or_type
        raise BtfError(f"type {type_id}: too many typedef/qualifier levels")

    def _find(self, type_id: int, member: str, base_bits: int) -> tuple[int, int] | None:
        """(bit offset, member type id) of `member`, looking into anonymous members."""
        for name, member_type, bits in self._members(type_id):
            if name == member:
                return base_bits + bits, member_type
            if not name:
                inner, kind = self._strip(member_type)
                if kind in (STRUCT, UNION):
                    found = self._find(inner, member, base_bits + bits)
                    if found:
                        return found
        return None

    # -- the lookups -------------------------------------------------------------

    def member(self, struct_name: str, member: str) -> Member:
        """Byte offset and size of struct_name.member (anonymous members walked)."""
        type_id = self._structs.get(struct_name)
        if type_id is None:
            raise BtfError(f"struct {struct_name} not in BTF")
        found = self._find(type_id, member, 0)
        if found is None:
            raise BtfError(f"struct {struct_name} has no member {member!r}")
        bits, member_type = found
        if bits % 8:
            raise BtfError(f"{struct_name}.{member} is not byte-aligned (bit offset {bits})")
        return Member(bits // 8, self.size_of(member_type))


@functools.lru_cache(maxsize=4)
def load(path: str = VMLINUX) -> Btf:
    """The parsed BTF at `path`, once per process."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BtfError(f"cannot read {path}: {e.strerror}") from None
    return Btf(data)


# What nexthop.c reads: (-D name, struct, member, allowed sizes). The sizes
# are the C types the program reads with; another size means the member
# changed meaning and the offsets must not be trusted.
ROUTE_MEMBERS = (
    ("WG_OFF_SKB_REFDST", "sk_buff", "_skb_refdst", (8,)),
    ("WG_OFF_DST_OPS", "dst_entry", "ops", (8,)),
    ("WG_OFF_DST_DEV", "dst_entry", "dev", (8,)),
    ("WG_OFF_DST_OPS_FAMILY", "dst_ops", "family", (2,)),
    ("WG_OFF_DEV_IFINDEX", "net_device", "ifindex", (4,)),
    ("WG_OFF_RT_DST", "rtable", "dst", None),
    ("WG_OFF_RT_GW_FAMILY", "rtable", "rt_gw_family", (1,)),
    ("WG_OFF_RT_GW4", "rtable", "rt_gw4", (4,)),
    ("WG_OFF_RT_GW6", "rtable", "rt_gw6", (16,)),
    ("WG_OFF_RT6_DST", "rt6_info", "dst", None),
    ("WG_OFF_RT6_GATEWAY", "rt6_info", "rt6i_gateway", (16,)),
    ("WG_OFF_RT6_FLAGS", "rt6_info", "rt6i_flags", (4,)),
)


def route_offsets(btf: Btf) -> dict[str, int]:
    """-D name -> byte offset for every member ROUTE_MEMBERS names.

    Raises BtfError naming the first member that is missing or implausible.
    The dst entry must be the first member of rtable and rt6_info: the
    program treats the dst pointer as a pointer to those.
    """
    out = {}
    for macro, struct_name, member, sizes in ROUTE_MEMBERS:
        m = btf.member(struct_name, member)
        if sizes is not None and m.size not in sizes:
            raise BtfError(f"{struct_name}.{member} is {m.size} bytes, expected "
                           f"{' or '.join(map(str, sizes))}")
        out[macro] = m.offset
    for macro in ("WG_OFF_RT_DST", "WG_OFF_RT6_DST"):
        if out.pop(macro) != 0:
            raise BtfError(f"{macro[7:].lower()}: the dst_entry is not at offset 0")
    if out["WG_OFF_RT_GW4"] != out["WG_OFF_RT_GW6"]:
        raise BtfError("rtable.rt_gw4 and rt_gw6 are not one union")
    # nexthop.c reads neighbouring members in one go (WG_SPAN_MAX there)
    for name, members in (("dst_entry dev/ops", (("WG_OFF_DST_DEV", 8), ("WG_OFF_DST_OPS", 8))),
                          ("rtable gateway", (("WG_OFF_RT_GW_FAMILY", 1), ("WG_OFF_RT_GW6", 16))),
                          ("rt6_info gateway/flags", (("WG_OFF_RT6_GATEWAY", 16),
                                                      ("WG_OFF_RT6_FLAGS", 4)))):
        start = min(out[m] for m, _ in members)
        end = max(out[m] + size for m, size in members)
        if end - start > SPAN_MAX:
            raise BtfError(f"{name}: {end - start} bytes apart, more than {SPAN_MAX}")
    return out


def route_cflags(path: str = VMLINUX) -> list[str]:
    """The -D flags for nexthop.c's route read (WG_ROUTE_DST and the offsets).

    Raises BtfError when the running kernel's BTF cannot give them.
    """
    offsets = route_offsets(load(path))
    return ["-DWG_ROUTE_DST=1"] + [f"-D{k}={v}" for k, v in offsets.items()]
