"""Multi-turn conversations replayed against the engine, prefix caching on vs off (issue 22, item 4), or
against a served cluster once per replica routing rule (``--serve-config``: ``bench/conversation_routing.py``).

    binserve bench conversations --model .models/smollm2-135m-instruct --num-conversations 6 \\
        --json out/conversations.json

ShareGPT conversations (among the 10,000 ids every workload uses) replayed turn by turn through the real
engine in this process: a conversation arrives (Poisson arrivals), and each of its turns sends the whole
history so far, rendered with the model's chat template as a chat client does, the model's own earlier
answers (decoded to text) in place of ChatGPT's; after an answer the next turn waits a think time. The
same conversations run with prefix caching off and on, over one loaded model, and the greedy answers
must be identical. Reported: TTFT p50 of follow-up turns (turn >= 2) and of first turns, mean JCT,
throughput, the prefix hit rate in tokens, and how much of each resent history re-renders to exactly the
tokens the engine computed (a re-tokenized answer may differ from the generated tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time
from dataclasses import dataclass

from bench import write_report
from bench.request_stats import percentile, summarize
from bench.workload import poisson_arrivals, sharegpt_conversations
from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pipeline.engine import Engine, RequestMetrics
from pipeline.request import NewRequest, SamplingParams


@dataclass(frozen=True)
class Conversation:
    user_messages: tuple[str, ...]
    """The human turns, each cut to ``max_message_chars``."""
    answer_tokens: tuple[int, ...]
    """Each turn's most output tokens: ChatGPT's answer length under this tokenizer, capped."""
    arrival_s: float
    think_s: tuple[float, ...]
    """Seconds between an answer and the next turn."""


@dataclass(frozen=True)
class Turn:
    conversation: int
    index: int
    """0 for the first turn."""
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    metrics: RequestMetrics
    num_rerender_matching_tokens: int
    """Of the previous turn's prompt plus its generated answer, the leading tokens this turn's re-rendered
    prompt repeats exactly (all of them when re-tokenizing the answer gives the generated tokens)."""
    num_previous_tokens: int


def build_conversations(tokenizer, args: argparse.Namespace) -> list[Conversation]:
    rng = random.Random(args.seed)
    arrivals = poisson_arrivals(args.num_conversations, args.rate, args.seed)
    conversations = []
    for turns, arrival_s in zip(
        sharegpt_conversations(args.num_conversations, args.seed), arrivals, strict=True
    ):
        users = [t["value"][: args.max_message_chars] or "?" for t in turns if t["from"] == "human"]
        answers = [t["value"] for t in turns if t["from"] == "gpt"]
        num_turns = min(len(users), len(answers), args.max_turns)
        lengths = tokenizer(answers[:num_turns], add_special_tokens=False).input_ids
        conversations.append(
            Conversation(
                user_messages=tuple(users[:num_turns]),
                answer_tokens=tuple(max(1, min(len(n), args.max_output_tokens)) for n in lengths),
                arrival_s=arrival_s,
                think_s=tuple(rng.expovariate(1.0 / args.think_s) for _ in range(num_turns)),
            )
        )
    return conversations


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def replay_conversations(
    engine: Engine, tokenizer, conversations: list[Conversation], max_model_len: int
) -> list[Turn]:
    """Run every conversation to its last turn, or to the turn whose prompt and answer would not fit
    ``max_model_len``; in real time on the engine's clock."""
    start_s = engine.clock()
    ready_s = {c: conv.arrival_s for c, conv in enumerate(conversations)}  # each next turn's send time
    history: dict[int, list[dict]] = {c: [] for c in range(len(conversations))}
    previous: dict[int, tuple[int, ...]] = {}  # the last turn's prompt + generated tokens
    pending: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # request id -> (conversation, turn, prompt)
    output_ids: dict[str, list[int]] = {}
    turns: list[Turn] = []
    while ready_s or pending:
        now_s = engine.clock() - start_s
        for c in [c for c, t in ready_s.items() if t <= now_s]:
            conv, k, sent_s = conversations[c], len(history[c]) // 2, ready_s.pop(c)
            history[c].append({"role": "user", "content": conv.user_messages[k]})
            rendered = tokenizer.apply_chat_template(history[c], add_generation_prompt=True, return_dict=True)
            prompt = tuple(rendered["input_ids"])
            if len(prompt) + conv.answer_tokens[k] > max_model_len:
                continue  # the conversation ends here
            request_id = f"c{c}-t{k}"
            new = NewRequest(request_id, prompt, SamplingParams(max_tokens=conv.answer_tokens[k]))
            engine.add_request(new, arrival_s=start_s + sent_s)
            pending[request_id], output_ids[request_id] = (c, k, prompt), []
        outputs = engine.advance()
        if outputs is None:
            time.sleep(0.001)
            continue
        for out in outputs:
            output_ids[out.request_id].extend(out.new_token_ids)
            if out.metrics is None:
                continue
            c, k, prompt = pending.pop(out.request_id)
            answer = tuple(output_ids.pop(out.request_id))
            before = previous.get(c, ())
            turns.append(Turn(c, k, prompt, answer, out.metrics, _common_prefix(prompt, before), len(before)))
            previous[c] = prompt + answer
            text = tokenizer.decode(answer, skip_special_tokens=True)
            history[c].append({"role": "assistant", "content": text})
            conv = conversations[c]
            if k + 1 < len(conv.user_messages):
                ready_s[c] = out.metrics.finished_s - start_s + conv.think_s[k]
    return sorted(turns, key=lambda t: (t.conversation, t.index))


