"""The timer heap: deadlines fire on time, and re-arming a timer does not
grow the heap (one entry per timer, however often it is re-armed)."""

from memnet import ipv4_packet, pair
from wgebpf.wireguard.scheduler import FakeClock, Scheduler


def make():
    clock = FakeClock(start=0.0)
    return clock, Scheduler(clock)


def fire_log(scheduler, clock, names):
    """Timers that append (name, time fired) to a shared log."""
    log = []
    timers = {name: scheduler.timer(lambda name=name: log.append((name, clock.now)))
              for name in names}
    return log, timers


def run_until(scheduler, clock, end, step=0.5):
    while clock.now < end:
        clock.advance(step)
        scheduler.run_due()


def test_timer_fires_at_its_deadline_once():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["t"])
    timers["t"].mod(3)
    assert scheduler.next_deadline() == 3
    run_until(scheduler, clock, 10)
    assert log == [("t", 3.0)]
    assert not timers["t"].pending and scheduler.next_deadline() is None


def test_rearming_later_moves_the_deadline():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["t"])
    timers["t"].mod(2)
    clock.advance(1)
    timers["t"].mod(4)                  # now due at 5, not 2
    assert scheduler.next_deadline() == 4
    run_until(scheduler, clock, 10)
    assert log == [("t", 5.0)]


def test_rearming_earlier_moves_the_deadline():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["t"])
    timers["t"].mod(8)
    timers["t"].mod(2)
    assert scheduler.next_deadline() == 2
    run_until(scheduler, clock, 10)
    assert log == [("t", 2.0)]


def test_cancelled_timer_does_not_fire_and_can_be_rearmed():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["a", "b"])
    timers["a"].mod(2)
    timers["b"].mod(3)
    timers["a"].cancel()
    assert scheduler.next_deadline() == 3
    run_until(scheduler, clock, 4)
    timers["a"].mod(1)
    run_until(scheduler, clock, 10)
    assert log == [("b", 3.0), ("a", 5.0)]


def test_timers_fire_in_deadline_order():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["a", "b", "c"])
    timers["c"].mod(3)
    timers["a"].mod(9)
    timers["b"].mod(2)
    timers["a"].mod(1)
    clock.advance(10)
    assert scheduler.run_due() == 3
    assert [name for name, _ in log] == ["a", "b", "c"]


def test_callback_may_rearm_its_own_timer():
    clock, scheduler = make()
    log = []

    def tick():
        log.append(clock.now)
        if len(log) < 3:
            timer.mod(2)
    timer = scheduler.timer(tick)
    timer.mod(2)
    run_until(scheduler, clock, 20)
    assert log == [2.0, 4.0, 6.0]


def test_heap_stays_small_under_constant_rearming():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["t"])
    for _ in range(100_000):
        clock.advance(0.001)
        timers["t"].mod(25)
    assert len(scheduler._heap) <= 2
    run_until(scheduler, clock, clock.now + 30, step=0.25)
    assert len(log) == 1 and abs(log[0][1] - (100 + 25)) < 0.3


def test_heap_stays_small_when_moved_earlier_again_and_again():
    clock, scheduler = make()
    log, timers = fire_log(scheduler, clock, ["t"])
    for delay in range(100_000, 0, -1):
        timers["t"].mod(delay)
    assert len(scheduler._heap) <= 200
    run_until(scheduler, clock, 3)
    assert log == [("t", 1.0)]


def test_persistent_keepalive_traffic_does_not_grow_the_heap():
    """Every traversal re-arms persistent_keepalive: 100,000 of them must not
    leave 100,000 heap entries, and the keepalive still goes out on time."""
    clock, network, a, b = pair()
    a.device.on_tun_packet(ipv4_packet("198.51.100.1", "198.51.100.2"))
    network.pump()
    peer = a.device.peers[b.public_key]
    peer.set_persistent_keepalive(25)
    for _ in range(80):                     # 20 s: B's passive keepalive settles A
        clock.advance(0.25)
        a.device.scheduler.run_due()
        b.device.scheduler.run_due()
        network.pump()
    for _ in range(100_000):
        peer.timers.any_authenticated_packet_traversal()
    assert len(a.device.scheduler._heap) <= 10          # 5 timers per peer
    mark = len(network.sent_log)
    clock.advance(24.5)
    a.device.scheduler.run_due()
    assert len(network.sent_log) == mark                  # not yet
    clock.advance(0.6)
    a.device.scheduler.run_due()
    sent = [d for d, s, t in network.sent_log[mark:] if s == a.conn.address]
    assert [len(d) for d in sent] == [32]                 # one keepalive
