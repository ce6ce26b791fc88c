"""The wg-quick configuration parser: a full file, each error, and the writer."""

import ipaddress
from ipaddress import ip_interface, ip_network

import pytest

from wgebpf.control import config
from wgebpf.wireguard import keys
from wgebpf.control.config import ConfigError, parse

PATH = "/etc/wgebpf/wgtest0.conf"

# Fixed keys, so failures are reproducible. Peer private keys are never used.
PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
PRIV_B64 = keys.encode(PRIV)
OWN_PUB_B64 = keys.encode(keys.public_key(PRIV))
PUB = [keys.public_key(bytes([i]) * 32) for i in range(1, 4)]
PUB_B64 = [keys.encode(k) for k in PUB]
PSK = bytes(range(32))
PSK_B64 = keys.encode(PSK)

FULL = f"""\
# wgtest0: every key there is
[Interface]
PrivateKey = {PRIV_B64}
ListenPort = 51820          # fixed port
Address = 192.0.2.1/24, 2001:db8::1/64
Address = 198.51.100.1
DNS = 192.0.2.53, 2001:db8::53, example.com
MTU = 1420
Table = 1234
FwMark = 0x1f
PreUp = echo pre-up %i
PostUp = echo post-up %i
PreDown = echo pre-down %i
PostDown = echo post-down %i
SaveConfig = true
PeerSelection = allowedips
SourcePolicy = fib
Workers = 2
Metrics = 127.0.0.1:9586
MetricsCompat = true

[Peer]
# a router with a v6 endpoint
PublicKey = {PUB_B64[0]}
PresharedKey = {PSK_B64}
Endpoint = [2001:db8::2]:51820
AllowedIPs = 192.0.2.2/32, 2001:db8::2/128
PersistentKeepalive = 25
SourcePolicy = off

[Peer]
PublicKey = {PUB_B64[1]}
Endpoint = peer.example.com:4500
AllowedIPs = 203.0.113.0/24
PersistentKeepalive = off

[Peer]
PublicKey = {PUB_B64[2]}
"""


def test_full_file():
    cfg = parse(FULL, PATH)
    i = cfg.interface
    assert cfg.path == PATH
    assert i.private_key == PRIV
    assert i.public_key == keys.public_key(PRIV)
    assert i.listen_port == 51820
    assert i.addresses == [ip_interface("192.0.2.1/24"), ip_interface("2001:db8::1/64"),
                           ip_interface("198.51.100.1/32")]
    assert i.dns == ["192.0.2.53", "2001:db8::53", "example.com"]
    assert i.mtu == 1420
    assert i.table == "1234"
    assert i.fwmark == 0x1F
    assert i.pre_up == ["echo pre-up %i"]
    assert i.post_up == ["echo post-up %i"]
    assert i.pre_down == ["echo pre-down %i"]
    assert i.post_down == ["echo post-down %i"]
    assert i.save_config is True
    assert i.peer_selection == "allowedips"
    assert i.source_policy == "fib"
    assert i.workers == 2
    assert i.metrics == "127.0.0.1:9586"
    assert i.metrics_compat is True

    p0, p1, p2 = cfg.peers
    assert p0 == config.PeerConfig(
        public_key=PUB[0], preshared_key=PSK, endpoint=("2001:db8::2", 51820),
        allowed_ips=[ip_network("192.0.2.2/32"), ip_network("2001:db8::2/128")],
        persistent_keepalive=25, source_policy="off", line=22)
    assert p1 == config.PeerConfig(
        public_key=PUB[1], endpoint=("peer.example.com", 4500),
        allowed_ips=[ip_network("203.0.113.0/24")], persistent_keepalive=0, line=31)
    assert p2 == config.PeerConfig(public_key=PUB[2], line=37)


def test_minimal_file_defaults():
    cfg = parse(f"[Interface]\nPrivateKey = {PRIV_B64}\n")
    i = cfg.interface
    assert cfg.peers == [] and cfg.path == "<string>"
    assert (i.listen_port, i.mtu, i.fwmark, i.table, i.workers, i.metrics) == \
        (None, None, 0, "auto", None, None)
    assert (i.peer_selection, i.source_policy, i.save_config) == ("nexthop", "allowedips", False)
    assert i.addresses == [] and i.dns == [] and i.post_up == []


