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


def rate_text(mpx_per_s: float) -> str:
    """A throughput with a unit that keeps 3 significant digits: '12.4 Mpx/s', '35.2 kpx/s', '870 px/s'."""
    if mpx_per_s >= 0.1:
        return f"{mpx_per_s:.3g} Mpx/s"
    if mpx_per_s >= 1e-4:
        return f"{mpx_per_s * 1e3:.3g} kpx/s"
    return f"{mpx_per_s * 1e6:.3g} px/s"