def summarize_turns(turns: list[Turn]) -> dict:
    follow_ups = [t for t in turns if t.index > 0]
    summary = summarize([t.metrics for t in turns])
    num_prompt = sum(t.metrics.num_prompt_tokens for t in turns)
    num_cached = sum(t.metrics.num_cached_tokens for t in turns)
    follow_prompt = sum(t.metrics.num_prompt_tokens for t in follow_ups)
    follow_cached = sum(t.metrics.num_cached_tokens for t in follow_ups)
    return {
        "num_turns": len(turns),
        "num_follow_up_turns": len(follow_ups),
        "ttft_p50_follow_up_s": percentile([t.metrics.ttft_s for t in follow_ups], 50),
        "ttft_p50_first_turn_s": percentile([t.metrics.ttft_s for t in turns if t.index == 0], 50),
        "ttft_mean_s": summary.mean_ttft_s,
        "mean_jct_s": summary.mean_jct_s,
        "makespan_s": summary.makespan_s,
        "output_tokens_per_s": summary.output_tokens_per_s,
        "prompt_tokens": num_prompt,
        "cached_prompt_tokens": num_cached,
        "hit_rate_tokens": num_cached / num_prompt if num_prompt else 0.0,
        "hit_rate_follow_up_tokens": follow_cached / follow_prompt if follow_prompt else 0.0,
    }


def rerender_agreement(turns: list[Turn]) -> dict:
    """Does a resent history re-render to the tokens the engine computed (prompt + generated answer)?"""
    follow_ups = [t for t in turns if t.index > 0]
    exact = [t for t in follow_ups if t.num_rerender_matching_tokens == t.num_previous_tokens]
    matching = sum(t.num_rerender_matching_tokens for t in follow_ups)
    total = sum(t.num_previous_tokens for t in follow_ups)
    return {
        "num_follow_up_turns": len(follow_ups),
        "num_exact": len(exact),
        "matching_fraction_tokens": matching / total if total else 0.0,
        "mean_tokens_lost": statistics.fmean(
            t.num_previous_tokens - t.num_rerender_matching_tokens for t in follow_ups
        )
        if follow_ups
        else 0.0,
    }


def offline_llm(args: argparse.Namespace):  # -> workers.llm.LLM
    """The engine both prefix-cache benchmarks run, from their shared flags (``--model``, ``--threads``, ...)."""
    import torch

    from workers.llm import LLM

    torch.set_num_threads(args.threads)
    return LLM(
        EngineConfig(
            ModelConfig(args.model, max_model_len=args.max_model_len),
            CacheConfig(kv_cache_bytes=args.kv_cache_bytes),
            SchedulerConfig(chunk_size=args.chunk_size, max_num_seqs=args.max_num_seqs),
        )
    )