def test_format_config_round_trips():
    cfg = parse(FULL, PATH)
    text = config.format_config(cfg)
    again = parse(text, PATH)
    for peer in cfg.peers + again.peers:
        peer.line = 0              # headers move: comments and blank lines are not kept
    assert again == cfg
    assert "Endpoint = [2001:db8::2]:51820" in text
    assert f"PrivateKey = {PRIV_B64}" in text


def test_format_config_minimal():
    cfg = parse(f"[Interface]\nPrivateKey = {PRIV_B64}\n[Peer]\nPublicKey = {PUB_B64[0]}\n")
    assert config.format_config(cfg) == (
        f"[Interface]\nPrivateKey = {PRIV_B64}\n\n[Peer]\nPublicKey = {PUB_B64[0]}\n")


def test_repeated_keys_accumulate_in_order():
    cfg = parse(f"""\
[Interface]
PrivateKey = {PRIV_B64}
Address = 192.0.2.1/24
DNS = 192.0.2.53
PostUp = first
Address = 2001:db8::1/64, 198.51.100.1/24
PostUp = second
DNS = 2001:db8::53
PostUp = third
[Peer]
PublicKey = {PUB_B64[0]}
AllowedIPs = 192.0.2.2/32
AllowedIPs = 2001:db8::2/128, 203.0.113.0/24
""")
    assert cfg.interface.addresses == [ip_interface(a) for a in
                                       ("192.0.2.1/24", "2001:db8::1/64", "198.51.100.1/24")]
    assert cfg.interface.dns == ["192.0.2.53", "2001:db8::53"]
    assert cfg.interface.post_up == ["first", "second", "third"]
    assert cfg.peers[0].allowed_ips == [ip_network(n) for n in
                                        ("192.0.2.2/32", "2001:db8::2/128", "203.0.113.0/24")]


def test_names_and_words_are_case_insensitive():
    cfg = parse(f"""\
[INTERFACE]
privatekey = {PRIV_B64}
LISTENPORT = 1
fwMark = OFF
TABLE = Off
peerselection = NextHop
SOURCEPOLICY = NFTables
workers = AUTO
saveconfig = TRUE
[peer]
PUBLICKEY = {PUB_B64[0]}
allowedips = 192.0.2.2/32
persistentkeepalive = Off
""")
    i = cfg.interface
    assert (i.listen_port, i.fwmark, i.table, i.peer_selection, i.source_policy, i.workers,
            i.save_config) == (1, 0, "off", "nexthop", "nftables", None, True)
    assert cfg.peers[0].persistent_keepalive == 0
    assert cfg.peers[0].allowed_ips == [ip_network("192.0.2.2/32")]


def test_values_as_wg_reads_them():
    cfg = parse(
        f"\ufeff[Interface]\r\n"
        f"PrivateKey={PRIV_B64}\r\n"          # no spaces; the key ends in '='
        f"ListenPort = 0\r\n"                  # 0 means a random port, like no ListenPort
        f"FwMark = 4294967295\r\n"
        f"MTU = 1279\r\n"                      # fine without an IPv6 address
        f"Address = 192.0.2.77\r\n"
        f"PostUp = echo one # wg-quick cuts comments even here\r\n"
        f"[Peer]\r\n"
        f"PublicKey = {PUB_B64[0]}\r\n"
        f"AllowedIPs = 192.0.2.77/24, 2001:db8::1/32\r\n"   # host bits masked, as wg does
        f"Endpoint = 192.0.2.2:65535\r\n"
        f"PersistentKeepalive = 65535\r\n")
    i, p = cfg.interface, cfg.peers[0]
    assert i.listen_port is None and i.fwmark == 2**32 - 1 and i.mtu == 1279
    assert i.addresses == [ip_interface("192.0.2.77/32")]
    assert i.post_up == ["echo one"]
    assert p.allowed_ips == [ip_network("192.0.2.0/24"), ip_network("2001:db8::/32")]
    assert p.endpoint == ("192.0.2.2", 65535) and p.persistent_keepalive == 65535
    assert p.line == 8


