"""Experiment 5: this engine vs transformers' continuous batching on the same checkpoint.

    binserve bench exp hf             # writes docs/results/MODEL/hf.json and .png

A thin wrapper over ``bench.offline.run_offline_bench`` (``binserve bench offline``): the same
ShareGPT requests, all at once, output lengths forced in both, one process after the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.experiments import harness
from bench.offline import run_offline_bench
from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

TITLE = "Engine vs transformers continuous batching"


@dataclass(frozen=True)
class Params:
    model_dir: str = harness.DEFAULT_MODEL_DIR
    num_requests: int = 64
    max_prompt_tokens: int = 256
    max_output_tokens: int = 256
    max_num_seqs: int = 32
    chunk_size: int = 256
    seed: int = 0


SIZES = {"full": Params(), "smoke": Params(num_requests=8, max_prompt_tokens=64, max_output_tokens=32)}


def run(params: Params, predictor: harness.PredictorChoice) -> dict[str, Any]:
    del predictor  # offline: every request is submitted at once, FCFS
    import torch

    torch.set_num_threads(1)
    harness.ensure_tiny_model(params.model_dir)
    config = EngineConfig(
        ModelConfig(params.model_dir, max_model_len=params.max_prompt_tokens + params.max_output_tokens + 16),
        cache=CacheConfig(kv_cache_bytes=128 * 2**20),
        scheduler=SchedulerConfig(
            policy="sarathi", chunk_size=params.chunk_size, max_num_seqs=params.max_num_seqs
        ),
    )
    report = run_offline_bench(
        config, params.num_requests, params.seed, params.max_prompt_tokens, params.max_output_tokens
    )
    return {"experiment": "hf", "title": TITLE, "params": asdict(params), **report}


def render(result: dict[str, Any]) -> str:
    p, w = result["params"], result["workload"]
    engine, hf = result["engine"], result["hf"]
    table = harness.markdown_table(
        ["system", "wall (s)", "output tokens", "output tokens/s", "speedup"],
        [
            ["binserve engine (sarathi)", engine["wall_s"], engine["output_tokens"], engine["output_tokens_per_s"], f"{result['speedup_vs_hf']:.2f}x"],
            ["transformers continuous batching", hf["wall_s"], hf["output_tokens"], hf["output_tokens_per_s"], "1.00x"],
        ],
    )  # fmt: skip
    return "\n\n".join(
        [
            f"{w['num_requests']} ShareGPT requests submitted at once (mean prompt {w['mean_prompt_tokens']:.0f} "
            f"tokens, mean forced output {w['mean_output_tokens']:.0f}); the engine runs `sarathi`, chunk "
            f"{p['chunk_size']}, max_num_seqs {p['max_num_seqs']}; transformers runs its "
            f"`continuous_batching_context_manager` with per-request `max_new_tokens` and EOS off. Wall time "
            f"starts after each side's set-up (weights and cache allocated).",
            table,
            harness.provenance(result),
        ]
    )


def plot(result: dict[str, Any], path: str) -> None:
    fig, (ax,) = harness.new_figure(width_in=4.5)
    names = ["binserve", "transformers CB"]
    values = [result["engine"]["output_tokens_per_s"], result["hf"]["output_tokens_per_s"]]
    ax.bar(names, values, color=["tab:blue", "tab:gray"])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Same checkpoint, same requests")
    harness.save_figure(fig, path)