def run(args: argparse.Namespace) -> dict:
    from bench.experiments.harness import run_meta, this_command
    from workers.llm import build_engine

    load_at_start, started_s = os.getloadavg(), time.perf_counter()
    llm = offline_llm(args)
    config = llm.config
    conversations = build_conversations(llm.tokenizer, args)
    runs: dict[str, list[Turn]] = {}
    rows = {}
    order = (("caching off", False), ("caching on", True))
    for name, caching in reversed(order) if args.caching_first else order:
        cache = dataclasses.replace(config.cache, enable_prefix_caching=caching)
        # A fresh scheduler (an empty cache) over the same loaded model.
        engine = build_engine(dataclasses.replace(config, cache=cache), llm.runner)
        load_before, cpu0 = os.getloadavg(), time.process_time()
        runs[name] = replay_conversations(engine, llm.tokenizer, conversations, args.max_model_len)
        rows[name] = summarize_turns(runs[name])
        # CPU seconds of this process: what the work cost, less disturbed by other processes than time.
        rows[name]["engine_cpu_s"] = time.process_time() - cpu0
        rows[name]["load_average_before"], rows[name]["load_average_after"] = load_before, os.getloadavg()
        print(name, rows[name], flush=True)
    off, on = runs["caching off"], runs["caching on"]
    identical = [(t.conversation, t.index, t.output_token_ids) for t in off] == [
        (t.conversation, t.index, t.output_token_ids) for t in on
    ]
    ratio = rows["caching off"]["ttft_p50_follow_up_s"] / rows["caching on"]["ttft_p50_follow_up_s"]
    report = {
        "params": {k: v for k, v in vars(args).items() if k != "func"},
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "load_average_start": load_at_start,
        "identical_greedy_outputs": identical,
        "rows": rows,
        "follow_up_ttft_p50_speedup": ratio,
        "throughput_ratio": rows["caching on"]["output_tokens_per_s"]
        / rows["caching off"]["output_tokens_per_s"],
        "engine_cpu_ratio_off_on": rows["caching off"]["engine_cpu_s"] / rows["caching on"]["engine_cpu_s"],
        "rerender": rerender_agreement(on),
        "turns": [
            {
                "conversation": t.conversation,
                "turn": t.index,
                "prompt_tokens": t.metrics.num_prompt_tokens,
                "output_tokens": t.metrics.num_output_tokens,
                "ttft_off_s": o.metrics.ttft_s,
                "ttft_on_s": t.metrics.ttft_s,
                "cached_tokens": t.metrics.num_cached_tokens,
                "rerender_matching_tokens": t.num_rerender_matching_tokens,
                "previous_tokens": t.num_previous_tokens,
            }
            for o, t in zip(off, on, strict=False)
        ],
    }
    report["meta"] = run_meta(this_command(), time.perf_counter() - started_s, round(load_at_start[0], 2))
    report["targets"] = targets(report)
    if not identical:
        print("caching changed a greedy answer: the outputs differ", flush=True)
    return report


def cmd_bench_conversations(args: argparse.Namespace) -> int:
    if args.serve_config is not None:
        return cmd_bench_conversation_routing(args)
    report = run(args)
    print(
        f"follow-up TTFT p50: off {report['rows']['caching off']['ttft_p50_follow_up_s']:.3f} s, "
        f"on {report['rows']['caching on']['ttft_p50_follow_up_s']:.3f} s "
        f"({report['follow_up_ttft_p50_speedup']:.2f}x); throughput {report['throughput_ratio']:.2f}x; "
        f"engine CPU off/on {report['engine_cpu_ratio_off_on']:.2f}x; "
        f"hit rate {report['rows']['caching on']['hit_rate_tokens']:.1%}; "
        f"identical outputs: {report['identical_greedy_outputs']}; load {report['load_average_start']}"
    )
    write_report(args.json, report)
    return 0 if report["identical_greedy_outputs"] else 1


def cmd_bench_conversation_routing(args: argparse.Namespace) -> int:
    """``--serve-config``: the conversations against a served cluster, once per ``--routing`` rule."""
    from bench.conversation_routing import run_routing, with_run
    from workers.checkpoint import load_tokenizer

    run = run_routing(args, build_conversations(load_tokenizer(args.model), args))
    for routing, row in run["rows"].items():
        print(
            f"{routing}: mean TTFT {row['ttft_mean_s']:.3f} s, mean JCT {row['mean_jct_s']:.3f} s, "
            f"hit rate {row['hit_rate_tokens']:.1%}, load {row['load_average']}"
        )
    write_report(args.json, with_run(args.json, run, args.append))
    return 0


# ---- the report's section (``binserve bench report`` renders docs/results/<model>/conversations.json) ----

