"""Allowed IPs: table-driven cases, then a randomised differential test."""

import ipaddress
import random

import pytest

from wgebpf.wireguard.allowedips import AllowedIPs

net = ipaddress.ip_network


class Peer:
    """A stand-in peer; deliberately unhashable, as a dataclass peer may be."""

    __hash__ = None

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other):
        return isinstance(other, Peer) and other.name == self.name

    def __repr__(self) -> str:
        return f"Peer({self.name})"


# Each case: operations, then (address, expected peer name or None) lookups.
# Operations are ("insert", prefix, peer), ("remove", prefix, peer, returns)
# and ("remove_by_peer", peer).
CASES = {
    "nested IPv4 prefixes, longest wins": (
        [("insert", "10.0.0.0/8", "a"), ("insert", "10.1.0.0/16", "b"),
         ("insert", "10.1.1.0/24", "c"), ("insert", "10.1.1.1/32", "d")],
        [("10.2.0.1", "a"), ("10.1.2.3", "b"), ("10.1.1.2", "c"),
         ("10.1.1.1", "d"), ("10.1.1.255", "c"), ("10.255.255.255", "a"),
         ("11.0.0.0", None), ("9.255.255.255", None)],
    ),
    "insertion order does not matter": (
        [("insert", "10.1.1.1/32", "d"), ("insert", "10.1.1.0/24", "c"),
         ("insert", "10.0.0.0/8", "a")],
        [("10.1.1.1", "d"), ("10.1.1.2", "c"), ("10.9.9.9", "a")],
    ),
    "IPv4 default route": (
        [("insert", "0.0.0.0/0", "a"), ("insert", "192.0.2.0/24", "b")],
        [("198.51.100.1", "a"), ("192.0.2.77", "b"), ("0.0.0.0", "a"),
         ("255.255.255.255", "a"), ("2001:db8::1", None)],
    ),
    "IPv6 nested and default": (
        [("insert", "::/0", "a"), ("insert", "2001:db8::/32", "b"),
         ("insert", "2001:db8:1::/48", "c"), ("insert", "2001:db8::1/128", "d")],
        [("2001:db8::1", "d"), ("2001:db8::2", "b"), ("2001:db8:1::9", "c"),
         ("2001:db9::1", "a"), ("::", "a"), ("192.0.2.1", None)],
    ),
    "the two /1 halves": (
        [("insert", "0.0.0.0/1", "a"), ("insert", "128.0.0.0/1", "b")],
        [("127.255.255.255", "a"), ("128.0.0.0", "b")],
    ),
    "all-ones /32 and /128": (
        [("insert", "255.255.255.255/32", "a"),
         ("insert", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "b")],
        [("255.255.255.255", "a"), ("255.255.255.254", None),
         ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "b"),
         ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", None)],
    ),
    "an equal prefix changes owner": (
        [("insert", "192.0.2.0/24", "a"), ("insert", "192.0.2.0/24", "b")],
        [("192.0.2.1", "b")],
    ),
    "host bits are masked off": (
        [("insert", "10.1.2.3/8", "a"), ("insert", "2001:db8::1/32", "b")],
        [("10.200.0.1", "a"), ("2001:db8:ffff::1", "b")],
    ),
    "remove needs the owner": (
        [("insert", "192.0.2.0/24", "a"),
         ("remove", "192.0.2.0/24", "b", False),
         ("remove", "198.51.100.0/24", "a", False)],
        [("192.0.2.1", "a")],
    ),
    "remove uncovers the shorter prefix": (
        [("insert", "10.0.0.0/8", "a"), ("insert", "10.1.0.0/16", "b"),
         ("remove", "10.1.0.0/16", "b", True),
         ("remove", "10.1.0.0/16", "b", False)],
        [("10.1.0.1", "a")],
    ),
    "remove_by_peer leaves the others": (
        [("insert", "10.0.0.0/8", "a"), ("insert", "10.1.0.0/16", "b"),
         ("insert", "10.1.1.0/24", "a"), ("insert", "2001:db8::/32", "a"),
         ("insert", "2001:db8:1::/48", "b"), ("remove_by_peer", "a")],
        [("10.1.1.1", "b"), ("10.2.0.1", None), ("2001:db8:1::1", "b"),
         ("2001:db8::1", None)],
    ),
    "remove_by_peer of a peer with nothing": (
        [("insert", "10.0.0.0/8", "a"), ("remove_by_peer", "z")],
        [("10.0.0.1", "a")],
    ),
    "IPv4 and IPv6 /0 are separate": (
        [("insert", "0.0.0.0/0", "a"), ("insert", "::/0", "b"),
         ("remove", "::/0", "a", False)],
        [("0.0.0.1", "a"), ("::1", "b"), ("::ffff:192.0.2.1", "b")],
    ),
}


