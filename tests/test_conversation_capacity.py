"""``binserve bench conversation-capacity``'s bookkeeping (the served sweep is a benchmark, too slow for the
suite): the runs it parses, the SLO and capacities it judges, runs appended; and the conversation probe's
choice of conversation and its FLOPs model."""

from __future__ import annotations

import argparse
import json

import pytest
from transformers import AutoConfig

from bench import conversation_capacity
from bench.conversation_probe import new_tokens_by_turn, parse_shape, prefill_flops, shape_distance
from workers.partition import layer_parameters


def test_runs_parse_in_order_with_optional_conversation_counts() -> None:
    assert conversation_capacity.parse_runs("off@0.0133:6, on@0.03,off@0.045") == [
        (False, 0.0133, 6),
        (True, 0.03, None),
        (False, 0.045, None),
    ]
    for bad in ("cached@0.1", "on", "on@"):
        with pytest.raises(ValueError, match="runs: each run is on@RATE or off@RATE"):
            conversation_capacity.parse_runs(bad)


def row(caching: bool, rate: float, ttft_s: float) -> dict:
    return {
        "caching": caching,
        "rate_per_s": rate,
        "num_conversations": 12,
        "num_turns": 50,
        "ttft_mean_s": ttft_s,
        "mean_jct_s": 20.0,
        "hit_rate_tokens": 0.8 if caching else 0.0,
        "output_tokens_per_s": 30.0,
        "load_average": {"start": 1.0, "end": 2.0},
    }


def test_capacity_is_the_highest_rate_below_the_first_miss_of_an_slo_set_by_caching_off() -> None:
    rows = [
        row(False, 0.03, 2.5),  # misses 2 x 1.0 s
        row(True, 0.045, 1.9),
        row(False, 0.01, 1.0),  # the lowest rate off: the SLO is 2.0 s
        row(False, 0.02, 1.8),
        row(True, 0.03, 0.6),
        row(True, 0.06, 2.1),  # misses
        row(True, 0.09, 1.5),  # holds, but above a miss: not counted
    ]
    cap = conversation_capacity.capacities(rows, slo_multiple=2.0)
    assert cap["slo_ttft_s"] == 2.0 and cap["baseline_rate_per_s"] == 0.01
    assert cap["off"] == {"capacity_per_s": 0.02, "first_miss_per_s": 0.03}
    assert cap["on"] == {"capacity_per_s": 0.045, "first_miss_per_s": 0.06}
    (target,) = conversation_capacity.targets(
        {"capacities": cap, "params": {"serve_config": "c.yaml", "slo_ttft_multiple": 2.0}}
    )
    assert target["value"] == pytest.approx(2.25) and target["met"]


def test_runs_are_appended_and_judged_together(tmp_path) -> None:
    path = tmp_path / "capacity.json"
    params = {"serve_config": "c.yaml", "slo_ttft_multiple": 2.0}
    path.write_text(json.dumps({"rows": [], "meta": [{"command": "an earlier sweep"}]}))
    runs = [row(False, 0.01, 1.0), row(True, 0.01, 0.3)]
    assert conversation_capacity.with_rows(str(path), params, runs, False)["meta"] == []  # a fresh file
    first = conversation_capacity.with_rows(str(path), params, runs, True)
    assert first["meta"] == [{"command": "an earlier sweep"}]  # appended: earlier sweeps' provenance kept
    path.write_text(json.dumps(first))
    assert first["capacities"]["on"]["capacity_per_s"] == 0.01 and first["targets"][0]["value"] == 1.0
    both = conversation_capacity.with_rows(str(path), params, [row(True, 0.02, 1.2)], append=True)
    assert len(both["rows"]) == 3 and both["targets"][0]["value"] == 2.0
    assert len(conversation_capacity.with_rows(str(path), params, [row(True, 0.02, 1.2)], False)["rows"]) == 1
    both["params"].update(max_turns=6, max_output_tokens=256, think_s=1.0, seed=0)
    both["meta"] = [
        {
            "date": "2026-12-07T06:00:00+00:00",
            "command": "binserve bench conversation-capacity",
            "duration_s": 9,
            "machine": {"cpu": "cpu", "num_cores": 2},
        }
    ]
    table = [line for line in conversation_capacity.render(both).splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| off", "| on", "| on"]  # in run order
    assert [line.split(" | ")[-2] for line in table[1:]] == ["yes", "yes", "yes"]


def test_a_turn_s_new_tokens_follow_the_previous_prompt_cached_in_whole_blocks() -> None:
    assert new_tokens_by_turn([41, 375, 743], block_size=16) == [41, 375 - 32, 743 - 368]


def test_the_shape_to_match_is_prompt_tokens_by_turn_weighed_in_log_ratios() -> None:
    shape = parse_shape("1:50,3:400")
    assert shape == {1: 50, 3: 400}
    assert shape_distance([50, 999, 400], shape) == 0.0  # turns the shape leaves out do not count
    # 10% long at turn 1 weighs what 10% long at turn 3 does.
    assert shape_distance([55, 1, 400], shape) == pytest.approx(shape_distance([50, 1, 440], shape))
    for bad in ("1:50,3", "0:50", "2:0", "x:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="--like"):
            parse_shape(bad)


def test_prefill_flops_count_two_per_layer_parameter_and_causal_attention(tiny_llama: str) -> None:
    config = AutoConfig.from_pretrained(tiny_llama)
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    one = prefill_flops(config, new_tokens=1, cached_tokens=0)
    assert one == config.num_hidden_layers * (2 * layer_parameters(config) + 4 * 1 * width)
    # The same new tokens after a longer cached prefix cost more only in attention.
    extra = prefill_flops(config, 10, 100) - prefill_flops(config, 10, 0)
    assert extra == pytest.approx(config.num_hidden_layers * 4 * 100 * width * 10)
