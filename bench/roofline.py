"""``binserve bench roofline``: the engine's decode step against this machine's own limits.

    binserve bench roofline --model .models/smollm2-135m-instruct --json roofline.json

It measures the machine first, on the threads torch will use: memory read bandwidth (the sum of a
tensor far larger than any cache) and the fp32 (or the model's dtype) matmul rate (large square
products). Then it times the engine's decode step, ``ModelRunner.forward_stage`` on a plan of ``batch``
single-token decodes at context ``--context`` (metadata, every layer, ``lm_head`` and sampling), and
divides the median step time by the step's roofline bound:

    bound_s = max(bytes_read / bandwidth, flops / matmul_rate)
    bytes_read = weights (all but the embedding table, of which only ``batch`` rows are read)
               + KV cache read (2 x layers x kv_heads x head_dim x context x batch x itemsize)
    flops = 2 x parameters x batch (the tied or separate lm_head counted once, as a matmul)
          + attention (4 x layers x heads x head_dim x context x batch: scores and weighted sum)

A ratio of 1.0 means the step runs at the machine's limit; the target is at most 1.3 at every batch.
Each batch also reports where one profiled step's operator time went (matmuls, the KV gather of the
paged cache, the attention kernel, everything else), which says what to fix when the ratio is high.
The KV cache holds random values (decode cost does not depend on them) in blocks scattered over the
pool in a seeded random order, as a long-running engine's free list leaves them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pipeline.config import CacheConfig, ModelConfig
from pipeline.plan import ScheduledChunk, StepPlan
from pipeline.request import SamplingParams

if TYPE_CHECKING:
    import torch

    from workers.runner import ModelRunner

DEFAULT_BATCHES: tuple[int, ...] = (1, 8, 32, 64)
TARGET_RATIO = 1.3


@dataclass(frozen=True)
class MachineLimits:
    read_bytes_per_s: float
    matmul_flops_per_s: float
    num_threads: int
    dtype: str


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    context_tokens: int
    step_s_min: float
    step_s_median: float
    bytes_read: int
    flops: int
    bound_s: float
    bound: str  # "memory" or "compute": which term of the max sets the bound
    ratio: float  # step_s_median / bound_s
    breakdown_fraction: dict[str, float]  # share of one profiled step's operator time by kind


# Operator kinds of a decode step, by the ATen names the profiler reports (the first match wins).
_OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("kv_gather", ("aten::index_select",)),
    ("attention", ("aten::_scaled_dot_product",)),
)


def _best_of(fn, num_rounds: int) -> float:  # noqa: ANN001 (a zero-argument callable)
    best = float("inf")
    for _ in range(num_rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_read_bandwidth(num_bytes: int = 1 << 30, num_rounds: int = 5) -> float:
    """Bytes per second that ``sum`` reads from a float32 tensor of ``num_bytes`` (beyond any cache)."""
    import torch

    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    x.sum()  # touch every page before timing
    return num_bytes / _best_of(x.sum, num_rounds)


def measure_matmul_rate(dtype: torch.dtype | None = None, size: int = 2048, num_rounds: int = 5) -> float:
    """FLOP/s of a ``size`` x ``size`` matrix product (the best this BLAS does on these threads)."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b
    return 2.0 * size**3 / _best_of(lambda: a @ b, num_rounds)


def measure_machine(dtype: torch.dtype) -> MachineLimits:
    import torch

    return MachineLimits(
        read_bytes_per_s=measure_read_bandwidth(),
        matmul_flops_per_s=measure_matmul_rate(dtype),
        num_threads=torch.get_num_threads(),
        dtype=str(dtype).removeprefix("torch."),
    )


