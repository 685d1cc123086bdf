"""A real conversation replay, simulated turn for turn: which routing rule wins, and how often, when the run's
speed and timing vary as a machine's do.

    python -m bench.experiments.replay_shapes \
        --turns docs/results/smollm2-135m-instruct/conversation_routing_spread.json \
        --profile profiles/cpu-smollm2-135m-instruct-1thread.json --trials 20 --json out.json

``binserve bench conversations --serve-config`` measures the four rules on 2 real replicas, one run each; a
run's rules differ by a few percent while the machine's speed drifts by more. This replays the same turns
in the simulator: each turn's prompt and answer lengths as the real run's JSON recorded them (the answers
are greedy, so every rule's run has the same ones), the conversations' arrivals and think times as the
bench drew them, the shipped predictor's predictions for their user messages (capped at ``max_tokens``,
with its length distribution, as the ingress sends them), and one system-prompt block shared by every
conversation, as SmolLM2's chat template shares one. Token ids are synthetic. Replicas run the served
config's engine: SARATHI with ``--chunk-size``, SSJF, ``--num-blocks`` of KV. Trial 0 is as drawn; every
other scales the profile's costs by a factor in [1, 1.4], moves each first turn by up to 0.3 s and scales
each think time by [0.7, 1.3] (its times are divided by the factor again, so trials compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.conversations import build_conversations
from bench.experiments import harness
from bench.experiments.prefix_routing import Params as RoutingParams
from bench.experiments.prefix_routing import simulate
from bench.sim.cost_model import StepCostModel
from bench.sim.simulator import SimRequest
from cluster.config import PredictorConfig
from cluster.predictor.distribution import DistributionTable
from cluster.predictor_client import load_predictor
from workers.checkpoint import load_tokenizer

RULES = ("power_of_two", "prefix_affinity", "least_predicted_work", "least_cost")


@dataclass(frozen=True)
class Params:
    turns: str
    """A ``binserve bench conversations --serve-config`` JSON: its last run's turns and its replay's params."""
    profile: str = str(harness.REPO_DIR / "profiles" / "cpu-smollm2-135m-instruct-1thread.json")
    model_dir: str = ".models/smollm2-135m-instruct"
    """The served model: its tokenizer cut the user messages, its predictor predicts them."""
    trials: int = 20
    num_replicas: int = 2
    num_blocks: int = 364
    """Per replica: 256 MiB of SmolLM2's KV, as ``deploy/serve-conversations.yaml`` gives each."""
    chunk_size: int = 256
    max_num_seqs: int = 16
    queue_order: str = "ssjf"
    block_size: int = 16
    min_token_id: int = 1000
    max_token_id: int = 40_000
    length_distribution: bool = True
    """Send each turn the shipped predictor's length distribution, as the ingress does; False: the point
    prediction alone (the router counts it down to 1 token, as before expected work)."""


def replay_turns(params: Params) -> list[SimRequest]:
    """The real run's turns as ``SimRequest``s: conversation by conversation, each follow-up after the turn
    it follows."""
    result = json.loads(Path(params.turns).read_text())
    run = result["runs"][-1]
    turns = next(iter(run["rows"].values()))["turns"]
    p = run["params"]
    args = argparse.Namespace(**{k: p[k] for k in ("num_conversations", "rate", "seed", "max_message_chars")})
    args.max_turns, args.max_output_tokens, args.think_s = p["max_turns"], p["max_output_tokens"], p["think_s"]
    conversations = build_conversations(load_tokenizer(params.model_dir), args)
    predictor = load_predictor(PredictorConfig(), params.model_dir)
    table = DistributionTable.of_predictor(None) if params.length_distribution else None
    system = tuple(range(params.min_token_id, params.min_token_id + params.block_size))
    requests: list[SimRequest] = []
    for c, conversation in enumerate(conversations):
        own = [t for t in turns if t["conversation"] == c]
        predicted = predictor.predict(list(conversation.user_messages[: len(own)])).output_tokens
        rng = random.Random(c)
        history: tuple[int, ...] = system
        for k, turn in enumerate(own):
            new = max(1, turn["prompt_tokens"] - len(history))
            prompt = history + tuple(rng.randrange(params.min_token_id, params.max_token_id) for _ in range(new))
            answer = tuple(rng.randrange(params.min_token_id, params.max_token_id) for _ in range(turn["output_tokens"]))
            guess = min(predicted[k], p["max_output_tokens"])
            requests.append(
                SimRequest(
                    arrival_s=conversation.arrival_s if k == 0 else conversation.think_s[k - 1],
                    prompt_tokens=len(prompt),
                    output_tokens=len(answer),
                    predicted_output_tokens=guess,
                    prompt_token_ids=prompt,
                    output_token_ids=answer,
                    follows=None if k == 0 else len(requests) - 1,
                    output_length_distribution=None
                    if table is None
                    else table.for_prediction(predicted[k], p["max_output_tokens"]),
                )
            )
            history = prompt + answer
    return requests