@pytest.mark.parametrize("value, host, port", [
    ("192.0.2.1:51820", "192.0.2.1", 51820),
    ("[2001:db8::1]:1", "2001:db8::1", 1),
    ("[fe80::1%eth0]:51820", "fe80::1%eth0", 51820),
    ("vpn.example.com:51820", "vpn.example.com", 51820),
    ("localhost:9", "localhost", 9),
])
def test_parse_endpoint(value, host, port):
    assert config.parse_endpoint(value) == (host, port)


def test_parse_endpoint_error_is_value_error():
    with pytest.raises(ValueError, match="brackets"):
        config.parse_endpoint("2001:db8::1:51820")


def test_table_names(tmp_path, monkeypatch):
    rt_tables = tmp_path / "rt_tables"
    rt_tables.write_text("# comment\n100\tvpn\n0\tunspec\n")
    monkeypatch.setattr(config, "RT_TABLES_FILES", (str(rt_tables),))
    iface = "[Interface]\nPrivateKey = " + PRIV_B64 + "\nTable = {}\n"
    assert parse(iface.format("vpn")).interface.table == "vpn"
    assert parse(iface.format("main")).interface.table == "main"
    assert config.route_table_id("vpn") == 100
    assert config.route_table_id("main") == 254
    assert config.route_table_id("1234") == 1234
    assert config.route_table_id("auto") is None and config.route_table_id("off") is None
    for bad in ("unspec", "nosuch", "Main"):
        with pytest.raises(ConfigError, match="Table"):
            parse(iface.format(bad))


# ---------------------------------------------------------------- errors
# Each case: a file, the line and key the error must name, and words it must say.

HEAD = f"[Interface]\nPrivateKey = {PRIV_B64}\n"          # lines 1-2
PEER = HEAD + f"[Peer]\nPublicKey = {PUB_B64[0]}\n"       # lines 3-4


def iface(line: str) -> str:
    """A file whose line 3 is `line`, in [Interface]."""
    return HEAD + line + "\n"


def peer(line: str) -> str:
    """A file whose line 5 is `line`, in a [Peer]."""
    return PEER + line + "\n"


