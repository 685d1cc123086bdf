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
