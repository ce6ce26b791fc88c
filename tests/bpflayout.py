"""Checking a C header against its Python mirror, with the C compiler as
the judge (xdp-tools' common_kern_user.h habit, kept honest).

Each number to check (a #define, a sizeof, an offsetof) becomes the
max_entries (+1: 0 is refused) of an unallocated hash map in a tiny program
that bcc compiles; reading the maps back gives the compiler's own numbers.
"""

import ctypes
import re

from wgebpf.kernel import bpfmaps


def c_defines(header: str, prefix: str) -> dict[str, str]:
    """#define PREFIX_NAME value lines of `header` (value text, comments stripped)."""
    out = {}
    with open(header) as f:
        for line in f:
            m = re.match(rf"#define\s+{prefix}_(\w+)\s+(.+?)\s*(/\*.*)?$", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def compiled(includes: str, probes: list[tuple[str, str]]) -> dict[str, int]:
    """{what: value} for (what, C constant expression) probes."""
    from bcc import BPF
    text = includes + "".join(
        f"BPF_F_TABLE(\"hash\", u32, u8, p{i}, ({expr}) + 1, BPF_F_NO_PREALLOC);\n"
        for i, (_, expr) in enumerate(probes))
    b = BPF(text=text.encode(), cflags=[f"-I{bpfmaps.BPF_DIR}"])
    try:
        return {what: b[f"p{i}".encode()].max_entries - 1 for i, (what, _) in enumerate(probes)}
    finally:
        b.cleanup()


def assert_mirror(module, header: str, prefix: str, includes: str,
                  extra: list[tuple[str, str]] = ()) -> dict[str, int]:
    """Every #define, struct size and field offset of `header` equals
    `module`'s (constants by name, module.STRUCTS by C struct name).
    Returns the compiler's numbers, with `extra` probes, for more checks."""
    defines = c_defines(header, prefix)
    numbers = {k: v for k, v in defines.items() if not v.startswith('"')}
    strings = {k: v.strip('"') for k, v in defines.items() if v.startswith('"')}
    probes = [(f"const {name}", f"{prefix}_{name}") for name in numbers]
    for cname, cls in module.STRUCTS.items():
        probes.append((f"sizeof {cname}", f"sizeof(struct {cname})"))
        probes += [(f"offsetof {cname}.{f}", f"offsetof(struct {cname}, {f})")
                   for f, _ in cls._fields_]
    c = compiled(includes, probes + list(extra))
    for name in numbers:
        assert getattr(module, name) == c[f"const {name}"], name
    for name, value in strings.items():
        assert getattr(module, name) == value, name
    for cname, cls in module.STRUCTS.items():
        assert ctypes.sizeof(cls) == c[f"sizeof {cname}"], cname
        for f, _ in cls._fields_:
            assert getattr(cls, f).offset == c[f"offsetof {cname}.{f}"], (cname, f)
    return c