def perturbed(requests: list[SimRequest], cost_model: StepCostModel, trial: int) -> tuple[list, StepCostModel, float]:
    """Trial ``trial``'s turns and profile, and the factor its costs were scaled by (trial 0: as drawn)."""
    if trial == 0:
        return requests, cost_model, 1.0
    rng = random.Random(trial)
    scale = rng.uniform(1.0, 1.4)
    costs = {f: getattr(cost_model, f) * scale for f in ("base_s", "prefill_token_s", "decode_token_s", "kv_token_s")}
    moved = [
        dataclasses.replace(
            r,
            arrival_s=max(0.0, r.arrival_s + rng.uniform(-0.3, 0.3))
            if r.follows is None
            else r.arrival_s * rng.uniform(0.7, 1.3),
        )
        for r in requests
    ]
    return moved, dataclasses.replace(cost_model, **costs), scale


def run(params: Params) -> dict:
    cost_model = StepCostModel.load(params.profile)
    requests = replay_turns(params)
    routing = RoutingParams(
        num_replicas=params.num_replicas,
        num_blocks=params.num_blocks,
        chunk_size=params.chunk_size,
        max_num_seqs=params.max_num_seqs,
        queue_order=params.queue_order,
        block_size=params.block_size,
    )
    trials = []
    for trial in range(params.trials):
        turns, costs, scale = perturbed(requests, cost_model, trial)
        rows = {}
        for rule in RULES:
            row = simulate(dataclasses.replace(routing, seed=trial), costs, rule, True, turns)
            rows[rule] = {
                "mean_ttft_s": row["mean_ttft_s"] / scale,
                "mean_jct_s": row["mean_jct_s"] / scale,
                "hit_rate_tokens": row["hit_rate_tokens"],
            }
        trials.append(rows)
    return {"params": asdict(params), "profile_source": cost_model.source, "num_turns": len(requests), "trials": trials}


def summary(result: dict) -> dict[str, dict]:
    """Per rule: the means over the trials, and in how many trials it had the least mean TTFT and JCT."""
    trials = result["trials"]
    out = {}
    for rule in RULES:
        rows = [t[rule] for t in trials]
        out[rule] = {
            "mean_ttft_s": statistics.mean(r["mean_ttft_s"] for r in rows),
            "mean_jct_s": statistics.mean(r["mean_jct_s"] for r in rows),
            "hit_rate_tokens": statistics.mean(r["hit_rate_tokens"] for r in rows),
            "trials_least_ttft": sum(min(t, key=lambda k: t[k]["mean_ttft_s"]) == rule for t in trials),
            "trials_least_jct": sum(min(t, key=lambda k: t[k]["mean_jct_s"]) == rule for t in trials),
        }
    return out


# ---- the report's section (``binserve bench report`` renders docs/results/<model>/replay_shapes*.json) ------

TITLE = "A real conversation replay, simulated: each rule over varied speed and timing"


def render(result: dict) -> str:
    p, meta = result["params"], result["meta"]
    rows = [
        "| rule | mean TTFT (s) | mean JCT (s) | hit rate | least mean TTFT in | least mean JCT in |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rule, s in result["summary"].items():
        rows.append(
            f"| `{rule}` | {s['mean_ttft_s']:.3f} | {s['mean_jct_s']:.2f} | {s['hit_rate_tokens']:.1%} | "
            f"{s['trials_least_ttft']} of {p['trials']} | {s['trials_least_jct']} of {p['trials']} |"
        )
    spread = "the shipped length distribution" if p.get("length_distribution", True) else "point predictions only"
    caption = (
        f"{result['num_turns']} turns of `{Path(p['turns']).name}` on {p['num_replicas']} simulated replicas, "
        f"{spread}, {p['trials']} trials, profile `{Path(p['profile']).name}` ({result['profile_source']}). "
        f"*{meta['machine']['cpu']}; {meta['date']}; `{meta['command']}`; {meta['duration_s']:.0f} s.*"
    )
    return "\n".join([*rows, "", caption])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", required=True, help="a `binserve bench conversations --serve-config` JSON")
    parser.add_argument("--profile", default=Params.profile)
    parser.add_argument("--model", dest="model_dir", default=Params.model_dir)
    parser.add_argument("--trials", type=int, default=Params.trials)
    parser.add_argument(
        "--no-length-distribution",
        dest="length_distribution",
        action="store_false",
        help="send the point predictions alone (the router counts them down, as before expected work)",
    )
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials: must be >= 1, got {args.trials}")
    params = Params(
        turns=args.turns,
        profile=args.profile,
        model_dir=args.model_dir,
        trials=args.trials,
        length_distribution=args.length_distribution,
    )
    started_s, load_at_start = time.perf_counter(), harness.load_average()
    result = run(params)
    result["summary"] = summary(result)
    command = "python -m bench.experiments.replay_shapes " + " ".join(sys.argv[1:] if argv is None else argv)
    result["meta"] = harness.run_meta(command, time.perf_counter() - started_s, load_at_start)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['num_turns']} turns, {params.trials} trials, {Path(params.profile).name}:")
    for rule, s in result["summary"].items():
        print(
            f"  {rule:22s} mean TTFT {s['mean_ttft_s']:.3f} s, mean JCT {s['mean_jct_s']:.2f} s, hit rate "
            f"{s['hit_rate_tokens']:.1%}; least TTFT in {s['trials_least_ttft']}, least JCT in {s['trials_least_jct']}"
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
