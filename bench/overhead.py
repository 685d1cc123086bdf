"""What the serving path costs per request, measured one request at a time in one run (``bench serve``).

- ``measure_overhead``: the ingress path (gRPC proxy, intake, predict, route) against a direct call to
  the engine replica of the same bin.
- ``measure_http_overhead``: the OpenAI HTTP API against gRPC for the same prompts, alternating which
  goes first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from bench.request_stats import percentile
from bench.workload import WorkloadRequest
from cluster.client import GenerationClient, make_request


async def measure_overhead(
    address: str, requests: Sequence[WorkloadRequest], application: str, num_output_tokens: int = 32
) -> dict[str, Any]:
    """The ingress path's cost per request: the same prompts, one at a time, through gRPC (proxy,
    ingress: tokenize, predict, route) and straight to the engine replica of the same bin; both stream
    ``num_output_tokens`` forced tokens. Needs ``ray.init`` connected to the serving cluster."""
    from ray import serve

    from cluster.app import pool_name
    from pipeline.request import NewRequest, SamplingParams

    async with GenerationClient(address) as client:
        info = await client.model_info()
        pools = [
            serve.get_deployment_handle(pool_name(p), app_name=application) for p in range(info.num_pools)
        ]
        pools = [pool.options(stream=True) for pool in pools]
        rows = []
        for i, request in enumerate(requests):
            proto = make_request(request.prompt, max_tokens=num_output_tokens, ignore_eos=True)
            via_ingress = await client.generate_timed(proto, stream=True)
            reply = via_ingress.response
            direct = NewRequest(
                f"overhead-{i}-{time.monotonic_ns()}",
                request.prompt_token_ids,
                SamplingParams(max_tokens=num_output_tokens, ignore_eos=True),
                reply.predicted_output_tokens,
                reply.bin,
            )
            start_s, token_times_s = time.perf_counter(), []
            async for output in pools[info.pool_of_bin[reply.bin]].generate.remote(direct):
                token_times_s += [time.perf_counter()] * len(output.new_token_ids)
            direct_ttft_s = token_times_s[0] - start_s
            direct_tbt_s = (token_times_s[-1] - token_times_s[0]) / max(1, len(token_times_s) - 1)
            rows.append(
                (
                    via_ingress.ttft_s,
                    statistics.fmean(via_ingress.tbt_s),
                    direct_ttft_s,
                    direct_tbt_s,
                    reply.predict_s,
                )
            )
    ingress_ttft, ingress_tbt, direct_ttft, direct_tbt, predict = (
        list(col) for col in zip(*rows, strict=True)
    )
    return {
        "num_calls": len(rows),
        "num_output_tokens": num_output_tokens,
        "p50_ttft_via_ingress_s": percentile(ingress_ttft, 50),
        "p50_ttft_direct_s": percentile(direct_ttft, 50),
        "p50_ttft_overhead_s": percentile(
            [a - b for a, b in zip(ingress_ttft, direct_ttft, strict=True)], 50
        ),
        "p50_predict_s": percentile(predict, 50),
        "mean_tbt_via_ingress_s": statistics.fmean(ingress_tbt),
        "mean_tbt_direct_s": statistics.fmean(direct_tbt),
    }


async def measure_http_overhead(
    address: str, http_url: str, requests: Sequence[WorkloadRequest], num_output_tokens: int = 32
) -> dict[str, Any]:
    """The HTTP API's cost over gRPC: each prompt streamed once through each API, one call at a time,
    ``num_output_tokens`` forced greedy tokens, the API going first alternating; paired differences of
    time to first token and of the whole call, at the client."""
    import openai

    http = openai.AsyncOpenAI(base_url=f"{http_url.rstrip('/')}/v1", api_key="unused", max_retries=0)
    model_id = (await http.models.list()).data[0].id

    async def via_http(prompt: str) -> tuple[float, float]:
        start_s, first_s = time.perf_counter(), None
        stream = await http.completions.create(
            model=model_id,
            prompt=prompt,
            max_tokens=num_output_tokens,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for _ in stream:
            first_s = first_s or time.perf_counter()
        return first_s - start_s, time.perf_counter() - start_s

    async with GenerationClient(address) as client:

        async def via_grpc(prompt: str) -> tuple[float, float]:
            proto = make_request(prompt, max_tokens=num_output_tokens, temperature=0.0, ignore_eos=True)
            timed = await client.generate_timed(proto, stream=True)
            return timed.ttft_s, timed.latency_s

        await via_grpc(requests[0].prompt)  # warm both paths' connections
        await via_http(requests[0].prompt)
        rows = []
        for i, request in enumerate(requests):
            if i % 2 == 0:
                grpc_row, http_row = await via_grpc(request.prompt), await via_http(request.prompt)
            else:
                http_row, grpc_row = await via_http(request.prompt), await via_grpc(request.prompt)
            rows.append((*grpc_row, *http_row))
    await http.close()
    grpc_ttft, grpc_total, http_ttft, http_total = (list(col) for col in zip(*rows, strict=True))
    return {
        "num_calls": len(rows),
        "num_output_tokens": num_output_tokens,
        "p50_ttft_grpc_s": percentile(grpc_ttft, 50),
        "p50_ttft_http_s": percentile(http_ttft, 50),
        "p50_ttft_overhead_s": percentile([h - g for g, h in zip(grpc_ttft, http_ttft, strict=True)], 50),
        "p50_total_grpc_s": percentile(grpc_total, 50),
        "p50_total_http_s": percentile(http_total, 50),
        "p50_total_overhead_s": percentile([h - g for g, h in zip(grpc_total, http_total, strict=True)], 50),
    }


# ---- the report's section: alternating runs of ``bench serve`` compared (docs/results/<model>/ingress_overhead.json)

TITLE = "The ingress overhead: TTFT through the proxy and the ingress against a direct call, by predictor"
TARGET_OVERHEAD_MS = 5.0
"""Issue 21: the ingress path's TTFT overhead p50 <= 5 ms (``bench serve --overhead-calls``)."""


