"""Items done over time, for the throughput plots: samples of (perf_counter time, items).

While the producer sends, this process's main thread is busy sending and polls nothing,
so a :class:`Sampler` thread reads the counter meanwhile (with a connection of its own
for Postgres counts); once everything is sent, the scenario's own polling appends its
readings to the same list. :func:`relative` turns the samples into seconds since the
clock started.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import database

#: (perf_counter time, items done) as read.
Samples = list[tuple[float, int]]


class Sampler:
    """Reads ``read()`` every ``interval`` seconds in a thread, for the block.

    A reading that fails (a server restarting) ends the sampling quietly: the samples
    are a picture of the run, not one of its figures.
    """

    def __init__(self, read: Callable[[], int] | None, interval: float, samples: Samples):
        self.read = read
        self.interval = interval
        self.samples = samples
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        if self.read is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.read is not None:
            self._stop.set()
            self._thread.join()

    def _run(self) -> None:
        assert self.read is not None
        while True:
            try:
                value = self.read()
            except Exception:
                return
            self.samples.append((time.perf_counter(), value))
            if self._stop.wait(self.interval):
                return


@contextmanager
def row_counter(libpq_url: str, priority: str | None = None) -> Iterator[Callable[[], int]]:
    """``count(*)`` of the notifications over a connection of its own (for a thread)."""
    with database.connect(libpq_url) as conn:
        yield lambda: database.count_rows(conn, priority)


def relative(samples: Samples, start: float) -> list[tuple[float, int]]:
    """Seconds since ``start`` (rounded to the ms) and items, in time order."""
    return [(round(at - start, 3), int(n)) for at, n in sorted(samples) if at >= start]


def rates(series: list[Any], window: float = 0.5) -> tuple[list[float], list[float]]:
    """Items per second over ``window``-second steps of a cumulative series: the mid-time
    of each step and its rate. Steps are taken between samples at least ``window`` apart,
    so a poll that happens to land just after a COPY's commit does not read as a spike."""
    times, values = [], []
    if not series:
        return times, values
    last_t, last_n = series[0]
    for t, n in series[1:]:
        if t - last_t >= window:
            times.append((t + last_t) / 2)
            values.append((n - last_n) / (t - last_t))
            last_t, last_n = t, n
    return times, values


def percentile(values: list[float], share: float) -> float:
    """The ``share`` percentile of sorted ``values``, interpolated between the two nearest
    ranks as Postgres's ``percentile_cont`` does."""
    if not values:
        raise ValueError("no values")
    position = share * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def summary(values: list[float]) -> dict[str, float | int | None]:
    """count, p50, p99 and max of sorted ``values`` (None where there are none)."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": len(values), "p50": round(percentile(values, 0.5), 1),
            "p99": round(percentile(values, 0.99), 1), "max": round(values[-1], 1)}


def quantiles(values: list[float], steps: int = 200) -> list[float]:
    """``steps + 1`` evenly spaced percentiles of sorted ``values`` (0 to 100 %): enough
    to draw their distribution, far fewer numbers than the values themselves."""
    if not values:
        return []
    return [round(percentile(values, i / steps), 3) for i in range(steps + 1)]
