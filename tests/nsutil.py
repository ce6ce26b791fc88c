"""Moving the test's own thread into a fresh network namespace.

setns(2) affects only the calling thread, so code under test that talks to
the kernel directly (pyroute2, ioctls, /proc/sys, bpf syscalls, the
processes it starts) sees just the test's namespace, and the root namespace
is never touched. Import `fresh_netns` into a test module to get the
`netns` fixture.
"""

import ctypes
import os
import secrets
import subprocess
from contextlib import contextmanager

import pytest

from wgebpf.kernel import bpfmaps

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def inside(ns: str):
    """Run the block with this thread in namespace `ns`, then come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        setns(target)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)
        os.close(target)


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True).stdout


@pytest.fixture(name="netns")
def fresh_netns(root):
    """Function scope; needs root and iproute2. Yields the name of a fresh
    namespace that the test's thread is inside of, with lo up; always deleted."""
    name = f"wgebpf-t-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with inside(name):
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            # Guard: never run these tests against the root namespace.
            assert sh("ip -o link show").count("\n") == 1, "not in a fresh namespace"
            yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


# --- a minimal eBPF loader: `r0 = ret; exit` -----------------------------------
# Enough to test plumbing that takes any program (steering ioctl, tc, XDP)
# without compiling C.
BPF_PROG_LOAD, BPF_OBJ_GET_INFO_BY_FD = 5, 15
BPF_PROG_TYPE_SOCKET_FILTER, BPF_PROG_TYPE_SCHED_CLS, BPF_PROG_TYPE_XDP = 1, 3, 6


bpf = bpfmaps.bpf


def load_const_prog(prog_type: int, ret: int) -> tuple[int, int]:
    """(fd, prog id) of a program that returns `ret`."""
    import struct
    insns = ctypes.create_string_buffer(struct.pack("<BBhi", 0xB7, 0, 0, ret)
                                        + struct.pack("<BBhi", 0x95, 0, 0, 0))
    lic = ctypes.create_string_buffer(b"GPL")
    fd = bpf(BPF_PROG_LOAD, ctypes.create_string_buffer(
        struct.pack("<IIQQ", prog_type, 2, ctypes.addressof(insns), ctypes.addressof(lic)), 128))
    info = ctypes.create_string_buffer(256)
    bpf(BPF_OBJ_GET_INFO_BY_FD, ctypes.create_string_buffer(
        struct.pack("<IIQ", fd, 256, ctypes.addressof(info)), 16))
    return fd, struct.unpack_from("<I", info.raw, 4)[0]
