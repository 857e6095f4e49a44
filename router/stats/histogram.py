"""A histogram cheap enough for the hot path: one bisect and two additions per observation, no
lock (the router's event loop is its only writer; /metrics reads it in the same loop)."""

from __future__ import annotations

from bisect import bisect_left


class FastHistogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("buckets must be strictly increasing")
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= bound) pairs, Prometheus style, ending with +Inf."""
        out = []
        total = 0
        for bound, n in zip((*map(repr, map(float, self.buckets)), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