ERRORS = [
    # structure
    ("unknown section", iface("[Peers]"), 3, None, ["'[Peers]'", "did you mean [Peer]"]),
    ("bad header", iface("[Peer"), 3, None, ["'[Peer'", "section header"]),
    ("key outside a section", f"ListenPort = 1\n{HEAD}", 1, "ListenPort", ["outside a section"]),
    ("line without =", iface("ListenPort 51820"), 3, "ListenPort",
     ["not a 'Key = Value' line", "no '='", "'ListenPort = ...'"]),
    ("line without =, unknown word", iface("Colour blue"), 3, None, ["no '='"]),
    ("no key", iface("= 5"), 3, None, ["no key"]),
    ("not a key name before =", iface("ListenPort: 51820 = 1"), 3, "ListenPort",
     ["not a key name"]),
    ("long header typo", iface("[Interface"), 3, None, ["'[Interface'", "section header"]),
    ("unknown key, typo", iface("ListenPrt = 1"), 3, "ListenPrt",
     ["unknown key", "did you mean ListenPort?"]),
    ("unknown key, spaced", peer("Allowed IPs = 192.0.2.0/24"), 5, "Allowed IPs",
     ["did you mean AllowedIPs?"]),
    ("unknown key, nothing close", iface("Colour = blue"), 3, "Colour", ["unknown key"]),
    ("peer key in interface", iface("Endpoint = 192.0.2.2:1"), 3, "Endpoint",
     ["belongs in [Peer]"]),
    ("interface key in peer", peer("Address = 192.0.2.1/24"), 5, "Address",
     ["belongs in [Interface]"]),
    ("key given twice", iface("ListenPort = 1\nListenPort = 2"), 4, "ListenPort",
     ["twice", "line 3"]),
    ("second interface", PEER + HEAD, 5, None, ["second [Interface]", "line 1"]),
    ("no interface", f"[Peer]\nPublicKey = {PUB_B64[0]}\n", None, None, ["no [Interface]"]),
    # keys
    ("missing private key", "[Interface]\nListenPort = 1\n", 1, "PrivateKey", ["missing"]),
    ("missing public key", HEAD + "[Peer]\nAllowedIPs = 192.0.2.2/32\n", 3, "PublicKey",
     ["missing"]),
    ("short private key", f"[Interface]\nPrivateKey = {PRIV_B64[1:]}\n", 2, "PrivateKey",
     ["bad key", "43 characters"]),
    ("private key bad char", f"[Interface]\nPrivateKey = {'!' + PRIV_B64[1:]}\n", 2,
     "PrivateKey", ["'!' at position 1"]),
    ("public key wrong length", peer("").replace(PUB_B64[0], PUB_B64[0][:-2] + "="), 4,
     "PublicKey", [f"'{PUB_B64[0][:-2]}='", "43 characters"]),
    ("preshared key not base64", peer("PresharedKey = hunter2"), 5, "PresharedKey",
     ["bad key"]),
    ("duplicate peer", peer(f"[Peer]\nPublicKey = {PUB_B64[0]}"), 6, "PublicKey",
     [f"'{PUB_B64[0]}'", "peer on line 3"]),
    ("peer is ourselves", HEAD + f"[Peer]\nPublicKey = {OWN_PUB_B64}\n", 4, "PublicKey",
     [f"'{OWN_PUB_B64}'", "own public key"]),
    # interface numbers
    ("listen port too big", iface("ListenPort = 65536"), 3, "ListenPort", ["'65536'", "0..65535"]),
    ("listen port negative", iface("ListenPort = -1"), 3, "ListenPort", ["'-1'", "not a whole"]),
    ("listen port words", iface("ListenPort = http"), 3, "ListenPort", ["'http'"]),
    ("mtu too small", iface("MTU = 575"), 3, "MTU", ["'575'", "576..65535"]),
    ("mtu too big", iface("MTU = 65536"), 3, "MTU", ["'65536'"]),
    ("mtu too small for ipv6", iface("MTU = 1279\nAddress = 2001:db8::1/64"), 3, "MTU",
     ["'1279'", "1280", "IPv6"]),
    ("fwmark too big", iface("FwMark = 0x100000000"), 3, "FwMark", ["'0x100000000'", "32 bits"]),
    ("fwmark octal", iface("FwMark = 010"), 3, "FwMark", ["'010'", "octal"]),
    ("fwmark words", iface("FwMark = on"), 3, "FwMark", ["'on'"]),
    ("table name", iface("Table = nosuchtable"), 3, "Table", ["'nosuchtable'", "auto"]),
    ("table zero", iface("Table = 0"), 3, "Table", ["unspec"]),
    ("table too big", iface("Table = 4294967296"), 3, "Table", ["'4294967296'"]),
    ("save config", iface("SaveConfig = yes"), 3, "SaveConfig", ["'yes'", "true"]),
    # addresses
    ("address prefix", iface("Address = 192.0.2.1/33"), 3, "Address", ["'192.0.2.1/33'"]),
    ("address octet", iface("Address = 192.0.2.1/24, 192.0.2.300/24"), 3, "Address",
     ["'192.0.2.300/24'"]),
    ("address scope", iface("Address = fe80::1%eth0/64"), 3, "Address", ["%scope"]),
    ("address empty item", iface("Address = 192.0.2.1/24,,2001:db8::1/64"), 3, "Address",
     ["empty item"]),
    ("dns", iface("DNS = 192.0.2.53, not a domain"), 3, "DNS", ["'not a domain'"]),
    ("allowed ips prefix", peer("AllowedIPs = 2001:db8::/129"), 5, "AllowedIPs",
     ["'2001:db8::/129'"]),
    ("allowed ips words", peer("AllowedIPs = everything"), 5, "AllowedIPs", ["'everything'"]),
    # endpoint
    ("endpoint no port", peer("Endpoint = 192.0.2.2"), 5, "Endpoint", ["'192.0.2.2'", "no port"]),
    ("endpoint port 0", peer("Endpoint = 192.0.2.2:0"), 5, "Endpoint", ["'192.0.2.2:0'", "1..65535"]),
    ("endpoint port big", peer("Endpoint = 192.0.2.2:65536"), 5, "Endpoint", ["65536"]),
    ("endpoint port name", peer("Endpoint = 192.0.2.2:wireguard"), 5, "Endpoint",
     ["'wireguard' is not a number"]),
    ("endpoint v6 unbracketed", peer("Endpoint = 2001:db8::2:51820"), 5, "Endpoint",
     ["'2001:db8::2:51820'", "brackets"]),
    ("endpoint unclosed bracket", peer("Endpoint = [2001:db8::2:51820"), 5, "Endpoint",
     ["without ']'"]),
    ("endpoint v4 in brackets", peer("Endpoint = [192.0.2.2]:51820"), 5, "Endpoint",
     ["'192.0.2.2'", "not an IPv6"]),
    ("endpoint bad v4", peer("Endpoint = 192.0.2.256:51820"), 5, "Endpoint",
     ["'192.0.2.256'", "IPv4"]),
    ("endpoint bad name", peer("Endpoint = bad_host!:51820"), 5, "Endpoint", ["'bad_host!'"]),
    ("endpoint no host", peer("Endpoint = :51820"), 5, "Endpoint", ["no host"]),
    ("keepalive too big", peer("PersistentKeepalive = 65536"), 5, "PersistentKeepalive",
     ["'65536'"]),
    ("keepalive words", peer("PersistentKeepalive = on"), 5, "PersistentKeepalive", ["'on'"]),
    # wgebpf's keys
    ("peer selection", iface("PeerSelection = fib"), 3, "PeerSelection",
     ["'fib'", "nexthop, allowedips"]),
    ("source policy", iface("SourcePolicy = strict"), 3, "SourcePolicy",
     ["'strict'", "allowedips, fib, nftables, off"]),
    ("peer source policy", peer("SourcePolicy = rpf"), 5, "SourcePolicy", ["'rpf'"]),
    ("peer mark zero", iface("PeerMark = 0"), 3, "PeerMark", ["'0'", "nonzero"]),
    ("peer mark holes", iface("PeerMark = 0xff00ff00"), 3, "PeerMark",
     ["'0xff00ff00'", "contiguous"]),
    ("peer mark narrow", iface("PeerMark = 0x7f000000"), 3, "PeerMark",
     ["'0x7f000000'", "7 bits", "needs at least 8"]),
    ("peer mark too big", iface("PeerMark = 0x1ff000000"), 3, "PeerMark", ["32 bits"]),
    ("peer mark octal", iface("PeerMark = 0377"), 3, "PeerMark", ["'0377'", "octal"]),
    ("peer mark words", iface("PeerMark = top"), 3, "PeerMark", ["'top'", "0x hex"]),
    ("peer mark shares fwmark bits", iface("SourcePolicy = nftables\nFwMark = 0x1000000\n"
                                            "PeerMark = 0xff000000"), 5, "PeerMark",
     ["shares bits 0x1000000 with FwMark 0x1000000", "nftables"]),
    ("default peer mark vs fwmark, nftables peer",
     peer("SourcePolicy = nftables").replace("[Peer]", "FwMark = 0x80000000\n[Peer]"), 3,
     "FwMark", ["PeerMark 0xffff0000 shares bits 0x80000000", "the default"]),
    ("workers zero", iface("Workers = 0"), 3, "Workers", ["'0'", "1..255"]),
    ("workers too many", iface("Workers = 257"), 3, "Workers", ["'257'"]),
    ("workers words", iface("Workers = many"), 3, "Workers", ["'many'"]),
    ("metrics port only", iface("Metrics = 9586"), 3, "Metrics", ["'9586'", "':9586'"]),
    ("metrics compat not bool", iface("MetricsCompat = maybe"), 3, "MetricsCompat", ["'maybe'"]),
    ("metrics port 0", iface("Metrics = [::1]:0"), 3, "Metrics", ["'[::1]:0'", "1..65535"]),
    ("metrics no port", iface("Metrics = localhost"), 3, "Metrics", ["'localhost'", "no port"]),
]