def decode_plan(batch: int, context_tokens: int, block_size: int, num_blocks: int, seed: int = 0) -> StepPlan:
    """``batch`` decodes, each the token at position ``context_tokens - 1`` of its request, with block
    tables drawn from a shuffled pool (as a long-running engine's free list leaves them)."""
    blocks_per_request = -(-context_tokens // block_size)
    if batch * blocks_per_request > num_blocks:
        raise ValueError(
            f"batch: {batch} x {context_tokens} tokens need more than the pool's {num_blocks} blocks"
        )
    pool = list(range(num_blocks))
    random.Random(seed).shuffle(pool)
    greedy = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    chunks = tuple(
        ScheduledChunk(
            request_id=f"r{i}",
            token_ids=(1 + i % 100,),
            start_pos=context_tokens - 1,
            block_ids=tuple(pool[i * blocks_per_request : (i + 1) * blocks_per_request]),
            sampling=greedy,
            output_index=0,
            is_decode=True,
        )
        for i in range(batch)
    )
    return StepPlan(step_id=0, chunks=chunks)


def step_cost(runner: ModelRunner, batch: int, context_tokens: int) -> tuple[int, int]:
    """(bytes read, FLOPs) of one decode step of ``batch`` requests at ``context_tokens``."""
    from workers.model import head_dim_of

    config, stage = runner.hf_config, runner.stage
    itemsize = runner.dtype.itemsize
    num_layers = stage.layer_end - stage.layer_start
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = head_dim_of(config)
    num_params = sum(p.numel() for p in stage.parameters())
    weight_bytes = num_params * itemsize
    if stage.embed_tokens is not None:
        # A lookup reads ``batch`` rows of the table and does no arithmetic.
        table = stage.embed_tokens.weight
        num_params -= table.numel()
        weight_bytes -= (table.shape[0] - batch) * table.shape[1] * itemsize
    kv_bytes = 2 * num_layers * num_kv_heads * head_dim * context_tokens * batch * itemsize
    flops = 2 * num_params * batch + 4 * num_layers * num_heads * head_dim * context_tokens * batch
    return weight_bytes + kv_bytes, flops


def time_decode_steps(
    runner: ModelRunner, plan: StepPlan, num_steps: int, num_warmup: int = 2
) -> list[float]:
    for _ in range(num_warmup):
        runner.forward_stage(plan)
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        runner.forward_stage(plan)
        times.append(time.perf_counter() - start)
    return times


def step_breakdown(runner: ModelRunner, plan: StepPlan) -> dict[str, float]:
    """Share of one step's operator self time by kind (matmul, kv_gather, attention, other), from
    torch.profiler. The profiler slows the step; the shares, not the times, are the figure."""
    from torch.profiler import profile

    with profile() as prof:
        runner.forward_stage(plan)
    totals = dict.fromkeys([kind for kind, _ in _OP_KINDS] + ["other"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, prefixes in _OP_KINDS if event.key.startswith(prefixes)), "other")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {kind: t / whole for kind, t in totals.items()}


def build_runner(model_dir: str, max_batch: int, context_tokens: int, dtype: str, device: str) -> ModelRunner:
    import torch

    from workers.runner import ModelRunner

    block_size = CacheConfig().block_size
    num_blocks = max_batch * -(-context_tokens // block_size) + 1
    runner = ModelRunner(
        ModelConfig(model_dir, dtype=dtype, device=device), CacheConfig(num_blocks=num_blocks)
    )
    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(0)
        for cache in runner.kv_caches:
            cache.copy_(torch.randn(cache.shape, generator=generator).to(cache.dtype))
    return runner


def run_roofline(
    model_dir: str,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    context_tokens: int = 256,
    num_steps: int = 10,
    dtype: str = "auto",
    device: str = "auto",
) -> dict:
    runner = build_runner(model_dir, max(batches), context_tokens, dtype, device)
    if runner.device.type == "cuda":
        machine = measure_cuda_machine(runner.dtype, runner.device)
    else:
        machine = measure_machine(runner.dtype)
    print(
        f"machine: {machine.read_bytes_per_s / 1e9:.1f} GB/s read, "
        f"{machine.matmul_flops_per_s / 1e9:.1f} GFLOP/s {machine.dtype} matmul, {machine.num_threads} threads"
    )
    points = []
    for batch in batches:
        plan = decode_plan(batch, context_tokens, runner.block_size, runner.num_blocks)
        times = time_decode_steps(runner, plan, num_steps)
        bytes_read, flops = step_cost(runner, batch, context_tokens)
        memory_s = bytes_read / machine.read_bytes_per_s
        compute_s = flops / machine.matmul_flops_per_s
        bound_s = max(memory_s, compute_s)
        median_s = statistics.median(times)
        point = DecodePoint(
            batch=batch,
            context_tokens=context_tokens,
            step_s_min=min(times),
            step_s_median=median_s,
            bytes_read=bytes_read,
            flops=flops,
            bound_s=bound_s,
            bound="memory" if memory_s >= compute_s else "compute",
            ratio=median_s / bound_s,
            breakdown_fraction=step_breakdown(runner, plan),
        )
        points.append(point)
        shares = ", ".join(f"{kind} {share:.0%}" for kind, share in point.breakdown_fraction.items())
        print(
            f"batch {batch:3d}: step {median_s * 1e3:7.1f} ms (min {min(times) * 1e3:.1f}), "
            f"bound {bound_s * 1e3:6.1f} ms ({point.bound}), ratio {point.ratio:.2f}x; {shares}"
        )
    return {
        "model": model_dir,
        "device": str(runner.device),
        "machine": asdict(machine),
        "target_ratio": TARGET_RATIO,
        "points": [asdict(p) for p in points],
        "max_ratio": max(p.ratio for p in points),
    }


def measure_cuda_machine(dtype: torch.dtype, device: torch.device) -> MachineLimits:
    """The same two figures on a CUDA device: a device-resident read and a large matmul."""
    import torch

    def timed(fn, num_rounds: int = 5) -> float:  # noqa: ANN001
        fn()
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(num_rounds):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    num_bytes = 4 << 30
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    read = num_bytes / timed(x.sum)
    del x
    size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    rate = 2.0 * size**3 / timed(lambda: a @ b)
    return MachineLimits(read, rate, 0, str(dtype).removeprefix("torch."))


def cmd_bench_roofline(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run_roofline(
        args.model,
        batches=tuple(args.batches),
        context_tokens=args.context,
        num_steps=args.steps,
        dtype=args.dtype,
        device=args.device,
    )
    verdict = "met" if report["max_ratio"] <= TARGET_RATIO else "missed"
    print(f"worst ratio {report['max_ratio']:.2f}x (target {TARGET_RATIO}x): {verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    from pipeline.config_flags import positive_int

    p = bench_subparsers.add_parser(
        "roofline", help="decode step time against this machine's bandwidth and matmul limits"
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument(
        "--batches", type=positive_int, nargs="+", default=list(DEFAULT_BATCHES), help="decode batch sizes"
    )
    p.add_argument("--context", type=positive_int, default=256, help="context tokens of every decode")
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per batch (after 2 warm-up)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch intra-op threads (CPU; default: torch's)"
    )
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=cmd_bench_roofline)
