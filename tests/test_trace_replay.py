"""``binserve bench trace``: the two systems' configs, the workload it replays, and its report section.
The run itself (two real clusters, minutes) is a benchmark, not a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import trace_replay
from bench.experiments import report
from bench.experiments.harness import target, write_json
from bench.labels import is_validation
from cluster.local import load_serve_config

REPO = Path(__file__).resolve().parents[1]
META = {
    "machine": {"cpu": "Test CPU", "num_cores": 2, "platform": "Linux", "python": "3.11"},
    "date": "2026-01-01T00:00:00+00:00",
    "command": "binserve bench trace",
    "duration_s": 1.0,
    "load_average": {"start": 0.5, "end": 1.5},
}


@pytest.mark.parametrize("system", trace_replay.SYSTEMS, ids=lambda s: s.queue_order)
def test_each_system_is_one_pool_of_single_process_replicas(tmp_path: Path, system) -> None:
    raw = yaml.safe_load((REPO / "deploy" / "serve-local.yaml").read_text())
    changed = trace_replay.system_config(raw, system, replicas=2, kv_cache_bytes=512 * 2**20)
    args = changed["applications"][0]["args"]
    assert args["router"]["num_bins"] == 1
    assert args["parallel"] == {"pp_size": 1, "torch_threads": 1}
    assert args["cache"] == {"kv_cache_bytes": 512 * 2**20}
    assert args["scheduler"]["queue_order"] == system.queue_order
    assert args["scheduler"]["aging_threshold_s"] == 30.0  # the config's own, untouched
    pools = args["pools"]
    assert (pools["min_replicas"], pools["max_replicas"], pools["replica_routing"]) == (
        2,
        2,
        system.replica_routing,
    )
    assert raw["applications"][0]["args"]["router"]["num_bins"] == 2  # the input is not modified
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(changed))
    load_serve_config(path)  # still a valid Serve config


def test_the_workload_is_held_out_labelled_chat_prompts_on_the_trace_clock(smollm2: str) -> None:
    from cluster.predictor import DEFAULT_DIR, LengthPredictor
    from workers.checkpoint import load_tokenizer

    requests = trace_replay.trace_workload(smollm2, str(REPO / trace_replay.DEFAULT_LABELS), 5)
    assert len(requests) == 5
    assert requests[0].arrival_s == 0.0
    assert [r.arrival_s for r in requests] == sorted(r.arrival_s for r in requests)
    fraction = LengthPredictor.load(DEFAULT_DIR).metadata.validation_fraction
    by_prompt = {
        json.loads(line)["id"]: json.loads(line)["output_tokens"]
        for line in (REPO / trace_replay.DEFAULT_LABELS).read_text().split("\n")
        if line
    }
    tokenizer = load_tokenizer(smollm2)
    for r in requests:
        assert 1 <= r.output_tokens <= trace_replay.MAX_TOKENS
        assert r.output_tokens in by_prompt.values()
        assert tokenizer.decode(r.prompt_token_ids).endswith("<|im_start|>assistant\n")
        assert r.prompt in tokenizer.decode(r.prompt_token_ids)
    held_out_ids = [i for i in by_prompt if is_validation(i, fraction)]
    assert len(held_out_ids) >= 5
    assert (
        trace_replay.kv_bytes_per_token(smollm2) == 2 * 30 * 3 * 64 * 4
    )  # layers, KV heads, head size, fp32


def _run(name: str, mean: float, p99: float) -> dict:
    summary = {"mean_jct_s": mean, "p50_jct_s": mean, "p99_jct_s": p99, "p99_ttft_s": 0.5}
    return {
        "system": name,
        "measured": {"summary": {**summary, "output_tokens_per_s": 100.0}, "failures": {}},
        "mean_output_tokens": 300.0,
        "simulated": summary,
    }


def test_the_report_renders_a_trace_result_and_judges_its_targets(tmp_path: Path) -> None:
    result = {
        "workload": {
            "replicas": 2,
            "scheduler": {"policy": "sarathi"},
            "num_requests": 80,
            "load": 0.8,
            "capacity_rps": 0.4,
            "full_batch_output_tokens_per_s": 130.0,
            "mean_label_output_tokens": 325.0,
            "rate_per_s": 0.32,
            "predictor_spearman_vs_labels": 0.4,
            "profile": "profiles/x.json",
        },
        "runs": [
            _run(trace_replay.SYSTEMS[0].name, 40.0, 100.0),
            _run(trace_replay.SYSTEMS[1].name, 36.0, 90.0),
        ],
        "mean_jct_reduction": 0.1,
        "p99_jct_ratio": 0.9,
        "targets": [
            target("mean JCT >= 25% lower than length-blind", 0.1, 0.25),
            target("p99 JCT no worse than length-blind (ratio)", 0.9, 1.0, higher_is_better=False),
        ],
        "meta": META,
    }
    write_json(tmp_path / "smollm2-135m-instruct" / "trace.json", result)
    text = report.write_report(tmp_path, tmp_path / "RESULTS.md").read_text()
    assert "A real cluster: the Azure conversation trace" in text
    assert "| length-aware (least predicted work, SSJF) | 36 | 36 | 90 |" in text
    assert "load average 0.5 at the start, 1.5 at the end" in text
    verdicts = json.loads((tmp_path / "targets.json").read_text())
    assert [(v["experiment"], v["model"], v["met"]) for v in verdicts] == [
        ("trace", "smollm2-135m-instruct", False),
        ("trace", "smollm2-135m-instruct", True),
    ]
