"""``binserve bench serve``: ShareGPT-shaped requests through the served system's gRPC API.

    binserve bench serve --config deploy/serve-local.yaml --num-requests 100 --rate 2 --json out/serve.json
    binserve bench serve --address 127.0.0.1:9000 --num-requests 200 --rate 4      # a running binserve

Every request is a real ShareGPT prompt with its real response length forced (``ignore_eos`` and
``max_tokens``), sent at Poisson arrival times; times are taken at the client (arrival = send), so
they include the gRPC proxy, the ingress (tokenize, predict, route) and the engine.

It also measures what the ingress path costs (with ``--config``, which makes this process the cluster's
driver, or ``--ray-address``): the same prompts sent one at a time through gRPC and straight to the
engine replica of the same bin (``EnginePool.generate`` through a handle), compared on time to first
token and time between tokens. And what the HTTP API costs over gRPC (with ``--config``, or
``--http-url``): the same prompts, one at a time, streamed through the OpenAI API (``/v1/completions``,
the official ``openai`` client) and through gRPC, alternating which goes first, in the same run:

    binserve bench serve --config deploy/serve-local.yaml --num-requests 20 --http-overhead-calls 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.request_stats import percentile, summarize
from bench.workload import DEFAULT_SHAREGPT, WorkloadRequest, poisson_arrivals, with_arrivals
from cluster.client import GenerationClient, TimedResponse, make_request
from pipeline.engine import RequestMetrics
from proto.binserve.v1 import generation_pb2 as pb


@dataclass(frozen=True)
class ServedRequest:
    request: WorkloadRequest
    is_stream: bool
    timed: TimedResponse | None
    """None when the call failed."""
    error: str | None = None
    """The gRPC status name of a failed call."""


def client_metrics(served: ServedRequest) -> RequestMetrics:
    """A finished call in the engine's metric shape, on the client's clock (arrival = send)."""
    timed, response = served.timed, served.timed.response
    return RequestMetrics(
        arrival_s=timed.start_s,
        admitted_s=None,
        token_times_s=timed.token_times_s,
        finished_s=timed.end_s,
        num_prompt_tokens=response.usage.num_prompt_tokens,
        num_output_tokens=response.usage.num_output_tokens,
        num_preemptions=0,
        predicted_output_tokens=response.predicted_output_tokens,
        bin_id=response.bin,
    )


def forced_length_request(request: WorkloadRequest, index: int) -> pb.GenerateRequest:
    """The prompt text with its output length forced (``ignore_eos``): the default of ``replay``."""
    del index
    return make_request(request.prompt, max_tokens=request.output_tokens, ignore_eos=True)


async def replay(
    address: str,
    requests: Sequence[WorkloadRequest],
    is_stream: Sequence[bool],
    on_done: Callable[[ServedRequest], None] | None = None,
    timeout_s: float | None = 600.0,
    build_request: Callable[[WorkloadRequest, int], pb.GenerateRequest] = forced_length_request,
) -> list[ServedRequest]:
    """Send each request at its ``arrival_s`` (seconds after the start) as ``build_request(request,
    index)`` makes it (by default with its output length forced); results in request order."""
    async with GenerationClient(address) as client:
        await client.wait_ready()
        start_s = time.perf_counter()

        async def one(index: int, request: WorkloadRequest, stream: bool) -> ServedRequest:
            await asyncio.sleep(max(0.0, start_s + request.arrival_s - time.perf_counter()))
            proto = build_request(request, index)
            try:
                served = ServedRequest(request, stream, await client.generate_timed(proto, stream, timeout_s))
            except grpc.aio.AioRpcError as exc:
                served = ServedRequest(request, stream, None, exc.code().name)
            if on_done is not None:
                on_done(served)
            return served

        calls = (one(i, r, s) for i, (r, s) in enumerate(zip(requests, is_stream, strict=True)))
        return list(await asyncio.gather(*calls))


def report(results: Sequence[ServedRequest]) -> dict[str, Any]:
    """Throughput and latency percentiles (``bench.request_stats``), per bin, and prediction error."""
    done = [r for r in results if r.timed is not None]
    if not done:
        raise ValueError("results: no call succeeded")
    records = [client_metrics(r) for r in done]
    summary = summarize(records).as_dict()  # throughput and JCT over every call
    del summary["mean_queueing_s"]  # admission happens inside the engine, out of the client's sight
    jct = [m.completion_s for m in records]
    summary["p90_jct_s"] = percentile(jct, 90)
    # A unary reply's tokens arrive together: time to first token and between tokens come from streams.
    streams = [m for r, m in zip(done, records, strict=True) if r.is_stream]
    ttft = [m.ttft_s for m in streams if m.ttft_s is not None]
    tbt = [gap for m in streams for gap in m.tbt_s]
    for name, values in (("ttft", ttft), ("tbt", tbt)):
        for q in (50, 90, 99):
            summary[f"p{q}_{name}_s"] = percentile(values, q)
    summary["mean_ttft_s"] = statistics.fmean(ttft) if ttft else math.nan
    by_bin: dict[int, list[RequestMetrics]] = {}
    for m in records:
        by_bin.setdefault(m.bin_id, []).append(m)
    errors = [abs(m.predicted_output_tokens - m.num_output_tokens) for m in records]
    return {
        "summary": summary,
        "bins": {
            str(b): {
                "num_requests": len(ms),
                "mean_predicted_output_tokens": statistics.fmean(m.predicted_output_tokens for m in ms),
                "mean_output_tokens": statistics.fmean(m.num_output_tokens for m in ms),
                "p50_jct_s": percentile([m.completion_s for m in ms], 50),
            }
            for b, ms in sorted(by_bin.items())
        },
        "mean_abs_prediction_error_tokens": statistics.fmean(errors),
        "failures": {
            code: sum(r.error == code for r in results) for code in {r.error for r in results} if code
        },
    }


def load_workload(
    model_dir: str,
    num_requests: int,
    seed: int = 0,
    max_prompt_tokens: int = 512,
    max_output_tokens: int = 256,
    data: str | Path = DEFAULT_SHAREGPT,
) -> list[WorkloadRequest]:
    """ShareGPT requests (``sharegpt_requests``) whose prompt text is cut to ``max_prompt_tokens`` of the
    served model's tokenizer, since the server tokenizes the text itself."""
    from dataclasses import replace

    from bench.workload import sharegpt_requests
    from workers.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    requests = sharegpt_requests(tokenizer, num_requests, seed, max_prompt_tokens, max_output_tokens, data)
    return [
        replace(r, prompt=tokenizer.decode(r.prompt_token_ids, skip_special_tokens=True) or "x")
        for r in requests
    ]


