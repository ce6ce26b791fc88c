"""Only an AEAD tag that does not verify counts as an authentication
failure; any other exception while decrypting is a bug and is not hidden
as one (wgebpf/wireguard/receive.py, handle_data)."""

import pytest

from memnet import ipv4_packet, pair
from wgebpf.wireguard.messages import MESSAGE_DATA, message_type


def _established_and_one_data_message():
    clock, network, a, b = pair()
    network.drop_filter = lambda d, s, t: message_type(d) == MESSAGE_DATA and t == b.conn.address
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    data = next(d for d, s, t in network.sent_log if message_type(d) == MESSAGE_DATA)
    return a, b, data


class BrokenAead:
    def decrypt(self, nonce, data, associated_data):
        raise RuntimeError("a bug, not a forgery")


def test_bad_tag_is_auth_failed():
    a, b, data = _established_and_one_data_message()
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    b.device.on_datagram(tampered, a.conn.address)
    assert b.device.drops["auth_failed"] == 1
    assert b.tun.received == []


def test_other_decrypt_errors_are_not_counted_as_auth_failures(monkeypatch):
    a, b, data = _established_and_one_data_message()
    [peer] = b.device.peers.values()
    keypair = peer.keypairs.current or peer.keypairs.next
    assert keypair is not None
    monkeypatch.setattr(keypair, "receiving", BrokenAead())
    with pytest.raises(RuntimeError, match="a bug"):
        b.device.on_datagram(data, a.conn.address)
    assert b.device.drops["auth_failed"] == 0