@pytest.mark.parametrize("text, line, key, words",
                         [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_errors(text, line, key, words):
    with pytest.raises(ConfigError) as err:
        parse(text, PATH)
    e = err.value
    message = str(e)
    assert (e.path, e.line, e.key) == (PATH, line, key)
    assert message.startswith(f"{PATH}:{line}: " if line else f"{PATH}: ")
    if key:
        assert f": {key}: " in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("text", [
    f"[Interface]\nPrivateKey = {PRIV_B64[1:]}\n",
    f"[Interface]\nPrivateKey = {PRIV_B64[:20] + '*' + PRIV_B64[21:]}\n",
    f"[Interface]\nPrivateKey = {PRIV_B64}\n[Peer]\nPublicKey = {PUB_B64[0]}\n"
    f"PresharedKey = {PSK_B64[:-2]}=\n",
])
def test_secret_keys_are_never_quoted(text):
    with pytest.raises(ConfigError) as err:
        parse(text, PATH)
    for secret in (PRIV_B64[1:], PRIV_B64[:20], PSK_B64[:-2]):
        assert secret not in str(err.value)


# A real generated key and psk: a leak must not hide behind fixed test bytes.
SECRET_KEY_B64 = keys.encode(keys.generate_private_key())
SECRET_PSK_B64 = keys.encode(keys.generate_preshared_key())


def secret_pieces(secret: str, size: int = 8) -> list[str]:
    """Every `size`-character substring of `secret`."""
    return [secret[i:i + size] for i in range(len(secret) - size + 1)]


def assert_no_secret(message: str) -> None:
    for secret in (SECRET_KEY_B64, SECRET_PSK_B64):
        leaked = [piece for piece in secret_pieces(secret) if piece in message]
        assert not leaked, f"{message!r} quotes key material {leaked[0]!r}"


def in_interface(line: str) -> str:
    """Line 2 of a file, in [Interface]."""
    return f"[Interface]\n{line}\nListenPort = 1\n"


def in_peer(line: str) -> str:
    """Line 5 of a file, in a [Peer] (after a valid [Interface])."""
    return f"[Interface]\nPrivateKey = {PRIV_B64}\n[Peer]\nPublicKey = {PUB_B64[0]}\n{line}\n"


K, P = SECRET_KEY_B64, SECRET_PSK_B64
SECRET_LINES = [
    ("key without ' = '", in_interface(f"PrivateKey {K}"), 2),
    ("key after a colon", in_interface(f"PrivateKey: {K}"), 2),
    ("key after a tab", in_interface(f"PrivateKey\t{K}"), 2),
    ("bare key line", in_interface(K), 2),
    ("bare key without its =", in_interface(K[:-1]), 2),
    ("key as a section", in_interface(f"[{K}]"), 2),
    ("key in a broken header", in_interface(f"[Interface {K}"), 2),
    ("key before a second =", in_interface(f"{K} = PrivateKey"), 2),
    ("key outside a section", f"PrivateKey: {K}\n[Interface]\n", 1),
    ("private key truncated", in_interface(f"PrivateKey = {K[:-2]}="), 2),
    ("private key bad char", in_interface(f"PrivateKey = {K[:30]}*{K[31:]}"), 2),
    ("private key too long", in_interface(f"PrivateKey = {K}{K}"), 2),
    ("private key quoted", in_interface(f"PrivateKey = '{K}'"), 2),
    ("private key twice", in_interface(f"PrivateKey = {K}\nPrivateKey = {K}"), 3),
    ("psk with leading =", in_peer(f"=PresharedKey = {P}"), 5),
    ("psk without ' = '", in_peer(f"PresharedKey {P}"), 5),
    ("psk after a colon", in_peer(f"PresharedKey: {P}"), 5),
    ("bare psk line", in_peer(P), 5),
    ("psk misspelt key", in_peer(f"PreSharedKy = {P}"), 5),
    ("psk truncated", in_peer(f"PresharedKey = {P[:-2]}="), 5),
    ("psk unknown key", in_peer(f"Psk = {P}"), 5),
]


@pytest.mark.parametrize("text, line", [case[1:] for case in SECRET_LINES],
                         ids=[case[0] for case in SECRET_LINES])
def test_errors_never_quote_key_material(text, line):
    with pytest.raises(ConfigError) as err:
        parse(text, PATH)
    assert str(err.value).startswith(f"{PATH}:{line}: ")
    for each in err.value.errors:          # every error, not only the one shown
        assert_no_secret(str(each))


@pytest.mark.parametrize("key_line", ["ListenPort = {}", "MTU = {}", "FwMark = {}", "Table = {}",
                                      "Workers = {}", "PeerMark = {}",
                                      "Metrics = 127.0.0.1:{}", "Metrics = {}"])
@pytest.mark.parametrize("digits", [4301, 100_000])
def test_huge_interface_numbers_are_config_errors(key_line, digits):
    # int() refuses over 4300 digits with its own ValueError, which escaped.
    with pytest.raises(ConfigError) as err:
        parse(iface(key_line.format("9" * digits)), PATH)
    message = str(err.value)
    assert message.startswith(f"{PATH}:3: {key_line.split()[0]}: ")
    assert len(message) < 300, "a huge value is cut short in the message"


@pytest.mark.parametrize("key_line", ["PersistentKeepalive = {}", "Endpoint = 192.0.2.2:{}",
                                      "Endpoint = [2001:db8::2]:{}"])
def test_huge_peer_numbers_are_config_errors(key_line):
    with pytest.raises(ConfigError) as err:
        parse(peer(key_line.format("1" + "0" * 5000)), PATH)
    assert str(err.value).startswith(f"{PATH}:5: {key_line.split()[0]}: ")
    assert "out of range" in str(err.value)


def test_leading_zeros_do_not_count_as_digits():
    i = parse(iface("ListenPort = " + "0" * 5000 + "51820")).interface
    assert i.listen_port == 51820


def test_quoted_values_are_one_line():
    # split("\n") leaves \r, \v and U+2028 in a value; a terminal breaks lines there.
    with pytest.raises(ConfigError) as err:
        parse(iface("MTU = 1\r2\u2028\x0b3"), PATH)
    assert str(err.value).isprintable()
    assert "'1\\r2\\u2028\\x0b3'" in str(err.value)


def test_load_refuses_an_endless_file(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 1000)
    path = tmp_path / "big.conf"
    path.write_text(HEAD + "# padding\n" * 200)
    with pytest.raises(ConfigError, match="larger than"):
        config.load(path)


def test_parse_metrics():
    assert config.parse_metrics("[::1]:9586") == "[::1]:9586"
    for bad in ("9586", ":99999", "[::1", ":" + "9" * 5000, "localhost"):
        with pytest.raises(ValueError):
            config.parse_metrics(bad)


def test_valid_values_near_the_limits():
    text = iface("MTU = 576\nListenPort = 65535\nWorkers = 255\nTable = 4294967295\n"
                 "Metrics = :9586\nFwMark = 0xffffffff")
    i = parse(text).interface
    assert (i.mtu, i.listen_port, i.workers, i.table, i.metrics, i.fwmark) == \
        (576, 65535, 255, "4294967295", ":9586", 0xFFFFFFFF)
    assert parse(iface("MTU = 1280\nAddress = 2001:db8::1/64")).interface.mtu == 1280


def test_every_error_is_collected_and_the_first_reported():
    text = iface("ListenPort = x\nMTU = 1\n[Peer]\nEndpoint = nope")
    with pytest.raises(ConfigError) as err:
        parse(text, PATH)
    e = err.value
    assert (e.line, e.key) == (3, "ListenPort")
    assert [(x.line, x.key) for x in e.errors] == [
        (3, "ListenPort"), (4, "MTU"), (6, "Endpoint"), (5, "PublicKey")]


def test_misspelt_key_is_reported_before_the_missing_one():
    with pytest.raises(ConfigError) as err:
        parse("[Interface]\nPrivatKey = x\n", PATH)
    assert (err.value.line, err.value.key) == (2, "PrivatKey")
    assert "did you mean PrivateKey?" in str(err.value)
    assert [x.key for x in err.value.errors] == ["PrivatKey", "PrivateKey"]


def test_error_str_leaves_out_unknown_parts():
    assert str(ConfigError("f.conf", 3, "MTU", "bad")) == "f.conf:3: MTU: bad"
    assert str(ConfigError("f.conf", 3, None, "bad")) == "f.conf:3: bad"
    assert str(ConfigError("f.conf", None, "MTU", "bad")) == "f.conf: MTU: bad"
    assert str(ConfigError("f.conf", None, None, "bad")) == "f.conf: bad"


# ---------------------------------------------------------------- load

def test_load(tmp_path):
    path = tmp_path / "wgtest0.conf"
    path.write_text(FULL)
    cfg = config.load(path)
    assert cfg.path == str(path)
    assert cfg.interface.listen_port == 51820 and len(cfg.peers) == 3


def test_load_error_names_the_file(tmp_path):
    path = tmp_path / "wgtest0.conf"
    path.write_text(iface("MTU = 1"))
    with pytest.raises(ConfigError, match=f"^{path}:3: MTU: "):
        config.load(str(path))


def test_load_missing_file(tmp_path):
    path = tmp_path / "nosuch.conf"
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert err.value.path == str(path) and err.value.line is None
    assert str(err.value).startswith(f"{path}: ")
    assert "No such file" in str(err.value)


def test_load_not_utf8(tmp_path):
    path = tmp_path / "wgtest0.conf"
    path.write_bytes(HEAD.encode() + b"DNS = \xff\n")
    with pytest.raises(ConfigError, match=f"^{path}:3: not valid UTF-8"):
        config.load(path)


def test_addresses_are_interfaces_and_allowed_ips_networks():
    cfg = parse(FULL)
    assert all(isinstance(a, (ipaddress.IPv4Interface, ipaddress.IPv6Interface))
               for a in cfg.interface.addresses)
    assert all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network))
               for p in cfg.peers for n in p.allowed_ips)


