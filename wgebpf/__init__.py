"""wgebpf: a userspace WireGuard for Linux that treats WireGuard as a link layer."""

__version__ = "0.1.0"