TITLE = "Conversations on the engine: prefix caching off vs on"
TARGET_FOLLOW_UP_TTFT_SPEEDUP = 5.0


def targets(report: dict) -> list[dict]:
    speedup = report["follow_up_ttft_p50_speedup"]
    return [
        {
            "target": f"follow-up turns' TTFT p50 >= {TARGET_FOLLOW_UP_TTFT_SPEEDUP:.0f}x lower with caching, "
            "identical greedy outputs (engine)",
            "value": speedup,
            "threshold": TARGET_FOLLOW_UP_TTFT_SPEEDUP,
            "met": speedup >= TARGET_FOLLOW_UP_TTFT_SPEEDUP and report["identical_greedy_outputs"],
        }
    ]


def render(result: dict) -> str:
    from bench.experiments.harness import markdown_table, provenance

    header = ["prefix caching", "turns", "follow-up TTFT p50 (s)", "first-turn TTFT p50 (s)", "mean TTFT (s)"]
    header += [
        "mean JCT (s)",
        "output tokens/s",
        "hit rate (prompt tokens)",
        "follow-up hit rate",
        "engine CPU s",
    ]
    rows = [
        [
            name,
            row["num_turns"],
            row["ttft_p50_follow_up_s"],
            row["ttft_p50_first_turn_s"],
            row["ttft_mean_s"],
            row["mean_jct_s"],
            row["output_tokens_per_s"],
            row["hit_rate_tokens"],
            row["hit_rate_follow_up_tokens"],
            row["engine_cpu_s"],
        ]
        for name, row in result["rows"].items()
    ]
    p, rerender = result["params"], result["rerender"]
    return "\n".join(
        [
            f"{p['num_conversations']} ShareGPT conversations of up to {p['max_turns']} turns (Poisson arrivals "
            f"at {p['rate']}/s, think time {p['think_s']} s, answers of at most {p['max_output_tokens']} "
            f"tokens), greedy, through the engine in one process (chunk {p['chunk_size']}), the same "
            "conversations with caching off, then on:",
            "",
            markdown_table(header, rows),
            "",
            f"Follow-up TTFT p50 {result['follow_up_ttft_p50_speedup']:.2f}x lower with caching; throughput "
            f"{result['throughput_ratio']:.2f}x; identical greedy outputs: {result['identical_greedy_outputs']}. "
            f"Re-rendered histories repeat {rerender['matching_fraction_tokens']:.1%} of the tokens the engine "
            f"computed ({rerender['num_exact']} of {rerender['num_follow_up_turns']} follow-ups exactly; "
            f"{rerender['mean_tokens_lost']:.1f} tokens lost on average).",
            "",
            provenance(result),
        ]
    )


def add_workload_arguments(p: argparse.ArgumentParser, num_conversations: int) -> None:
    """The conversations' flags (``build_conversations``), shared with the served capacity sweep."""
    p.add_argument("--num-conversations", type=int, default=num_conversations)
    p.add_argument("--max-turns", type=int, default=6, help="most turns replayed per conversation")
    p.add_argument("--think-s", type=float, default=1.0, help="mean think time between turns (exponential)")
    p.add_argument("--max-message-chars", type=int, default=800, help="user messages are cut to this")
    p.add_argument(
        "--max-output-tokens",
        type=int,
        default=256,
        help="cap on each answer (greedy to EOS, at most ChatGPT's answer length)",
    )
    p.add_argument("--seed", type=int, default=0)


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "conversations", help="multi-turn ShareGPT conversations, prefix caching on vs off (real engine)"
    )
    p.add_argument("--model", required=True, help="checkpoint directory with a chat template")
    add_workload_arguments(p, num_conversations=6)
    p.add_argument("--rate", type=float, default=0.5, help="new conversations per second (Poisson)")
    p.add_argument("--max-model-len", type=int, default=2048, help="a turn that would not fit ends it")
    p.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--caching-first", action="store_true", help="run caching on before off (default after)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--serve-config",
        help="serve this config (one pool) and replay through gRPC, once per --routing rule, instead of "
        "the engine with caching off and on",
    )
    p.add_argument(
        "--routing",
        default="least_cost,prefix_affinity,least_predicted_work,power_of_two",
        help="with --serve-config: the pools.replica_routing rules to run, comma-separated, in this order",
    )
    p.add_argument(
        "--append", action="store_true", help="with --serve-config: keep the runs already in --json (repeats)"
    )
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_conversations)
