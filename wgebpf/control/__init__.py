"""The control plane around a device: `wgebpf attach` (attach), the config
file (config), the crash-safe record of kernel objects (state), live
settings (settings), the wg UAPI (uapi), status, `wgebpf show` and the
Prometheus metrics."""
