"""The order in which waiting requests are admitted: FCFS, or SSJF with an aging guard."""

from __future__ import annotations

from pipeline.config import SchedulerConfig
from pipeline.request import Request


def order_waiting(waiting: list[Request], now_s: float, config: SchedulerConfig) -> list[Request]:
    """Return ``waiting`` in service order.

    ``fcfs``: by arrival. ``ssjf``: by predicted output length, shortest first (ties by arrival), except
    that requests which have waited at least ``aging_threshold_s`` come first, oldest first, so a long
    job is delayed by at most the threshold plus the work already admitted ahead of it.
    """
    by_arrival = sorted(waiting, key=lambda r: r.arrival_s)
    if config.queue_order == "fcfs":
        return by_arrival
    starved = [r for r in by_arrival if now_s - r.arrival_s >= config.aging_threshold_s]
    rest = [r for r in by_arrival if now_s - r.arrival_s < config.aging_threshold_s]
    rest.sort(key=lambda r: r.sort_length)  # stable: equal predictions keep arrival order
    return starved + rest
