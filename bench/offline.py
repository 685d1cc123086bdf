"""``binserve bench offline``: this engine against transformers' own continuous batching.

Both run the same ShareGPT-shaped requests on the same checkpoint in one process, one after the
other, with output lengths forced (EOS ignored) so both generate exactly the same number of tokens.
"""

from __future__ import annotations

import collections
import statistics
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from bench.workload import WorkloadRequest, sharegpt_requests
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.request import NewRequest, SamplingParams

if TYPE_CHECKING:
    import torch
    from transformers import ContinuousBatchingConfig


def _run_engine(config: EngineConfig, requests: list[WorkloadRequest]) -> dict:
    from workers.llm import LLM

    llm = LLM(config)
    return {**run_engine(llm.engine, requests), "num_kv_blocks": llm.runner.num_blocks}


def run_engine(
    engine: Engine,
    requests: list[WorkloadRequest],
    max_num_running: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Run ``requests`` (greedy, output lengths forced) to the end on ``engine`` in this thread. With
    ``max_num_running`` at most that many are in the engine at once, a finished one's place going to the
    next, as callers that each send their next request when one ends (None: all at once)."""
    slots = len(requests) if max_num_running is None else max_num_running
    pending = collections.deque(enumerate(requests))

    def add_next() -> None:
        if pending:
            i, r = pending.popleft()
            params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True)
            engine.add_request(NewRequest(str(i), tuple(r.prompt_token_ids), params))

    for _ in range(slots):
        add_next()
    finished, steps_s = [], []
    start_s = time.perf_counter()
    with tqdm(total=len(requests), desc="binserve engine", unit="req", disable=not show_progress) as bar:
        while engine.has_unfinished:
            step_start_s = time.perf_counter()
            outputs = engine.step()
            steps_s.append(time.perf_counter() - step_start_s)
            for out in outputs:
                if out.metrics is not None:
                    finished.append(out.metrics)
                    bar.update(1)
                    add_next()
    wall_s = time.perf_counter() - start_s
    num_output = sum(m.num_output_tokens for m in finished)
    tbts = [t for m in finished for t in m.tbt_s]
    return {
        "wall_s": wall_s,
        "num_requests": len(finished),
        "output_tokens": num_output,
        "output_tokens_per_s": num_output / wall_s,
        "requests_per_s": len(finished) / wall_s,
        "mean_ttft_s": statistics.fmean(m.ttft_s for m in finished),
        "mean_completion_s": statistics.fmean(m.completion_s for m in finished),
        "p50_tbt_s": statistics.median(tbts) if tbts else None,
        "p50_step_s": statistics.median(steps_s),
        "num_preemptions": sum(m.num_preemptions for m in finished),
    }


def _hf_batching_config(device: torch.device) -> ContinuousBatchingConfig | None:
    """transformers sizes its KV cache (and attention masks) from the device's free memory, 90% by default.
    On a CPU that is the host's RAM, shared with everything else on the machine: SmolLM2 at 64 requests
    took 14 GB there and the bench was OOM-killed on a 24 GB machine. A third of the free memory still
    holds every running request of these workloads; on CUDA transformers' own default stands."""
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(max_memory_percent=0.3) if device.type == "cpu" else None


def _run_hf(config: EngineConfig, requests: list[WorkloadRequest]) -> dict:
    """transformers' continuous batching (the machinery behind ``generate_batch``), with per-request
    output lengths: ``generate_batch`` itself takes one ``max_new_tokens`` for all requests."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from workers.runner import resolve_device, resolve_dtype

    # The engine's device and dtype (float32 on CPU, bfloat16 on CUDA unless configured otherwise).
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(config.model.model_dir, dtype=dtype).to(device).eval()
    generation_config = GenerationConfig(
        do_sample=False,
        eos_token_id=-1,
        max_new_tokens=max(r.output_tokens for r in requests),
        pad_token_id=model.config.pad_token_id,
    )
    num_output = 0
    with (
        model.continuous_batching_context_manager(
            generation_config=generation_config,
            continuous_batching_config=_hf_batching_config(device),
            block=True,
            timeout=5,
        ) as manager,
        tqdm(total=len(requests), desc="transformers CB", unit="req") as bar,
    ):
        # The clock starts after the manager's set-up, as the engine's starts after loading.
        start_s = time.perf_counter()
        for i, r in enumerate(requests):
            manager.add_request(
                list(r.prompt_token_ids), request_id=str(i), max_new_tokens=r.output_tokens, eos_token_id=-1
            )
        done = 0
        while done < len(requests):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                num_output += len(result.generated_tokens)
                done += 1
                bar.update(1)
    wall_s = time.perf_counter() - start_s
    return {"wall_s": wall_s, "output_tokens": num_output, "output_tokens_per_s": num_output / wall_s}


def run_offline_bench(
    config: EngineConfig,
    num_requests: int,
    seed: int = 0,
    max_prompt_tokens: int = 512,
    max_output_tokens: int = 256,
    data_path: str | None = None,
    skip_hf: bool = False,
) -> dict:
    from workers.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(config.model.model_dir)
    kwargs = {"path": data_path} if data_path else {}
    requests = sharegpt_requests(
        tokenizer, num_requests, seed, max_prompt_tokens, max_output_tokens, **kwargs
    )
    report: dict = {
        "workload": {
            "num_requests": len(requests),
            "mean_prompt_tokens": statistics.fmean(len(r.prompt_token_ids) for r in requests),
            "mean_output_tokens": statistics.fmean(r.output_tokens for r in requests),
            "max_prompt_tokens": max_prompt_tokens,
            "max_output_tokens": max_output_tokens,
        },
        "config": {
            "policy": config.scheduler.policy,
            "chunk_size": config.scheduler.chunk_size,
            "max_num_seqs": config.scheduler.max_num_seqs,
            "model": config.model.model_dir,
        },
    }
    report["engine"] = _run_engine(config, requests)
    print(f"engine: {report['engine']['output_tokens_per_s']:.1f} output tokens/s")
    if not skip_hf:
        report["hf"] = _run_hf(config, requests)
        report["speedup_vs_hf"] = (
            report["engine"]["output_tokens_per_s"] / report["hf"]["output_tokens_per_s"]
        )
        print(
            f"transformers: {report['hf']['output_tokens_per_s']:.1f} output tokens/s; "
            f"speedup {report['speedup_vs_hf']:.2f}x"
        )
    return report
