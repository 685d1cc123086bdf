"""``binserve bench conversations --serve-config``'s bookkeeping (a served run is a benchmark, too slow for
the suite): one config per routing rule, the target judged against the best other rule, the report's section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from bench import conversation_routing
from cluster.config import AppConfig, ReplicaRouting

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve-conversations.yaml"
RULES = ["least_cost", "prefix_affinity", "least_predicted_work", "power_of_two"]


def test_each_run_serves_the_committed_config_with_only_its_routing_rule_changed() -> None:
    raw = yaml.safe_load(CONFIG.read_text())
    shipped = AppConfig.from_args(raw["applications"][0]["args"])
    assert shipped.router.num_bins == 1 and shipped.pools.min_replicas == shipped.pools.max_replicas == 2
    for rule in RULES:
        args = conversation_routing.config_with(raw, "pools", replica_routing=rule)["applications"][0]["args"]
        config = AppConfig.from_args(args)
        assert config.pools.replica_routing is ReplicaRouting(rule)
        assert dataclasses.replace(config, pools=shipped.pools) == shipped
    assert raw == yaml.safe_load(CONFIG.read_text())  # the loaded config is not changed in place


def row(ttft_s: float, jct_s: float) -> dict:
    return {
        "num_turns": 6,
        "ttft_mean_s": ttft_s,
        "mean_ttft_follow_up_s": ttft_s,
        "mean_jct_s": jct_s,
        "mean_jct_follow_up_s": jct_s,
        "hit_rate_tokens": 0.5,
        "hit_rate_follow_up_tokens": 0.7,
    }


def test_least_cost_is_judged_against_the_best_other_rule_on_each_mean() -> None:
    rows = {
        "least_cost": row(1.0, 4.0),
        "prefix_affinity": row(1.5, 3.0),
        "least_predicted_work": row(2.0, 5.0),
        "power_of_two": row(3.0, 6.0),
    }
    ttft, jct = conversation_routing.targets(rows)
    assert ttft["value"] == 1.5 and ttft["met"]
    assert jct["value"] == 0.75 and not jct["met"]  # prefix affinity's 3.0 s beat it
    assert conversation_routing.targets({"power_of_two": row(1.0, 1.0)}) == []


def served_run(rows: dict) -> dict:
    meta = {
        "machine": {"cpu": "cpu", "num_cores": 2, "platform": "linux"},
        "date": "2026-12-06T21:00:00+00:00",
        "command": "binserve bench conversations",
        "duration_s": 60.0,
        "load_average": {"start": 1.0, "end": 2.0},
    }
    return {
        "params": {
            "num_conversations": 4,
            "max_turns": 3,
            "max_output_tokens": 24,
            "rate": 0.5,
            "think_s": 1.0,
        },
        "config": "deploy/serve-conversations.yaml",
        "rows": {rule: {**r, "load_average": {"start": 1.0, "end": 2.0}} for rule, r in rows.items()},
        "answers_equal_first_run": dict.fromkeys(rows, True),
        "meta": meta,
    }


def test_repeated_runs_are_judged_on_each_rules_mean_and_rendered_in_run_order(tmp_path) -> None:
    path = tmp_path / "routing.json"
    first = served_run({rule: row(1.0 + i, 2.0 + i) for i, rule in enumerate(RULES)})
    second = served_run({rule: row(4.0 - i, 6.0 - i) for i, rule in enumerate(reversed(RULES))})
    path.write_text(json.dumps(conversation_routing.with_run(str(path), first, append=False)))
    result = conversation_routing.with_run(str(path), second, append=True)
    assert len(result["runs"]) == 2 and conversation_routing.with_run(str(path), second, False)["runs"] == [
        second
    ]
    assert result["mean_rows"]["least_cost"]["ttft_mean_s"] == 1.0  # 1.0, then 4.0 - 3
    ttft, _ = result["targets"]
    assert ttft["value"] == result["mean_rows"]["prefix_affinity"]["ttft_mean_s"] / 1.0
    text = conversation_routing.render(result)
    tables = [
        [line.split(" | ")[0].strip("| ") for line in block.splitlines()[2:]]
        for block in text.split("\n\n")
        if block.startswith("| ")
    ]
    assert tables == [RULES, list(reversed(RULES)), RULES]  # each run in its order, then the means


def test_a_run_marked_excluded_is_shown_but_not_counted(tmp_path) -> None:
    path = tmp_path / "routing.json"
    disturbed = {**served_run({rule: row(9.0, 9.0) for rule in RULES}), "excluded": "a test ran beside it"}
    clean = served_run({rule: row(1.0 + i, 2.0 + i) for i, rule in enumerate(RULES)})
    path.write_text(json.dumps(conversation_routing.with_run(str(path), disturbed, append=False)))
    result = conversation_routing.with_run(str(path), clean, append=True)
    assert result["mean_rows"] == conversation_routing.mean_rows([clean])
    text = conversation_routing.render(result)
    assert "**Not counted:** a test ran beside it" in text and "mean over the 1 counted runs" in text
