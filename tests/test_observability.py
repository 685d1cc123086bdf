"""Metrics on Ray's Prometheus endpoint after real traffic, and the Grafana dashboard's references."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cluster.prometheus import EXPORTED_PREFIX, METRIC_NAMES, METRICS

REPO = Path(__file__).resolve().parents[1]
SERVE_LOCAL = REPO / "deploy" / "serve-local.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "binserve.json"
NUM_REQUESTS = 12
NUM_KV_BLOCKS = 128


def scrape(port: int) -> dict[str, list]:
    """Samples by metric family name (without Ray's prefix), from the node's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith(EXPORTED_PREFIX + "binserve_"):
            # The parser names a counter's family without its ``_total``; ours are named with it.
            name = family.name + "_total" if family.type == "counter" else family.name
            families[name.removeprefix(EXPORTED_PREFIX)] = family.samples
    return families


@pytest.fixture(scope="module")
def served(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The application (two bins, two 2-stage pools) with metrics on; yields the metrics port after
    NUM_REQUESTS requests have been served."""
    from cluster.client import GenerationClient, make_request
    from cluster.local import free_port, serving_locally

    raw = yaml.safe_load(SERVE_LOCAL.read_text())
    args = raw["applications"][0]["args"]
    args["cache"] = {"num_blocks": NUM_KV_BLOCKS}
    args["model"]["max_model_len"] = 1024  # within the small pool: 128 blocks of 16 tokens
    args["scheduler"] = {**(args.get("scheduler") or {}), "chunk_size": 32, "max_num_seqs": 4}
    config = tmp_path_factory.mktemp("observability") / "serve.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = free_port()
    with serving_locally(config, tiny_llama, num_cpus=8, metrics_export_port=port) as address:

        async def traffic() -> None:
            async with GenerationClient(address) as client:
                prompts = [
                    f"Request {i}: tell me about the number {i}." * (1 + i % 3) for i in range(NUM_REQUESTS)
                ]
                await asyncio.gather(
                    *(client.generate(make_request(p, max_tokens=8 + i)) for i, p in enumerate(prompts))
                )

        asyncio.run(traffic())
        yield port


def wait_for(port: int, check, timeout_s: float = 60.0) -> dict[str, list]:
    """Scrape until ``check(families)`` holds (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        families = scrape(port)
        if check(families) or time.monotonic() > deadline:
            return families
        time.sleep(1.0)


def total(samples: list, suffix: str = "") -> float:
    return sum(s.value for s in samples if s.name.endswith(suffix))


def test_every_series_is_exported_with_plausible_values(served: int) -> None:
    def finished(families: dict[str, list]) -> bool:
        counts = (
            total(families.get("binserve_engine_requests_total", []), "_total"),
            total(families.get("binserve_requests_total", []), "_total"),
        )
        # Each process exports on its own period: wait until every count has arrived.
        return (
            min(counts) >= NUM_REQUESTS
            and total(families.get("binserve_predictor_batch_size", []), "_count") > 0
            and "binserve_pipeline_bubble_fraction" in families
        )

    families = wait_for(served, finished)
    names = {s.name for s in METRICS}
    assert names <= set(families), sorted(names - set(families))
    assert total(families["binserve_requests_total"], "_total") == NUM_REQUESTS  # the ingress's count
    # Batches, not prompts: Ray exports a histogram's _sum from its buckets (12.5 for 12 prompts seen).
    assert 1 <= total(families["binserve_predictor_batch_size"], "_count") <= NUM_REQUESTS
    assert total(families["binserve_engine_requests_total"], "_total") == NUM_REQUESTS
    for name in ("binserve_ttft_seconds", "binserve_e2e_latency_seconds", "binserve_queue_wait_seconds"):
        assert total(families[name], "_count") == NUM_REQUESTS, name
    assert total(families["binserve_prediction_error_tokens"], "_count") == NUM_REQUESTS
    assert total(families["binserve_tbt_seconds"], "_count") > 0
    assert total(families["binserve_step_tokens"], "_count") > 0
    assert total(families["binserve_step_seconds"], "_count") > 0
    output_tokens = total(families["binserve_output_tokens_total"], "_total")
    assert NUM_REQUESTS <= output_tokens <= sum(8 + i for i in range(NUM_REQUESTS))
    for sample in families["binserve_kv_blocks_used"] + families["binserve_kv_blocks_free"]:
        assert 0 <= sample.value <= NUM_KV_BLOCKS
    for sample in families["binserve_pipeline_bubble_fraction"] + families["binserve_stage_utilisation"]:
        assert 0.0 <= sample.value <= 1.0
    stages = {s.labels["stage"] for s in families["binserve_stage_utilisation"]}
    assert stages == {"0", "1"}
    deployments = {s.labels.get("deployment") for s in families["binserve_engine_requests_total"]}
    assert deployments <= {"engine-pool-0", "engine-pool-1"} and deployments


def test_kv_blocks_all_return_once_traffic_stops(served: int) -> None:
    families = wait_for(served, lambda f: total(f.get("binserve_kv_blocks_used", [])) == 0)
    assert total(families["binserve_kv_blocks_used"]) == 0
    assert total(families["binserve_kv_blocks_free"]) == 2 * NUM_KV_BLOCKS  # both pools' replicas


def test_the_dashboard_refers_only_to_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    referenced = set()
    for expr in exprs:
        for name in re.findall(EXPORTED_PREFIX + r"(binserve_[a-z0-9_]+)", expr):
            for suffix in ("_bucket", "_count", "_sum"):
                name = name.removesuffix(suffix)
            referenced.add(name)
    assert referenced, "the dashboard queries no binserve series"
    assert referenced <= METRIC_NAMES, sorted(referenced - METRIC_NAMES)
    assert {spec.name for spec in METRICS} <= referenced, "every series has a panel"


def test_status_shows_every_engine_replica(served: int, capsys: pytest.CaptureFixture) -> None:
    from tools.cli import main

    wait_for(served, lambda f: "binserve_running_requests" in f)
    assert main(["status", "--address", f"127.0.0.1:{served}", "--once"]) == 0
    screen = capsys.readouterr().out
    assert "engine-pool-0" in screen and "engine-pool-1" in screen
    assert f"/{NUM_KV_BLOCKS}" in screen  # KV used of the pool
    assert "finished requests by bin" in screen


def test_status_without_metrics_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    from cluster.local import free_port
    from tools.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--address", f"127.0.0.1:{free_port()}", "--once"])
    assert exit_info.value.code == 2
    assert "metrics-export-port" in capsys.readouterr().err


def test_status_shows_each_replicas_prefix_hit_rate() -> None:
    from tools.status import Scrape, render

    now = Scrape()
    replica = {"deployment": "engine-pool-0", "replica": "r1"}
    for name, value in (
        ("running_requests", 1.0),
        ("kv_blocks_used", 3.0),
        ("kv_blocks_free", 5.0),
        ("prefix_queried_tokens", 400.0),
        ("prefix_hit_tokens", 100.0),
    ):
        now.samples[name].append((replica, value))
    [row] = [line for line in render(now, None).splitlines() if line.startswith("engine-pool-0")]
    assert "3/8" in row and " 25% " in row
