"""Two whole devices over in-memory fakes: handshake, data, timers, replay,
cookies, roaming. No root, no kernel, no sleeping (FakeClock)."""


from memnet import ipv4_packet, ipv6_packet, pair
from wgebpf.wireguard.messages import (KEEPALIVE_TIMEOUT, MESSAGE_DATA, MESSAGE_HANDSHAKE_COOKIE,
                             MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE,
                             REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME,
                             REKEY_TIMEOUT, message_type)


def types_sent(network, since: int = 0):
    return [message_type(item[0]) for item in network.sent_log[since:]]


def run(clock, network, a, b, seconds: float, step: float = 0.25):
    """Let time pass, firing both devices' timers and delivering what they send."""
    end = clock.now + seconds
    while clock.now < end:
        clock.advance(step)
        a.device.scheduler.run_due()
        b.device.scheduler.run_due()
        network.pump()


def test_handshake_and_data_both_ways():
    clock, network, a, b = pair()
    packet = ipv4_packet("198.51.100.1", "198.51.100.2")
    a.device.on_tun_packet(packet)
    network.pump()
    # initiation, response, then the staged packet confirms the session
    assert types_sent(network)[:3] == [MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE,
                                       MESSAGE_DATA]
    assert b.tun.received == [packet]
    reply = ipv6_packet("2001:db8:100::2", "2001:db8:100::1")
    b.device.on_tun_packet(reply)
    network.pump()
    assert a.tun.received == [reply]
    peer_a = a.device.peers[b.public_key]
    peer_b = b.device.peers[a.public_key]
    assert peer_a.last_handshake_time > 0 and peer_b.last_handshake_time > 0
    assert peer_b.endpoint == ("192.0.2.1", 51820)    # learnt from the initiation
    assert peer_a.tx_bytes > 0 and peer_b.rx_bytes == peer_a.tx_bytes


def test_preshared_key_must_match():
    clock, network, a, b = pair(psk=b"\x01" * 32)
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    assert len(b.tun.received) == 1
    clock2, network2, c, d = pair(psk=b"\x01" * 32)
    d.device.peers[c.public_key].set_preshared_key(b"\x02" * 32)
    c.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network2.pump()
    assert d.tun.received == []
    assert c.device.drops["handshake_failed"] == 1       # response does not authenticate


def test_unknown_peer_key_gets_no_response():
    clock, network, a, b = pair()
    b.device.remove_peer(a.public_key)
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    assert types_sent(network) == [MESSAGE_HANDSHAKE_INITIATION]
    assert b.device.drops["handshake_failed"] == 1


def test_replayed_data_is_dropped_and_initiation_replay_rejected():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    initiation = next(d for d, s, t in network.sent_log if message_type(d) == MESSAGE_HANDSHAKE_INITIATION)
    data = next(d for d, s, t in network.sent_log if message_type(d) == MESSAGE_DATA)
    b.device.on_datagram(data, ("192.0.2.1", 51820))
    assert b.device.drops["replay"] == 1 and len(b.tun.received) == 1
    clock.advance(1)
    b.device.on_datagram(initiation, ("192.0.2.1", 51820))
    assert b.device.drops["handshake_failed"] == 1     # timestamp not newer


def test_tampered_data_fails_authentication_without_moving_window():
    clock, network, a, b = pair()
    network.drop_filter = lambda d, s, t: message_type(d) == MESSAGE_DATA and t == b.conn.address
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    data = bytearray(next(d for d, s, t in network.sent_log if message_type(d) == MESSAGE_DATA))
    good = bytes(data)
    data[-1] ^= 1
    b.device.on_datagram(bytes(data), a.conn.address)
    assert b.device.drops["auth_failed"] == 1
    b.device.on_datagram(good, a.conn.address)      # same counter still accepted
    assert len(b.tun.received) == 1


def test_passive_keepalive_after_keepalive_timeout():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    mark = len(network.sent_log)
    run(clock, network, a, b, KEEPALIVE_TIMEOUT + 1)
    sent_by_b = [d for d, s, t in network.sent_log[mark:] if s == b.conn.address]
    assert sent_by_b and all(len(d) == 32 for d in sent_by_b)   # empty data messages


def test_persistent_keepalive():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    a.device.peers[b.public_key].set_persistent_keepalive(3)
    mark = len(network.sent_log)
    run(clock, network, a, b, 10)
    keepalives = [d for d, s, t in network.sent_log[mark:] if s == a.conn.address and len(d) == 32]
    assert len(keepalives) >= 3


def test_rekey_after_time_by_initiator():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    first = a.device.peers[b.public_key].keypairs.current
    clock.advance(REKEY_AFTER_TIME + 1)
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    assert types_sent(network).count(MESSAGE_HANDSHAKE_INITIATION) == 2
    assert a.device.peers[b.public_key].keypairs.current is not first
    assert len(b.tun.received) == 2


