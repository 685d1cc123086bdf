"""One conversation, turn by turn, through the OpenAI API of a served cluster: what each turn's TTFT costs
with prefix caching on and off (issue 22's "as a new user would" trial, made a command).

    binserve bench conversation-probe --model .models/smollm2-135m-instruct \\
        --json docs/results/smollm2-135m-instruct/conversation_probe.json

The conversation is the first ShareGPT conversation (among the 10,000 ids, in their order) with at least
``--turns`` human turns whose last turn renders to ``--min-tokens`` .. ``--max-tokens`` tokens (with
``--like 1:57,2:341,4:980,6:1526``, the one of them nearest the issue's own conversation instead). Each turn
sends the whole history with the dataset's own assistant answers (not the model's, so every turn adds a
few hundred tokens no earlier request computed), greedy, ``--output-tokens`` tokens; then the last turn is
sent again unchanged. The config (``deploy/serve-local.yaml`` by default) is served on a local Ray cluster,
caching on ``--repeats`` times and then off once (``cache.enable_prefix_caching``), a fresh cluster each
after one warm-up call, through the official ``openai`` client over loopback. TTFT is taken at the client
(the first chunk with text). The targets take the median of the caching-on runs' ratios: one run's turn-6
over turn-2 ratio moved from 1.43x to 1.91x between two quiet runs here.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import write_report

TITLE = "One conversation through the OpenAI API: each turn's TTFT with prefix caching on and off"
TARGET_LAST_OVER_SECOND = 1.5
"""The last turn's TTFT at most this many times the second's, caching on."""
TARGET_RESEND_OVER_LAST = 0.2
"""An unchanged resend of the last turn at most this share of the last turn's TTFT, caching on."""


BLOCK_SIZE = 16
"""The served config's KV block (``cache.block_size``): a turn's cached prefix is the previous turn's prompt
cut to whole blocks (its few generated tokens differ from the dataset's answer that follows)."""


