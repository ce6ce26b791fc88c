"""`wgebpf set` (wgebpf-set=1 on the UAPI socket), unit tier."""

import errno

import pytest

from memnet import pair
from wgebpf.control import settings


def test_interface_and_peer_source_policy():
    clock, network, a, b = pair()
    peer = a.device.peers[b.public_key]
    settings.apply(a.device, ["source_policy=fib", f"public_key={b.public_key.hex()}",
                              "source_policy=off"])
    assert a.device.source_policy == "fib" and peer.source_policy == "off"
    settings.apply(a.device, [f"public_key={b.public_key.hex()}", "source_policy=default"])
    assert peer.source_policy is None


@pytest.mark.parametrize("lines, code", [
    (["source_policy=sideways"], errno.EINVAL),
    (["source_policy=default"], errno.EINVAL),          # only a peer can follow the default
    (["public_key=" + "00" * 32, "source_policy=off"], errno.ENOENT),
    (["mtu=1280"], errno.EINVAL),
    (["source_policy"], errno.EPROTO),
])
def test_bad_settings_are_refused_and_nothing_applies(lines, code):
    clock, network, a, b = pair()
    with pytest.raises(settings.SettingError) as err:
        settings.apply(a.device, ["source_policy=off"] + lines)
    assert err.value.errno == code
    assert a.device.source_policy == "allowedips"     # the good first line did not apply either


def test_handler_answers_text_and_errno():
    clock, network, a, b = pair()
    handle = settings.handler(a.device)
    assert handle(["source_policy=nftables"]) == ("", 0)
    text, code = handle(["source_policy=bogus"])
    assert code == errno.EINVAL and "source_policy must be one of" in text


def test_nftables_refused_while_peer_mark_and_fwmark_share_bits():
    clock, network, a, b = pair()
    a.device.peer_mark = 0xFF000000
    a.device.set_fwmark(0x01000000)           # fine while nothing uses nftables
    with pytest.raises(settings.SettingError) as err:
        settings.apply(a.device, ["source_policy=nftables"])
    assert err.value.errno == errno.EINVAL and "PeerMark" in str(err.value)
    assert a.device.source_policy == "allowedips"
    a.device.set_fwmark(0x1)
    settings.apply(a.device, ["source_policy=nftables"])
    with pytest.raises(OSError):               # and wg set fwmark cannot clash later
        a.device.set_fwmark(0x02000000)
    assert a.device.fwmark == 0x1


# ---------------------------------------------------------------- parse_args (the CLI words)

from wgebpf.wireguard import keys  # noqa: E402

SET_KEY = keys.encode(keys.generate_private_key())


def test_parse_args_builds_uapi_lines():
    pub = keys.public_key(bytes(range(32)))
    assert settings.parse_args(["source-policy", "fib"]) == ["source_policy=fib"]
    assert settings.parse_args(["peer", keys.encode(pub), "source-policy", "default"]) == \
        [f"public_key={pub.hex()}", "source_policy=default"]


@pytest.mark.parametrize("words, says", [
    ([], "nothing to set"),
    (["source-policy"], "needs a value"),
    (["mtu", "1280"], "unknown setting 'mtu'"),
    (["source-policy", "sideways"], "must be one of"),
    (["source-policy", "default"], "must be one of"),        # default needs a peer
    (["source-policy", "fib\npublic_key=" + "00" * 32], "must be one of"),
    (["peer", "hunter2"], "peer:"),
    (["peer", SET_KEY[:-1] + "A"], "peer:"),
    ([SET_KEY, "off"], "unknown setting"),
    ([SET_KEY[:12], "off"], "unknown setting"),
])
def test_parse_args_refuses_without_echoing_keys(words, says):
    with pytest.raises(settings.SettingError) as err:
        settings.parse_args(words)
    assert err.value.errno == errno.EINVAL and says in str(err.value)
    assert "\n" not in str(err.value)
    assert not any(SET_KEY[i:i + 8] in str(err.value) for i in range(len(SET_KEY) - 7))
