"""The decode step against the device's limits, and what the step is made of.

- ``device_limits``: the read bandwidth (a device-resident ``sum`` far larger than any cache) and the
  matmul rate this device reaches, plus the HBM's datasheet peak where the device is known;
- ``roofline_fractions``: for the measured decode cells at the plan's roofline batches, the step's bytes
  (weights, plus the KV it reads: ``bench.roofline.step_cost``) over the bandwidth, as a fraction of the
  step time (1.0: the step runs at the HBM's speed) and as the ratio the issue's target is stated in;
- ``step_breakdown``: one step under ``torch.profiler``, its time split by the outermost ATen op that
  spent it: matmul, kv_gather (the paged cache's ``index_select``), kv_write (``index_copy_``), attention
  (SDPA), sampling (argmax / top-k / softmax / multinomial), other device work (norms, RoPE, SiLU,
  copies), and ``python``: the step's wall time not covered by any op (on a GPU: the device idles while
  Python prepares metadata and launches kernels). The profiler slows the step; the shares are the figure.
"""

from __future__ import annotations

import time

import torch

from bench.roofline import MachineLimits, measure_cuda_machine, measure_matmul_rate, measure_read_bandwidth

# Datasheet HBM bandwidth by the first matching fragment of ``torch.cuda.get_device_name()``.
PEAK_READ_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5, HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
)
TARGET_RATIO_BATCH_1 = 1.5
"""The 8B decode step at batch 1 should take at most this many times its HBM roofline bound."""

_OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::linear", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("kv_gather", ("aten::index_select",)),
    ("kv_write", ("aten::index_copy",)),
    (
        "attention",
        ("aten::scaled_dot_product", "aten::_scaled_dot_product", "aten::_flash", "aten::_efficient"),
    ),
    ("sampling", ("aten::argmax", "aten::topk", "aten::softmax", "aten::multinomial", "aten::sort")),
)


def peak_read_bytes_per_s(device_name: str) -> float | None:
    return next((rate for fragment, rate in PEAK_READ_BYTES_PER_S if fragment in device_name), None)


def device_limits(device: torch.device, dtype: torch.dtype, is_smoke: bool) -> MachineLimits:
    if device.type == "cuda":
        return measure_cuda_machine(dtype, device)
    # A CPU only in the smoke run: small sizes, so the check's path runs in a moment.
    return MachineLimits(
        read_bytes_per_s=measure_read_bandwidth(64 << 20 if is_smoke else 1 << 30, num_rounds=3),
        matmul_flops_per_s=measure_matmul_rate(dtype, size=256 if is_smoke else 2048, num_rounds=3),
        num_threads=torch.get_num_threads(),
        dtype=str(dtype).removeprefix("torch."),
    )


def roofline_fractions(
    runner, cells: list[dict], batches: tuple[int, ...], limits: dict, peak_bytes_per_s: float | None
) -> list[dict]:  # noqa: ANN001 (a workers.runner.ModelRunner)
    from bench.roofline import step_cost

    rows = []
    for c in cells:
        if c["kind"] != "decode" or c["num_decodes"] not in batches:
            continue
        bytes_read, flops = step_cost(runner, c["num_decodes"], c["context_tokens"])
        memory_s = bytes_read / limits["read_bytes_per_s"]
        compute_s = flops / limits["matmul_flops_per_s"]
        step_s = c["step_s_median"]
        rows.append(
            {
                "batch": c["num_decodes"],
                "context_tokens": c["context_tokens"],
                "step_s": step_s,
                "bytes_read": bytes_read,
                "flops": flops,
                "hbm_fraction_measured_bandwidth": memory_s / step_s,
                "hbm_fraction_peak_bandwidth": (
                    None if peak_bytes_per_s is None else bytes_read / peak_bytes_per_s / step_s
                ),
                "ratio_to_bound": step_s / max(memory_s, compute_s),
                "bound": "memory" if memory_s >= compute_s else "compute",
            }
        )
    return rows


def _outermost_aten(event):  # noqa: ANN001, ANN202 (torch.autograd.profiler_util.FunctionEvent)
    outer = None
    while event is not None:
        if event.name.startswith("aten::"):
            outer = event
        event = event.cpu_parent
    return outer


def _device_time_us(event) -> float:  # noqa: ANN001
    total = getattr(event, "device_time_total", None)  # torch >= 2.4; cuda_time_total before
    return float(total if total is not None else getattr(event, "cuda_time_total", 0.0))


def _kind(name: str) -> str:
    return next((kind for kind, prefixes in _OP_KINDS if name.startswith(prefixes)), "other")


def step_breakdown(runner, step_plan) -> dict:  # noqa: ANN001 (a ModelRunner and a StepPlan)
    """Milliseconds and shares of one profiled step's wall time by kind (see the module's docstring)."""
    from torch.profiler import ProfilerActivity, profile

    is_cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    runner.forward_stage(step_plan)  # warm: the profiler should not see first-call work
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        runner.forward_stage(step_plan)
        wall_us = (time.perf_counter() - start) * 1e6
    totals_us = dict.fromkeys([kind for kind, _ in _OP_KINDS] + ["other"], 0.0)
    seen = set()
    for event in prof.events():
        outer = _outermost_aten(event) if event.name.startswith("aten::") else None
        if outer is None or id(outer) in seen:
            continue
        seen.add(id(outer))
        # Device time is what a GPU op costs (its kernels, children included); CPU time on a CPU.
        spent = _device_time_us(outer) if is_cuda else outer.cpu_time_total
        totals_us[_kind(outer.name)] += spent
    totals_us["python"] = max(0.0, wall_us - sum(totals_us.values()))
    return {
        "wall_ms": wall_us / 1e3,
        "ms": {kind: t / 1e3 for kind, t in totals_us.items()},
        "share": {kind: t / wall_us for kind, t in totals_us.items()},
    }