def apply(table: AllowedIPs, peers: dict, operations) -> None:
    for operation in operations:
        kind = operation[0]
        if kind == "insert":
            table.insert(net(operation[1], strict=False), peers[operation[2]])
        elif kind == "remove":
            _, prefix, name, returns = operation
            assert table.remove(net(prefix), peers[name]) is returns, operation
        else:
            table.remove_by_peer(peers[operation[1]])


@pytest.mark.parametrize("operations,lookups", CASES.values(), ids=CASES.keys())
def test_cases(operations, lookups):
    peers = {name: Peer(name) for name in "abcdz"}
    table = AllowedIPs()
    apply(table, peers, operations)
    for address, expected in lookups:
        got = table.lookup(address)
        assert got is (peers[expected] if expected else None), address
        # The packet-header fast path must agree with the text path.
        packed = ipaddress.ip_address(address).packed
        assert table.lookup(packed) is got, address
        assert table.lookup(ipaddress.ip_address(address)) is got, address


def test_entries_for_keeps_insertion_order_and_ownership():
    a, b = Peer("a"), Peer("b")
    table = AllowedIPs()
    for prefix in ("10.0.0.0/8", "2001:db8::/32", "192.0.2.0/24", "198.51.100.0/24"):
        table.insert(net(prefix), a)
    table.insert(net("192.0.2.0/24"), b)                 # moves to b
    assert table.entries_for(a) == [net("10.0.0.0/8"), net("2001:db8::/32"),
                                    net("198.51.100.0/24")]
    assert table.entries_for(b) == [net("192.0.2.0/24")]
    table.insert(net("10.0.0.0/8"), a)                   # re-insert: to the back
    assert table.entries_for(a)[-1] == net("10.0.0.0/8")
    assert table.entries_for(Peer("a")) == []             # identity, not equality
    assert len(table) == 4
    assert dict(table)[net("192.0.2.0/24")] is b
    table.remove_by_peer(a)
    assert list(table) == [(net("192.0.2.0/24"), b)]
    assert table.entries_for(a) == []


def test_accepts_text_networks_and_all_byte_forms():
    peer = Peer("a")
    table = AllowedIPs()
    table.insert("203.0.113.0/24", peer)
    raw = bytes([203, 0, 113, 9])
    for form in (raw, bytearray(raw), memoryview(raw), "203.0.113.9",
                 ipaddress.IPv4Address("203.0.113.9")):
        assert table.lookup(form) is peer
    assert table.remove("203.0.113.0/24", peer)
    assert len(table) == 0 and table.lookup(raw) is None


@pytest.mark.parametrize("bad", [b"", b"\x01\x02\x03", bytes(5), bytes(17)])
def test_wrong_address_length_raises(bad):
    with pytest.raises(ValueError):
        AllowedIPs().lookup(bad)


def test_none_is_not_a_peer():
    with pytest.raises(ValueError):
        AllowedIPs().insert(net("192.0.2.0/24"), None)