def summarise(runs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``runs``: (name, ``bench serve --json`` file) in the order they ran; per name, each run's overhead and
    predict p50 and their median over the name's runs."""
    import json
    from pathlib import Path

    rows = []
    for name, path in runs:
        overhead = json.loads(Path(path).read_text()).get("ingress_overhead")
        if overhead is None:
            raise ValueError(f"run: {path} has no ingress_overhead (run bench serve with --overhead-calls)")
        rows.append({"name": name, "file": str(path), **overhead})
    by_name: dict[str, Any] = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        by_name[name] = {
            "overhead_p50_ms": [round(r["p50_ttft_overhead_s"] * 1e3, 2) for r in mine],
            "predict_p50_ms": [round(r["p50_predict_s"] * 1e3, 2) for r in mine],
            "calls": [r["num_calls"] for r in mine],
            "median_overhead_ms": round(statistics.median(r["p50_ttft_overhead_s"] for r in mine) * 1e3, 2),
            "median_predict_ms": round(statistics.median(r["p50_predict_s"] for r in mine) * 1e3, 2),
        }
    return {"runs": rows, "by_name": by_name}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    best = min(result["by_name"], key=lambda n: result["by_name"][n]["median_overhead_ms"])
    figures = result["by_name"][best]
    return [
        {
            "target": f"ingress overhead p50 <= {TARGET_OVERHEAD_MS:g} ms (median of {len(figures['calls'])} runs, "
            f"the best configuration: {best}; its predictor's share {figures['median_predict_ms']:.1f} ms)",
            "value": figures["median_overhead_ms"],
            "threshold": TARGET_OVERHEAD_MS,
            "met": figures["median_overhead_ms"] <= TARGET_OVERHEAD_MS,
        }
    ]


def render(result: dict[str, Any]) -> str:
    from bench.experiments.harness import markdown_table, provenance

    rows = [
        [
            name,
            ", ".join(f"{x:.1f}" for x in f["overhead_p50_ms"]),
            f["median_overhead_ms"],
            ", ".join(f"{x:.1f}" for x in f["predict_p50_ms"]),
            ", ".join(str(c) for c in f["calls"]),
        ]
        for name, f in result["by_name"].items()
    ]
    return "\n".join(
        [
            "The ingress path's cost per request (`bench serve --overhead-calls`: TTFT through the gRPC proxy and "
            "the ingress minus a direct call to the same engine replica, one call at a time, p50 per run), "
            "configurations alternating run by run; 'predict' is what the ingress still waited for the "
            "prediction after its intake." + (f" Configurations: {result['notes']}." if result.get("notes") else ""),
            "",
            markdown_table(
                ["configuration", "overhead p50 of each run, ms", "median, ms", "predict p50 of each run, ms", "calls"],
                rows,
            ),
            "",
            provenance(result),
        ]
    )


def cmd_overhead_summary(args) -> int:
    from bench.experiments.harness import run_meta, this_command, write_json

    started = time.perf_counter()
    runs = []
    for item in args.run:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"run: expected NAME=FILE, got {item!r}")
        runs.append((name, path))
    result = summarise(runs)
    result["notes"] = args.notes
    result["targets"] = targets(result)
    result["meta"] = run_meta(this_command(), time.perf_counter() - started)
    write_json(args.json, result)
    print(render(result))
    return 0


def register(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "overhead-summary",
        help="compare alternating `bench serve --overhead-calls` runs of several configurations (JSON for the report)",
    )
    p.add_argument("--run", action="append", required=True, metavar="NAME=FILE", help="a run, in the order they ran")
    p.add_argument("--notes", default="", help="what the configurations were, in words")
    p.add_argument("--json", required=True)
    p.set_defaults(func=cmd_overhead_summary)
