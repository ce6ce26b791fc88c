"""A cumulative histogram kept by the data structures themselves, so that
metrics (read at scrape time) and `wgebpf status` see the same numbers and
nothing on the protocol path depends on prometheus-client."""

import bisect

# Seconds: a handshake on a LAN takes about a millisecond; retries come every
# REKEY_TIMEOUT (5 s) and give up after REKEY_ATTEMPT_TIME (90 s).
HANDSHAKE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                              1.0, 2.5, 5.0, 10.0, 30.0, 90.0)


class Histogram:
    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)      # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, observations <= bound), ...] ending with +Inf."""
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append((bound, running))
        return out

    def snapshot(self) -> dict:
        return {"buckets": [[("+Inf" if b == float("inf") else b), c] for b, c in self.cumulative()],
                "sum": self.sum, "count": self.count}