def test_retransmit_then_give_up_and_zero_keys():
    clock, network, a, b = pair()
    network.drop_filter = lambda d, s, t: True           # the network is down
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    run(clock, network, a, b, REKEY_ATTEMPT_TIME + 6 * REKEY_TIMEOUT, step=0.5)
    initiations = types_sent(network).count(MESSAGE_HANDSHAKE_INITIATION)
    # the first plus MAX_TIMER_HANDSHAKES + 1 retries, one per REKEY_TIMEOUT (+jitter)
    assert initiations == 20
    peer = a.device.peers[b.public_key]
    assert not peer.staged and peer.stats.handshakes_failed == 1
    assert peer.timers.zero_key_material.pending


def test_keys_zeroed_after_three_reject_after_time():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    peer = a.device.peers[b.public_key]
    assert peer.keypairs.current is not None
    clock.advance(REJECT_AFTER_TIME * 3 + 1)
    a.device.scheduler.run_due()
    assert peer.keypairs.current is None and peer.keypairs.previous is None
    assert not [i for i, (p, o) in a.device.indices.items() if p is peer]


def test_cookie_round_trip_under_load():
    clock, network, a, b = pair()
    b.device.force_under_load = True
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    assert types_sent(network) == [MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_COOKIE]
    assert a.device.peers[b.public_key].cookie.cookie          # stored
    run(clock, network, a, b, REKEY_TIMEOUT + 1)               # retry carries mac2
    assert MESSAGE_HANDSHAKE_RESPONSE in types_sent(network)
    assert len(b.tun.received) == 1


def test_roaming_follows_authenticated_source():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    a.conn.move(("203.0.113.7", 40000))
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    assert b.device.peers[a.public_key].endpoint == ("203.0.113.7", 40000)
    b.device.on_tun_packet(ipv4_packet("198.51.100.2", "198.51.100.1"))
    network.pump()
    assert len(a.tun.received) == 1


def test_no_peer_is_dropped_with_icmp_unreachable():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "203.0.113.50"))
    assert a.device.drops["no_peer"] == 1 and network.sent_log == []
    (reply,) = a.tun.received
    assert reply[9] == 1 and reply[20] == 3          # ICMP destination unreachable
    assert reply[16:20] == bytes([198, 51, 100, 1])  # back to the sender
    a.device.on_tun_packet(ipv6_packet("2001:db8:100::1", "2001:db8:999::1"))
    reply6 = a.tun.received[1]
    assert reply6[6] == 58 and reply6[40] == 1       # ICMPv6 destination unreachable


def test_malformed_datagrams_are_counted_and_do_not_disturb():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    for junk in (b"", b"\x01", b"\x04\x00\x00\x00" + bytes(10), b"\x01\x00\x00\x00" + bytes(100),
                 b"\x09\x00\x00\x00" + bytes(60), b"\x04\x00\x00\x00" + bytes(40)):
        b.device.on_datagram(junk, ("203.0.113.66", 1))
    assert b.device.drops["malformed"] == 5 and b.device.drops["unknown_index"] == 1
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    assert len(b.tun.received) == 2


def test_simultaneous_initiations_converge():
    clock, network, a, b = pair()
    b.device.peers[a.public_key].set_endpoint(a.conn.address)
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    b.device.on_tun_packet(ipv4_packet("198.51.100.2", "198.51.100.1"))
    network.pump()
    # Both consumed the other's initiation: neither response matches. The
    # retransmit jitter (up to 1/3 s) breaks the tie; step finely enough to see it.
    run(clock, network, a, b, 3 * REKEY_TIMEOUT, step=0.01)
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    b.device.on_tun_packet(ipv4_packet("198.51.100.2", "198.51.100.1"))
    network.pump()
    assert len(a.tun.received) >= 1 and len(b.tun.received) >= 1


def test_multicast_without_peer_is_dropped_silently():
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv6_packet("fe80::1", "ff02::16"))
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "224.0.0.22"))
    assert a.tun.received == [] and a.device.drops["multicast"] == 2
    assert a.device.drops["no_peer"] == 0


def test_responder_with_waiting_data_sends_no_initiation_of_its_own():
    """A response counts as a handshake sent (kernel, wireguard-go): data the
    responder has for the peer waits for the session being confirmed instead
    of starting a second handshake right behind the response."""
    clock, network, a, b = pair()
    to_b = ipv4_packet("198.51.100.1", "198.51.100.2")
    to_a = ipv4_packet("198.51.100.2", "198.51.100.1")
    a.device.on_tun_packet(to_b)
    network.pump(limit=1)                   # B has the initiation, its response is in flight
    b.device.on_tun_packet(to_a)            # B's data waits for the session
    network.pump()
    run(clock, network, a, b, 2 * REKEY_TIMEOUT)
    handshakes = [t for t in types_sent(network)
                  if t in (MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE)]
    assert handshakes == [MESSAGE_HANDSHAKE_INITIATION, MESSAGE_HANDSHAKE_RESPONSE]
    assert a.tun.received == [to_a] and b.tun.received == [to_b]