def run_bench(
    address: str, requests: Sequence[WorkloadRequest], args: argparse.Namespace, http_url: str | None = None
) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=len(requests), desc="binserve over gRPC", unit="req") as bar:
        results = asyncio.run(
            replay(address, requests, [not args.unary] * len(requests), lambda _: bar.update())
        )
    result: dict[str, Any] = {
        "workload": {
            "num_requests": len(requests),
            "rate_per_s": args.rate,
            "is_stream": not args.unary,
            "max_prompt_tokens": args.max_prompt_tokens,
            "max_output_tokens": args.max_output_tokens,
        },
        **report(results),
    }
    from bench.overhead import measure_http_overhead, measure_overhead

    if args.overhead_calls > 0 and (args.config is not None or args.ray_address is not None):
        sample = requests[: args.overhead_calls]
        result["ingress_overhead"] = asyncio.run(measure_overhead(address, sample, args.application))
    if args.http_overhead_calls > 0 and http_url is not None:
        sample = [requests[i % len(requests)] for i in range(args.http_overhead_calls)]
        result["http_overhead"] = asyncio.run(measure_http_overhead(address, http_url, sample))
    return result


def print_result(result: dict[str, Any]) -> None:
    s = result["summary"]
    print(
        f"{s['output_tokens_per_s']:.1f} output tokens/s, {s['requests_per_s']:.2f} requests/s; "
        f"TTFT p50 {s['p50_ttft_s'] * 1e3:.0f} ms p99 {s['p99_ttft_s'] * 1e3:.0f} ms; "
        f"TBT p50 {s['p50_tbt_s'] * 1e3:.1f} ms p99 {s['p99_tbt_s'] * 1e3:.1f} ms; "
        f"JCT p50 {s['p50_jct_s']:.2f} s p99 {s['p99_jct_s']:.2f} s"
    )
    if "ingress_overhead" in result:
        o = result["ingress_overhead"]
        print(
            f"ingress path: TTFT p50 {o['p50_ttft_via_ingress_s'] * 1e3:.1f} ms vs {o['p50_ttft_direct_s'] * 1e3:.1f} ms "
            f"direct (overhead p50 {o['p50_ttft_overhead_s'] * 1e3:.1f} ms, of which predict "
            f"{o['p50_predict_s'] * 1e3:.1f} ms); TBT {o['mean_tbt_via_ingress_s'] * 1e3:.2f} ms vs "
            f"{o['mean_tbt_direct_s'] * 1e3:.2f} ms"
        )
    if "http_overhead" in result:
        h = result["http_overhead"]
        print(
            f"HTTP API over gRPC ({h['num_calls']} calls each, same prompts, same run): TTFT p50 "
            f"{h['p50_ttft_http_s'] * 1e3:.1f} ms vs {h['p50_ttft_grpc_s'] * 1e3:.1f} ms (overhead p50 "
            f"{h['p50_ttft_overhead_s'] * 1e3:.1f} ms); whole call p50 {h['p50_total_http_s'] * 1e3:.1f} ms vs "
            f"{h['p50_total_grpc_s'] * 1e3:.1f} ms (overhead p50 {h['p50_total_overhead_s'] * 1e3:.1f} ms)"
        )


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from cluster.local import serving_locally_at

    if (args.address is None) == (args.config is None):
        raise ValueError(
            "address: give --address (a running binserve) or --config (start one here), one of them"
        )
    requests = load_workload(
        args.model_dir,
        args.num_requests,
        args.seed,
        args.max_prompt_tokens,
        args.max_output_tokens,
        args.data,
    )
    if args.rate != float("inf"):
        requests = with_arrivals(requests, poisson_arrivals(len(requests), args.rate, args.seed))
    if args.config is not None:
        with serving_locally_at(args.config, args.model_dir) as addresses:
            result = run_bench(addresses.grpc, requests, args, addresses.http)
    else:
        if args.ray_address is not None:
            import ray
            from ray.serve._private.constants import SERVE_NAMESPACE

            ray.init(address=args.ray_address, namespace=SERVE_NAMESPACE, log_to_driver=False)
        result = run_bench(args.address, requests, args, args.http_url)
    print_result(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_finite(result), indent=2))
        print(f"wrote {args.json}")
    return 0


