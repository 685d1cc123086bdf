"""The simulated replay of a real conversation run: trial 0 is the run as drawn, other trials scale every
cost by one factor and move arrivals, and the summary counts each rule's wins exactly."""

from __future__ import annotations

from bench.experiments.replay_shapes import RULES, perturbed, summary
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import SimRequest

COSTS = StepCostModel(base_s=0.08, prefill_token_s=0.002, decode_token_s=0.002, kv_token_s=2e-5)


def test_trial_zero_is_the_run_as_drawn_and_others_scale_every_cost_by_one_factor() -> None:
    turns = [SimRequest(1.0, 10, 5), SimRequest(2.0, 30, 5, follows=0)]
    same, costs, scale = perturbed(turns, COSTS, 0)
    assert same == turns and costs == COSTS and scale == 1.0
    moved, costs, scale = perturbed(turns, COSTS, 3)
    assert 1.0 <= scale <= 1.4
    for field in ("base_s", "prefill_token_s", "decode_token_s", "kv_token_s"):
        assert getattr(costs, field) == getattr(COSTS, field) * scale
    assert abs(moved[0].arrival_s - 1.0) <= 0.3  # a first turn moves by at most 0.3 s
    assert 0.7 * 2.0 <= moved[1].arrival_s <= 1.3 * 2.0  # a think time scales by [0.7, 1.3]
    assert [(t.prompt_tokens, t.output_tokens, t.follows) for t in moved] == [(10, 5, None), (30, 5, 0)]


def test_the_summary_counts_each_rule_s_least_ttft_and_jct_per_trial() -> None:
    def trial(ttft: dict, jct: dict) -> dict:
        return {r: {"mean_ttft_s": ttft[r], "mean_jct_s": jct[r], "hit_rate_tokens": 0.5} for r in RULES}

    lc, pa, p2, lpw = "least_cost", "prefix_affinity", "power_of_two", "least_predicted_work"
    trials = [
        trial({lc: 0.3, pa: 0.4, p2: 0.5, lpw: 0.6}, {lc: 10.0, pa: 12.0, p2: 11.0, lpw: 13.0}),
        trial({lc: 0.5, pa: 0.4, p2: 0.5, lpw: 0.6}, {lc: 12.0, pa: 12.0, p2: 11.0, lpw: 13.0}),
    ]
    s = summary({"trials": trials})
    assert (s[lc]["trials_least_ttft"], s[lc]["trials_least_jct"]) == (1, 1)
    assert (s[pa]["trials_least_ttft"], s[p2]["trials_least_jct"]) == (1, 1)
    assert s[lc]["mean_ttft_s"] == 0.4 and s[lc]["mean_jct_s"] == 11.0
