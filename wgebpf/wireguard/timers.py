"""Per-peer protocol timers, driven by event hooks (whitepaper section 6).

Every timer, what arms it and what it does when it fires:

  retransmit_handshake  armed when an initiation is sent, for
                        REKEY_TIMEOUT + jitter; fires: send another initiation,
                        or after MAX_TIMER_HANDSHAKES tries (REKEY_ATTEMPT_TIME)
                        give up, drop staged packets and arm zero_key_material.
  send_keepalive        armed when data (not a keepalive) is received, for
                        KEEPALIVE_TIMEOUT, unless we send something first;
                        fires: send a keepalive (the "passive" keepalive).
  new_handshake         armed when data is sent, for KEEPALIVE_TIMEOUT +
                        REKEY_TIMEOUT + jitter, cancelled by any authenticated
                        packet received; fires: we sent and heard nothing back,
                        so start a new handshake.
  zero_key_material     armed when a session is derived, for
                        3 * REJECT_AFTER_TIME; fires: erase every key.
  persistent_keepalive  re-armed by every authenticated packet sent or
                        received, for the configured interval; fires: send a
                        keepalive (for NAT and stateful firewalls).

The hooks are named for the event (data_sent, handshake_complete, ...), so
send.py and receive.py say what happened and this file decides what follows.
"""

import os
import random
import weakref
from dataclasses import dataclass

from .seams import TimerActions
from .messages import (KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES, REJECT_AFTER_TIME,
                       REKEY_AFTER_TIME, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX)


@dataclass
class Timing:
    """Protocol durations; only tests shorten them (WGEBPF_TEST_* variables)."""

    rekey_after_time: float = REKEY_AFTER_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT

    @classmethod
    def from_environment(cls) -> "Timing":
        timing = cls()
        override = os.environ.get("WGEBPF_TEST_REKEY_AFTER_TIME")
        if override:
            timing.rekey_after_time = float(override)
        return timing


def _stopped() -> None:
    """What a stopped peer's timers would run, if anything still fired them."""


class Timers:
    def __init__(self, peer, scheduler, actions: TimerActions, timing: Timing,
                 rng=random.random):
        """`actions` (seams.TimerActions) is what expiring timers do: the
        device's own in one process, a worker's in a worker."""
        self.peer = peer
        self.actions = actions
        self.timing = timing
        self.rng = rng
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.enabled = True
        self.retransmit_handshake = scheduler.timer(self._expired_retransmit_handshake)
        self.send_keepalive = scheduler.timer(self._expired_send_keepalive)
        self.new_handshake = scheduler.timer(self._expired_new_handshake)
        self.zero_key_material = scheduler.timer(self._expired_zero_key_material)
        self.persistent_keepalive = scheduler.timer(self._expired_persistent_keepalive)

    def _jitter(self) -> float:
        return self.rng() * REKEY_TIMEOUT_JITTER_MAX

    def _all(self):
        return (self.retransmit_handshake, self.send_keepalive, self.new_handshake,
                self.zero_key_material, self.persistent_keepalive)

    def stop(self) -> None:
        """For good (the peer is removed): no heap entry outlives this, and
        no reference cycle either. The timers' callbacks are bound methods
        of this object and it points back at its peer, so a removed peer
        would wait for Python's cyclic collector, which runs seldom once
        many objects live: churning 4,000 peers through `wg set` left some
        20 MB behind. With the cycles cut, a removed peer is freed when its
        last reference goes."""
        self.enabled = False
        timers = self._all()
        timers[0].scheduler.discard(timers)
        for timer in timers:
            timer.callback = _stopped
        self.peer = weakref.proxy(self.peer)

    # --- what fires -----------------------------------------------------------

    def _expired_retransmit_handshake(self) -> None:
        if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
            self.send_keepalive.cancel()
            self.actions.handshake_gave_up(self.peer)
            if not self.zero_key_material.pending:
                self.zero_key_material.mod(REJECT_AFTER_TIME * 3)
            return
        self.handshake_attempts += 1
        self.actions.send_handshake_initiation(self.peer, retry=True)

    def _expired_send_keepalive(self) -> None:
        self.actions.send_keepalive(self.peer)
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.send_keepalive.mod(self.timing.keepalive_timeout)

    def _expired_new_handshake(self) -> None:
        self.actions.send_handshake_initiation(self.peer, retry=False)

    def _expired_zero_key_material(self) -> None:
        self.actions.zero_key_material(self.peer)

    def _expired_persistent_keepalive(self) -> None:
        if self.peer.persistent_keepalive_interval:
            self.actions.send_keepalive(self.peer)

    # --- event hooks ------------------------------------------------------------

    def data_sent(self) -> None:
        if self.enabled and not self.new_handshake.pending:
            self.new_handshake.mod(self.timing.keepalive_timeout + self.timing.rekey_timeout
                                   + self._jitter())

    def data_received(self) -> None:
        if not self.enabled:
            return
        if not self.send_keepalive.pending:
            self.send_keepalive.mod(self.timing.keepalive_timeout)
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self) -> None:
        self.send_keepalive.cancel()

    def any_authenticated_packet_received(self) -> None:
        self.new_handshake.cancel()

    def handshake_initiated(self) -> None:
        if self.enabled:
            self.retransmit_handshake.mod(self.timing.rekey_timeout + self._jitter())

    def handshake_complete(self) -> None:
        self.retransmit_handshake.cancel()
        self.handshake_attempts = 0
        self.peer.last_handshake_time = self.peer.clock.wall()

    def session_derived(self) -> None:
        if self.enabled:
            self.zero_key_material.mod(REJECT_AFTER_TIME * 3)

    def any_authenticated_packet_traversal(self) -> None:
        if self.enabled and self.peer.persistent_keepalive_interval:
            self.persistent_keepalive.mod(self.peer.persistent_keepalive_interval)