def new_tokens_by_turn(prompt_lengths: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Each turn's uncached prompt tokens when the previous turn's prompt is cached in whole blocks."""
    cached = [0] + [n // block_size * block_size for n in prompt_lengths[:-1]]
    return [n - c for n, c in zip(prompt_lengths, cached, strict=True)]


ISSUE_PROMPT_TOKENS = {1: 57, 2: 341, 4: 980, 6: 1526}
"""The issue's own conversation: its prompt tokens at turns 1, 2, 4 and 6 (not among the 10,000 ids)."""


def parse_shape(text: str) -> dict[int, int]:
    """``"1:57,2:341"`` -> ``{1: 57, 2: 341}``: prompt tokens by turn (turns from 1)."""
    try:
        shape = {int(turn): int(tokens) for turn, tokens in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--like: expected TURN:TOKENS,... (e.g. 1:57,2:341), got {text!r}"
        ) from None
    if not shape or min(shape) < 1 or min(shape.values()) < 1:
        raise argparse.ArgumentTypeError(f"--like: turns and tokens must be >= 1, got {text!r}")
    return shape


def shape_distance(lengths: list[int], shape: dict[int, int]) -> float:
    """How far a conversation's prompt tokens by turn are from ``shape``'s: the root of the summed squared
    log ratios, so 10% too long weighs the same at turn 1 as at turn 6."""
    return math.sqrt(sum(math.log(lengths[turn - 1] / tokens) ** 2 for turn, tokens in shape.items()))


def pick_conversation(
    tokenizer,
    num_turns: int,
    min_tokens: int,
    max_tokens: int,
    new_token_ratio: float | None = None,
    like: dict[int, int] | None = None,
) -> tuple[str, list]:
    """The first conversation with ``num_turns`` human turns whose last one renders to ``min_tokens`` ..
    ``max_tokens`` tokens (and, given ``new_token_ratio``, whose last turn adds between 1 / ratio and
    ratio times turn 2's new tokens): its id and its turns' message lists. Given ``like`` (prompt tokens
    by turn), the one of those nearest to it instead of the first."""
    from bench.workload import eligible_conversations

    if like is not None and max(like) > num_turns:
        raise ValueError(f"like: turns must be in [1, {num_turns}], got {max(like)}")
    best: tuple[float, str, list] | None = None
    for record_id, turns in eligible_conversations(num_turns).items():
        history, per_turn = [], []
        for t in turns:
            history.append({"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]})
            if t["from"] == "human":
                per_turn.append(list(history))
            if len(per_turn) == num_turns:
                break
        if len(per_turn) < num_turns or any(
            m["role"] != r for m, r in zip(history, ["user", "assistant"] * len(history), strict=False)
        ):
            continue  # turns that do not alternate
        lengths = [
            len(tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"])
            for m in per_turn
        ]
        if not min_tokens <= lengths[-1] <= max_tokens:
            continue
        new = new_tokens_by_turn(lengths)
        if new_token_ratio is not None and not 1 / new_token_ratio <= new[-1] / new[1] <= new_token_ratio:
            continue
        if like is None:
            return record_id, per_turn
        distance = shape_distance(lengths, like)
        if best is None or distance < best[0]:
            best = (distance, record_id, per_turn)
    if best is not None:
        return best[1], best[2]
    raise ValueError(f"no conversation with {num_turns} turns renders to {min_tokens}..{max_tokens} tokens")


def prefill_flops(hf_config, new_tokens: int, cached_tokens: int) -> float:
    """FLOPs of a prefill of ``new_tokens`` after ``cached_tokens``: 2 per decoder-layer parameter and token,
    plus attention scores and values (4 x context x heads x head dim per token and layer, causal)."""
    from workers.model import head_dim_of
    from workers.partition import layer_parameters

    width = hf_config.num_attention_heads * head_dim_of(hf_config)
    mean_context = cached_tokens + (new_tokens + 1) / 2
    per_token = 2 * layer_parameters(hf_config) + 4 * mean_context * width
    return float(hf_config.num_hidden_layers * per_token * new_tokens)


def _config_with(path: str, enable_prefix_caching: bool, scratch: Path) -> Path:
    from bench.conversation_routing import config_with

    raw = config_with(
        yaml.safe_load(Path(path).read_text()), "cache", enable_prefix_caching=enable_prefix_caching
    )
    out = scratch / f"serve-caching-{enable_prefix_caching}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


def one_turn(client, model: str, messages: list, output_tokens: int) -> dict[str, Any]:
    """Stream one turn; its TTFT at the client, prompt and cached prompt tokens from the usage."""
    sent_s = time.perf_counter()
    first_s, usage = None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=output_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if (
            first_s is None
            and chunk.choices
            and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason)
        ):
            first_s = time.perf_counter()
    details = usage.prompt_tokens_details
    return {
        "ttft_s": first_s - sent_s,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": details.cached_tokens if details is not None else 0,
    }


def probe(config: Path, model_dir: str, turns: list, output_tokens: int, num_cpus: int) -> dict[str, Any]:
    import openai

    from cluster.local import serving_locally_at

    load_before = os.getloadavg()
    with serving_locally_at(config, model_dir, num_cpus=num_cpus) as addresses:
        client = openai.OpenAI(base_url=f"{addresses.http}/v1", api_key="unused", max_retries=0)
        model = Path(model_dir).name
        one_turn(client, model, [{"role": "user", "content": "Hello!"}], output_tokens)  # warm-up
        rows = [one_turn(client, model, messages, output_tokens) for messages in turns]
        resend = one_turn(client, model, turns[-1], output_tokens)
    return {"turns": rows, "resend": resend, "load_average": [load_before, os.getloadavg()]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.experiments.harness import run_meta, this_command
    from workers.checkpoint import load_tokenizer

    started_s, load_at_start = time.perf_counter(), os.getloadavg()
    record_id, turns = pick_conversation(
        load_tokenizer(args.model),
        args.turns,
        args.min_tokens,
        args.max_tokens,
        args.new_token_ratio,
        args.like,
    )
    runs, repeats = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for caching in [True] * args.repeats + [False]:
            config = _config_with(args.config, caching, Path(scratch))
            name = "caching on" if caching else "caching off"
            one = probe(config, args.model, turns, args.output_tokens, args.num_cpus)
            if name in runs:
                repeats.append(one)
            else:
                runs[name] = one
            ttfts = ", ".join(f"{t['ttft_s']:.2f}" for t in one["turns"])
            print(f"{name}: TTFT by turn {ttfts} s; resend {one['resend']['ttft_s']:.2f} s", flush=True)
    report = {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "conversation_id": record_id,
        "runs": runs,
        "caching_on_repeats": repeats,
        "meta": run_meta(this_command(), time.perf_counter() - started_s, round(load_at_start[0], 2)),
    }
    report["prefill_flops"] = _flops_by_turn(args.model, runs["caching on"]["turns"])
    report["targets"] = targets(report)
    return report


def _flops_by_turn(model_dir: str, rows: list[dict[str, Any]]) -> list[float]:
    """Each caching-on turn's prefill FLOPs, from the prompt and cached tokens its usage reported."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    return [
        prefill_flops(hf_config, r["prompt_tokens"] - r["cached_tokens"], r["cached_tokens"]) for r in rows
    ]


def cmd_bench_conversation_probe(args: argparse.Namespace) -> int:
    report = run(args)
    for t in report["targets"]:
        print(f"{t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'missed'})")
    write_report(args.json, report)
    return 0


# ---- the report's section (docs/results/<model>/conversation_probe.json) ----------------------------------


def _ratios(run: dict[str, Any]) -> tuple[float, float]:
    ttfts = [t["ttft_s"] for t in run["turns"]]
    return ttfts[-1] / ttfts[1], run["resend"]["ttft_s"] / ttfts[-1]


def _caching_on_ratios(report: dict[str, Any]) -> list[tuple[float, float]]:
    """Each caching-on run's ratios: the first, then the repeats (each on a fresh cluster)."""
    return [_ratios(r) for r in [report["runs"]["caching on"], *report.get("caching_on_repeats", [])]]


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = _caching_on_ratios(report)
    last_over_second = statistics.median(r[0] for r in ratios)
    resend_over_last = statistics.median(r[1] for r in ratios)
    n = len(report["runs"]["caching on"]["turns"])
    runs = f", caching on (median of {len(ratios)} runs)" if len(ratios) > 1 else ", caching on"
    return [
        {
            "target": f"one conversation (OpenAI API): turn {n}'s TTFT <= {TARGET_LAST_OVER_SECOND}x turn 2's"
            + runs,
            "value": last_over_second,
            "threshold": TARGET_LAST_OVER_SECOND,
            "met": last_over_second <= TARGET_LAST_OVER_SECOND,
        },
        {
            "target": f"one conversation (OpenAI API): an unchanged resend of turn {n} <= "
            f"{TARGET_RESEND_OVER_LAST}x its TTFT" + runs,
            "value": resend_over_last,
            "threshold": TARGET_RESEND_OVER_LAST,
            "met": resend_over_last <= TARGET_RESEND_OVER_LAST,
        },
    ]


def render(result: dict[str, Any]) -> str:
    from bench.experiments.harness import markdown_table, provenance

    p = result["params"]
    on, off = result["runs"]["caching on"], result["runs"]["caching off"]
    header = ["turn", "prompt tokens", "TTFT off (s)", "TTFT on (s)", "cached tokens (on)", "off / on"]
    rows = [
        [str(k + 1), t_on["prompt_tokens"], t_off["ttft_s"], t_on["ttft_s"], t_on["cached_tokens"]]
        + [t_off["ttft_s"] / t_on["ttft_s"]]
        for k, (t_off, t_on) in enumerate(zip(off["turns"], on["turns"], strict=True))
    ]
    r_off, r_on = off["resend"], on["resend"]
    rows.append(
        ["last, resent", r_on["prompt_tokens"], r_off["ttft_s"], r_on["ttft_s"], r_on["cached_tokens"]]
    )
    rows[-1].append(r_off["ttft_s"] / r_on["ttft_s"])
    ratios = {name: _ratios(run) for name, run in result["runs"].items()}
    n = len(on["turns"])
    return "\n".join(
        [
            f"ShareGPT conversation `{result['conversation_id']}` ({'one' if p.get('like') else 'the first'} among "
            f"the 10,000 ids with {n} turns "
            f"whose last renders to {p['min_tokens']}-{p['max_tokens']} tokens{_shape_text(p)}), each turn sending the history "
            f"with the dataset's own answers, greedy, {p['output_tokens']} output tokens, through the official "
            f"`openai` client on `{p['config']}` served locally, after a warm-up call; caching on, then off "
            "(a fresh cluster each). TTFT at the client.",
            "",
            markdown_table(header, rows),
            "",
            f"Turn {n} over turn 2: on {ratios['caching on'][0]:.2f}x, off {ratios['caching off'][0]:.2f}x. "
            f"Resent turn {n} over turn {n}: on {ratios['caching on'][1]:.2f}x, off {ratios['caching off'][1]:.2f}x. "
            + _repeats_text(result, n)
            + _flops_text(result, n)
            + f"Load average before / after: on {on['load_average'][0][0]:.2f} / {on['load_average'][1][0]:.2f}, "
            f"off {off['load_average'][0][0]:.2f} / {off['load_average'][1][0]:.2f}.",
            "",
            provenance(result),
        ]
    )


def _shape_text(params: dict[str, Any]) -> str:
    ratio, like = params.get("new_token_ratio"), params.get("like")
    text = "" if ratio is None else f" and whose last turn adds within {ratio:g}x of turn 2's new tokens"
    if like:
        tokens = ", ".join(f"{n:,} at turn {t}" for t, n in like.items())
        text += f"; of those, the one whose prompt tokens are nearest {tokens}"
    return text


def _flops_text(result: dict[str, Any], n: int) -> str:
    flops = result.get("prefill_flops")
    if not flops:
        return ""
    return (
        f"The model's prefill FLOPs (2 per layer parameter and token plus causal attention, from each turn's "
        f"prompt and cached tokens): turn {n} {flops[-1] / 1e9:.0f} G against turn 2's {flops[1] / 1e9:.0f} G, "
        f"{flops[-1] / flops[1]:.2f}x: a turn-{n} TTFT within {TARGET_LAST_OVER_SECOND}x of turn 2's needs "
        "the engine to spend less per FLOP on the longer turn. "
    )


def _repeats_text(result: dict[str, Any], n: int) -> str:
    repeats = result.get("caching_on_repeats", [])
    if not repeats:
        return ""
    ratios = _caching_on_ratios(result)
    return (
        f"Caching on was served {len(ratios)} times, a fresh cluster each (the table shows the first): turn {n} "
        f"over turn 2 {', '.join(f'{r[0]:.2f}' for r in ratios)}x (median "
        f"{statistics.median(r[0] for r in ratios):.2f}x); TTFT by turn in the repeats: "
        + "; ".join(", ".join(f"{t['ttft_s']:.2f}" for t in r["turns"]) + " s" for r in repeats)
        + ". "
    )


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "conversation-probe", help="one conversation's TTFT per turn over the OpenAI API, caching on and off"
    )
    p.add_argument("--model", required=True, help="checkpoint directory with a chat template")
    p.add_argument("--config", default="deploy/serve-local.yaml", help="the Serve config served")
    p.add_argument("--turns", type=int, default=6, help="turns sent (then the last again)")
    p.add_argument("--min-tokens", type=int, default=1200, help="the last turn's least rendered tokens")
    p.add_argument("--max-tokens", type=int, default=1800, help="the last turn's most rendered tokens")
    p.add_argument("--output-tokens", type=int, default=4, help="tokens generated a turn (greedy)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    p.add_argument(
        "--new-token-ratio",
        type=float,
        help="pick a conversation whose last turn adds within this factor of turn 2's new tokens "
        "(the issue's conversation adds about as many at each)",
    )
    p.add_argument(
        "--like",
        type=parse_shape,
        help="TURN:TOKENS,...: of the conversations that qualify, the one whose prompt tokens by turn are nearest "
        "these (the issue's conversation: "
        + ",".join(f"{t}:{n}" for t, n in ISSUE_PROMPT_TOKENS.items())
        + ")",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="times caching on is served (the targets take the median)"
    )
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_conversation_probe)
