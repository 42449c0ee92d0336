"""Wall-clock timing of repeated calls (latency figures): untimed warm-up calls, then timed ones."""

import statistics
import time
from collections.abc import Callable
from typing import Any


def call_times_ms(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn`` after ``warmup`` untimed calls.

    ``fn`` must finish its work before it returns (a caller timing a GPU passes a function that syncs).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    """Median milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed calls."""
    return statistics.median(call_times_ms(fn, runs, warmup))