def test_clear():
    table = AllowedIPs()
    table.insert(net("192.0.2.0/24"), Peer("a"))
    table.clear()
    assert len(table) == 0 and table.lookup("192.0.2.1") is None


# --- randomised differential test against a naive scan -----------------------

class NaiveAllowedIPs:
    """The obvious, slow model: scan every prefix, keep the longest match."""

    def __init__(self) -> None:
        self.owner: dict = {}

    def insert(self, network, peer) -> None:
        self.owner.pop(network, None)
        self.owner[network] = peer

    def remove(self, network, peer) -> bool:
        if self.owner.get(network) is peer:
            del self.owner[network]
            return True
        return False

    def remove_by_peer(self, peer) -> None:
        self.owner = {n: p for n, p in self.owner.items() if p is not peer}

    def lookup(self, address: ipaddress._BaseAddress):
        value, bits = int(address), address.max_prefixlen
        best, best_len = None, -1
        for network, peer in self.owner.items():
            if network.version != address.version or network.prefixlen <= best_len:
                continue
            shift = bits - network.prefixlen
            if value >> shift == int(network.network_address) >> shift:
                best, best_len = peer, network.prefixlen
        return best


def _random_network(rng: random.Random, version: int):
    bits = 32 if version == 4 else 128
    # A few dense regions and a spread of lengths, so prefixes overlap a lot.
    region = rng.choice((0x0A, 0xC0, 0xFF)) << (bits - 8)
    value = region | rng.getrandbits(bits - 8)
    # Very short prefixes are rare: once present they match nearly
    # everything and would hide the misses.
    if rng.random() < 0.002:
        length = rng.choice((0, 1, 7, 8))
    else:
        length = rng.choice((9, 12, 16, 20, 24, 28, 31, 32) if version == 4
                            else (16, 32, 48, 56, 64, 96, 120, 127, 128))
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return cls((value, length), strict=False)


def _random_address(rng: random.Random, version: int, networks: list):
    bits, cls = (32, ipaddress.IPv4Address) if version == 4 else (128, ipaddress.IPv6Address)
    candidates = [n for n in networks[-50:] if n.version == version]
    if candidates and rng.random() < 0.5:   # inside (or at an edge of) a prefix
        network = rng.choice(candidates)
        host_bits = bits - network.prefixlen
        host = rng.choice((0, (1 << host_bits) - 1, rng.getrandbits(host_bits)))
        return cls(int(network.network_address) | host)
    region = rng.choice((0x0A, 0xC0, 0xFF, rng.getrandbits(8))) << (bits - 8)
    return cls(region | rng.getrandbits(bits - 8))


@pytest.mark.parametrize("seed", range(4))
def test_differential_against_naive_scan(seed):
    rng = random.Random(seed)
    peers = [Peer(str(i)) for i in range(12)]
    fast, naive = AllowedIPs(), NaiveAllowedIPs()
    inserted: list = []
    for step in range(3000):
        roll = rng.random()
        version = 4 if rng.random() < 0.5 else 6
        if roll < 0.6:
            network, peer = _random_network(rng, version), rng.choice(peers)
            fast.insert(network, peer)
            naive.insert(network, peer)
            inserted.append(network)
        elif roll < 0.75 and inserted:
            network, peer = rng.choice(inserted), rng.choice(peers)
            assert fast.remove(network, peer) is naive.remove(network, peer)
        elif roll < 0.77:
            peer = rng.choice(peers)
            fast.remove_by_peer(peer)
            naive.remove_by_peer(peer)
        for _ in range(3):
            address = _random_address(rng, version, inserted)
            expected = naive.lookup(address)
            assert fast.lookup(address.packed) is expected, (step, address)
            assert fast.lookup(address) is expected, (step, address)
    assert len(fast) == len(naive.owner) > 100
    assert list(fast) == list(naive.owner.items())
    for peer in peers:
        assert fast.entries_for(peer) == [n for n, p in naive.owner.items() if p is peer]
