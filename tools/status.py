"""``binserve status``: a live terminal view of a running binserve, read from Ray's metrics endpoint.

    binserve serve --config deploy/serve-local.yaml --metrics-export-port 9100
    binserve status --address 127.0.0.1:9100            # refreshes every 2 s; Ctrl-C stops it
    binserve status --address 127.0.0.1:9100 --once     # one snapshot (scripts, tests)

One row per engine replica (pool, replica): running and waiting requests, KV blocks used of the pool,
the prefix cache's hit rate (prompt tokens found cached, since the replica started), predicted
outstanding tokens (the autoscaling signal), pipeline bubbles, and TTFT / TBT p50 over the
last refresh interval (from the histograms' change since the previous scrape; the first screen shows
them since the replica started). Below: requests by bin and by outcome.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

PREFIX = "ray_binserve_"


@dataclass
class Scrape:
    """binserve samples: name (without ``ray_binserve_``) -> list of (labels, value)."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=lambda: defaultdict(list))

    def by(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        totals: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, value in self.samples.get(name, []):
            totals[tuple(labels.get(k, "") for k in keys)] += value
        return totals


def scrape(address: str, timeout_s: float = 5.0) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    url = address if address.startswith("http") else f"http://{address}/metrics"
    text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
    result = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX):
                result.samples[sample.name.removeprefix(PREFIX)].append((sample.labels, sample.value))
    return result


def histogram_p50(now: Scrape, before: Scrape | None, name: str, key: tuple[str, str]) -> float | None:
    """The median of a histogram's observations between two scrapes (linear within the bucket)."""

    def buckets(s: Scrape | None) -> dict[float, float]:
        out: dict[float, float] = defaultdict(float)
        for labels, value in s.samples.get(name + "_bucket", []) if s else []:
            if (labels.get("deployment", ""), labels.get("replica", "")) == key:
                out[float(labels["le"])] += value
        return out

    current, previous = buckets(now), buckets(before)
    counts = sorted((le, current[le] - previous.get(le, 0.0)) for le in current)
    if not counts or counts[-1][1] <= 0:
        return None
    half = counts[-1][1] / 2
    # Cumulative counts: the first bucket reaching half the total holds the median (the last one does).
    for (le, cumulative), (prev_le, prev_cum) in zip(counts, [(0.0, 0.0), *counts], strict=False):
        if cumulative >= half:
            if le == float("inf"):
                return prev_le
            span = cumulative - prev_cum
            return prev_le + (le - prev_le) * ((half - prev_cum) / span if span > 0 else 0.0)
    return None  # unreachable: the last cumulative count is the total


def render(now: Scrape, before: Scrape | None) -> str:
    def fmt_ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{1000 * seconds:.0f}"

    keys = ("deployment", "replica")
    running, waiting = now.by("running_requests", *keys), now.by("waiting_requests", *keys)
    used, free = now.by("kv_blocks_used", *keys), now.by("kv_blocks_free", *keys)
    queried, hits = now.by("prefix_queried_tokens", *keys), now.by("prefix_hit_tokens", *keys)
    outstanding, bubbles = (
        now.by("outstanding_predicted_tokens", *keys),
        now.by("pipeline_bubble_fraction", *keys),
    )
    lines = [
        f"binserve status at {time.strftime('%H:%M:%S')}",
        "",
        f"{'pool':<15} {'replica':<10} {'running':>7} {'waiting':>7} {'KV used':>13} {'prefix':>6} "
        f"{'predicted':>9} {'bubbles':>7} {'TTFT p50':>8} {'TBT p50':>7}",
        f"{'':<15} {'':<10} {'':>7} {'':>7} {'':>13} {'hits':>6} {'tokens':>9} {'':>7} {'ms':>8} {'ms':>7}",
    ]
    for key in sorted(running):
        total_blocks = used.get(key, 0) + free.get(key, 0)
        kv = f"{used.get(key, 0):.0f}/{total_blocks:.0f}"
        bubble = f"{bubbles[key]:.2f}" if key in bubbles else "-"
        hit_rate = f"{hits.get(key, 0) / queried[key]:.0%}" if queried.get(key) else "-"
        lines.append(
            f"{key[0]:<15} {key[1][-10:]:<10} {running[key]:>7.0f} {waiting.get(key, 0):>7.0f} {kv:>13} "
            f"{hit_rate:>6} {outstanding.get(key, 0):>9.0f} {bubble:>7} "
            f"{fmt_ms(histogram_p50(now, before, 'ttft_seconds', key)):>8} "
            f"{fmt_ms(histogram_p50(now, before, 'tbt_seconds', key)):>7}"
        )
    if not running:
        lines.append("(no engine replica has reported yet)")
    by_bin = now.by("engine_requests_total", "bin")
    by_code = now.by("requests_total", "api", "code")
    lines += [
        "",
        "finished requests by bin: " + ", ".join(f"bin {b}: {n:.0f}" for (b,), n in sorted(by_bin.items())),
    ]
    if by_code:
        lines.append(
            "calls by outcome: " + ", ".join(f"{a} {c}: {n:.0f}" for (a, c), n in sorted(by_code.items()))
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    before = None
    try:
        while True:
            try:
                now = scrape(args.address)
            except (urllib.error.URLError, OSError) as exc:
                raise ValueError(
                    f"address: no metrics at {args.address} ({exc}); start the cluster with "
                    "`binserve serve --metrics-export-port PORT` (or `ray start --metrics-export-port PORT`)"
                ) from None
            screen = render(now, before)
            if args.once:
                print(screen)
                return 0
            sys.stdout.write("\x1b[2J\x1b[H" + screen + "\n")  # clear the terminal, then draw
            sys.stdout.flush()
            before = now
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="a live view of pools, replicas, queues, KV use and latency")
    p.add_argument(
        "--address", required=True, help="HOST:PORT of Ray's metrics endpoint (--metrics-export-port)"
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.set_defaults(func=cmd_status)
