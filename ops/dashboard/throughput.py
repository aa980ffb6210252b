"""A throughput estimate from successive status reads, with no extra Redis calls.

Entries a stage has finished (acked or dead-lettered) are ``length - lag - pending``
of its streams. Two reads some seconds apart give a rate. Trimming the stream makes
that count drop: the window then starts again rather than report a negative rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Throughput:
    """Entries finished per second per stage, over the last ``window_s`` seconds."""

    def __init__(
        self,
        window_s: float = 10.0,
        min_span_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.clock = clock
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, stage: str, done: int) -> float | None:
        """Record ``done`` now; the rate since the oldest sample in the window, if any."""
        now = self.clock()
        samples = self._samples.setdefault(stage, deque(maxlen=512))
        if samples and done < samples[-1][1]:  # trimmed or reset: start again
            samples.clear()
        samples.append((now, done))
        while len(samples) > 2 and now - samples[1][0] >= self.window_s:
            samples.popleft()
        t0, done0 = samples[0]
        span = now - t0
        if span < self.min_span_s:
            return None
        return (done - done0) / span