@pytest.mark.parametrize("lines, mask", [
    ("", 0xFFFF0000),                                   # the default
    ("PeerMark = 0xff00", 0xFF00),
    ("PeerMark = 65280", 0xFF00),                       # decimal
    ("PeerMark = 0xFFFFFFFF", 0xFFFFFFFF),
    ("PeerMark = 0x000ff000", 0xFF000),
    # FwMark shares bits, but no policy marks packets: harmless, accepted
    ("FwMark = 0xffffffff\nSourcePolicy = fib", 0xFFFF0000),
    # nftables with FwMark clear of the mask
    ("SourcePolicy = nftables\nFwMark = 0xca6c", 0xFFFF0000),
    ("SourcePolicy = nftables\nFwMark = 0xff000000\nPeerMark = 0xff0000", 0xFF0000),
])
def test_peer_mark_values(lines, mask):
    cfg = parse(iface(lines) if lines else HEAD)
    assert cfg.interface.peer_mark == mask
    text = config.format_config(cfg)
    assert ("PeerMark" in text) == (mask != config.PEER_MARK_DEFAULT)
    assert parse(text).interface.peer_mark == mask


@pytest.mark.parametrize("mask, error", [
    (0xFF000000, None), (0xFF, None), (0xFFFFFFFF, None), (0x1FE, None),
    (0, "nonzero"), (0x1_0000_0000, "nonzero"), (0x7F, "needs at least 8"), (0xF0F0, "contiguous"),
])
def test_peer_mark_error(mask, error):
    problem = config.peer_mark_error(mask)
    assert problem is None if error is None else error in problem


def test_peer_mark_conflict():
    assert config.peer_mark_conflict(0xFF000000, 0xCA6C) is None
    assert config.peer_mark_conflict(0xFF000000, 0) is None
    assert "0x1000000" in config.peer_mark_conflict(0xFF000000, 0x01000001)


def test_peer_spread_is_off_unless_asked_and_round_trips():
    assert parse(HEAD).interface.peer_spread is False
    cfg = parse(iface("PeerSpread = true"))
    assert cfg.interface.peer_spread is True
    assert "PeerSpread = true" in config.format_config(cfg)
    with pytest.raises(ConfigError) as err:
        parse(iface("PeerSpread = yes"))
    assert "PeerSpread" in str(err.value) and "'true' or 'false'" in str(err.value)
