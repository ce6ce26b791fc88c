"""Tools for experiments and tests, not needed to run a tunnel: network
namespaces (netns), `wgebpf bench`, the bounded flood generator and the
demo."""
