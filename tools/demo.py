"""``make demo``: the served system on this machine, end to end, in a couple of minutes.

1. Writes the tiny seeded checkpoint if it is missing.
2. Starts a local Ray cluster and deploys ``deploy/serve-local.yaml`` the way ``binserve serve`` does:
   Serve's gRPC proxy, the ingress, the global length predictor and two engine pools (one per bin),
   each replica a two-stage pipeline scheduling SSJF-first with SARATHI batches.
3. Sends a few dozen concurrent gRPC requests, half unary and half streaming: ShareGPT prompts with their
   real output lengths forced (built-in prompts when the shared data is absent), at Poisson arrivals.
4. Prints each request's bin, predicted and actual output tokens, TTFT and TBT, then a summary, and
   shuts the cluster down.

(Random weights: the text is noise; the tokens, predictions, routing, batching and timings are real.)
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

SERVE_LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "serve-local.yaml"
NUM_REQUESTS = 32
RATE_PER_S = 8.0
MAX_PROMPT_TOKENS = 192
MAX_OUTPUT_TOKENS = 256
BUILTIN_PROMPTS = [
    ("Hello! Who are you?", 12),
    ("List five prime numbers.", 16),
    ("Translate 'good morning' into French, German and Spanish.", 24),
    ("Write a haiku about paged attention.", 20),
    ("Explain why shortest-job-first scheduling lowers mean completion time.", 90),
    ("Summarise the plot of Hamlet in two sentences.", 48),
    ("Write a detailed essay on the history of the printing press and its effects on Europe.", 128),
    ("Write a long story about a lighthouse keeper who befriends a whale, in several chapters.", 120),
    ("What is 17 times 23?", 8),
    ("Describe, step by step, how to set up a Python project with tests, linting and CI.", 110),
]


def _workload(model_dir: str):
    from bench.serve import load_workload
    from bench.workload import WorkloadRequest, poisson_arrivals, with_arrivals

    try:
        requests = load_workload(model_dir, NUM_REQUESTS, 0, MAX_PROMPT_TOKENS, MAX_OUTPUT_TOKENS)
        source = f"ShareGPT prompts with their real output lengths, at most {MAX_OUTPUT_TOKENS} tokens"
    except ValueError:  # no ../shared/data here
        requests = [
            WorkloadRequest(prompt, (), length)
            for prompt, length in BUILTIN_PROMPTS * (NUM_REQUESTS // len(BUILTIN_PROMPTS) + 1)
        ][:NUM_REQUESTS]
        source = "built-in prompts"
    return with_arrivals(requests, poisson_arrivals(len(requests), RATE_PER_S, seed=0)), source


def _print_table(results) -> None:
    print(
        f"\n{'#':>3} {'mode':<6} {'bin':>3} {'predicted':>9} {'actual':>6} {'TTFT ms':>8} {'TBT ms':>7} {'JCT s':>6}"
    )
    for i, served in enumerate(results):
        mode = "stream" if served.is_stream else "unary"
        if served.timed is None:
            print(f"{i:>3} {mode:<6} failed: {served.error}")
            continue
        reply, timed = served.timed.response, served.timed
        n = reply.usage.num_output_tokens
        # TTFT as the ingress saw it (send to first token, for both modes); TBT as the client saw the stream,
        # or for a unary call the ingress's mean gap (its tokens reach the client all at once).
        tbt_s = sum(timed.tbt_s) / len(timed.tbt_s) if served.is_stream and timed.tbt_s else None
        if tbt_s is None and n > 1:
            tbt_s = (reply.total_s - reply.ttft_s) / (n - 1)
        tbt = f"{tbt_s * 1e3:7.1f}" if tbt_s is not None else f"{'-':>7}"
        print(
            f"{i:>3} {mode:<6} {reply.bin:>3} {reply.predicted_output_tokens:>9} {n:>6} "
            f"{reply.ttft_s * 1e3:>8.1f} {tbt} {timed.latency_s:>6.2f}"
        )


def _print_summary(result: dict, stats: list, wall_s: float) -> None:
    s = result["summary"]
    print(
        f"\n{s['num_requests']} requests in {wall_s:.1f} s: {s['output_tokens_per_s']:.0f} output tokens/s, "
        f"{s['requests_per_s']:.2f} requests/s"
    )
    print(
        f"TTFT p50 {s['p50_ttft_s'] * 1e3:.0f} ms, p90 {s['p90_ttft_s'] * 1e3:.0f} ms (streams) | "
        f"TBT p50 {s['p50_tbt_s'] * 1e3:.1f} ms, p90 {s['p90_tbt_s'] * 1e3:.1f} ms (streams) | "
        f"JCT p50 {s['p50_jct_s']:.2f} s, p90 {s['p90_jct_s']:.2f} s"
    )
    for bin_id, b in result["bins"].items():
        print(
            f"bin {bin_id}: {b['num_requests']} requests, predicted {b['mean_predicted_output_tokens']:.0f} "
            f"tokens on average, generated {b['mean_output_tokens']:.0f}, JCT p50 {b['p50_jct_s']:.2f} s"
        )
    print(f"mean |predicted - actual| output tokens: {result['mean_abs_prediction_error_tokens']:.0f}")
    for st in stats:
        print(
            f"engine pool {st.pool_id}: served bins {st.num_requests_by_bin}, {st.pp_size} pipeline stages, "
            f"{st.num_free_kv_blocks}/{st.num_kv_blocks} KV blocks free"
        )
    if result["failures"]:
        print(f"failures: {result['failures']}")


def run_demo(args: argparse.Namespace) -> int:
    import logging

    import yaml
    from ray import serve
    from tqdm import tqdm

    from bench.serve import replay, report
    from cluster.app import pool_name
    from cluster.config import AppConfig
    from tools.serve_cli import serving_locally
    from workers.tiny_model import make_tiny_model

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"writing the tiny seeded checkpoint to {model_dir} ...", flush=True)
        make_tiny_model(model_dir)
    app_config = AppConfig.from_args(yaml.safe_load(SERVE_LOCAL.read_text())["applications"][0]["args"])
    print(
        f"starting a local Ray cluster and deploying {SERVE_LOCAL.name}: {app_config.router.num_bins} bins, "
        f"pp_size {app_config.engine.parallel.pp_size}, SSJF queues (about a minute) ...",
        flush=True,
    )
    start_s = time.perf_counter()
    with serving_locally(SERVE_LOCAL, str(model_dir)) as address:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this driver's handle chatter
        print(f"serving gRPC on {address} after {time.perf_counter() - start_s:.0f} s", flush=True)
        requests, source = _workload(str(model_dir))
        is_stream = [i % 2 == 1 for i in range(len(requests))]
        print(f"sending {len(requests)} requests ({source}) at {RATE_PER_S:.0f}/s, half of them streamed")
        with tqdm(total=len(requests), unit="req", desc="requests") as bar:
            num_tokens = [0]

            def on_done(served) -> None:
                num_tokens[0] += served.timed.response.usage.num_output_tokens if served.timed else 0
                bar.set_postfix(output_tokens=num_tokens[0], refresh=False)
                bar.update()

            start_s = time.perf_counter()
            results = asyncio.run(replay(address, requests, is_stream, on_done))
            wall_s = time.perf_counter() - start_s
        _print_table(results)
        handles = [
            serve.get_deployment_handle(pool_name(p), "binserve")
            for p in range(app_config.router.resolved_num_pools)
        ]
        _print_summary(report(results), [h.stats.remote().result() for h in handles], wall_s)
        print(
            "\n(random weights: the text is noise; the predictions, routing, batching and timings are real)"
        )
        print("shutting the cluster down ...", flush=True)
    return 0