def _finite(value: Any) -> Any:
    """Strict JSON: an infinite rate or a percentile of no values (NaN) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("serve", help="ShareGPT-shaped requests through gRPC at a Poisson rate")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="HOST:PORT of a running binserve's gRPC proxy")
    where.add_argument("--config", help="start a local cluster from this Serve config, run, shut it down")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--rate", type=float, default=4.0, help="requests/s, Poisson arrivals; inf: all at once")
    p.add_argument(
        "--model-dir", default=".models/tiny-llama", help="the served checkpoint (for its tokenizer)"
    )
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--data", default=str(DEFAULT_SHAREGPT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unary", action="store_true", help="unary calls instead of streams (no TBT)")
    p.add_argument(
        "--ray-address", help="with --address: the Ray cluster, to also measure the ingress overhead"
    )
    p.add_argument(
        "--overhead-calls", type=int, default=20, help="calls timing the ingress overhead (0: skip)"
    )
    p.add_argument("--application", default="binserve", help="the Serve application's name")
    p.add_argument("--http-url", help="with --address: the HTTP proxy's URL, to measure the HTTP API's cost")
    p.add_argument(
        "--http-overhead-calls",
        type=int,
        default=20,
        help="sequential calls through each API measuring the HTTP API's cost over gRPC (0: skip)",
    )
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_serve)
