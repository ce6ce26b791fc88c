"""Everything wgebpf puts into the kernel that outlives a crash and that
`wgebpf detach` removes: the eBPF programs and their maps (bpfmaps and a
loader per program: nexthop, policy, reuseport, tun_steer, xdp_guard), tc
filters (tc), nftables tables (nftables), links and routes (link). Each
loader knows how to remove what it made."""
