"""Experiment 4: pipeline bubbles at pp 2, SARATHI vs prefill_first micro-batches.

    binserve bench exp pipeline             # writes docs/results/MODEL/pipeline.json and .png

A whole-prompt prefill micro-batch takes far longer than a decode micro-batch, so the stage after it
idles (a bubble); SARATHI's equal-sized chunks keep the stages evenly loaded. The measurement itself is
the pipeline bench (``bench.bubbles.run_pipeline_bench``, also ``binserve bench pipeline``),
which serves the same requests, all at once, under both policies on one pipeline of Ray stage actors;
this module sizes it, and reports throughput, bubble fraction and per-stage utilisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.experiments import harness
from pipeline.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

TITLE = "Pipeline parallelism: bubbles at pp 2"
POLICIES = ("sarathi", "prefill_first")


@dataclass(frozen=True)
class Params:
    model_dir: str | None = None
    """A real checkpoint (``--model``); None writes and uses the synthetic one below."""
    hidden_size: int = 256
    num_layers: int = 8
    pp_size: int = 2
    num_requests: int = 48
    max_prompt_tokens: int = 512
    max_output_tokens: int = 128
    max_num_seqs: int = 32
    chunk_size: int = 256
    max_prefill_chunks: int = 4
    seed: int = 0

    @property
    def checkpoint_dir(self) -> str:
        """``model_dir``, else a synthetic checkpoint of this size, written on first use: the 4-layer tiny
        model is too small for a pipeline measurement (a micro-batch's fixed cost rivals its compute)."""
        return self.model_dir or f".models/pp-bench-{self.hidden_size}x{self.num_layers}"


SIZES = {
    "full": Params(),
    "smoke": Params(
        num_requests=8, max_prompt_tokens=128, max_output_tokens=16, num_layers=4, hidden_size=128
    ),
    # With --model, that checkpoint split in two stages: about 1 minute for SmolLM2 here.
    "real": Params(num_requests=24, max_output_tokens=64),
}


def run(params: Params, predictor: harness.PredictorChoice) -> dict[str, Any]:
    del predictor  # lengths are forced; the queue is FCFS
    from bench.bubbles import run_pipeline_bench
    from workers.checkpoint import load_tokenizer
    from workers.tiny_model import make_tiny_model

    if params.model_dir is None and not (Path(params.checkpoint_dir) / "config.json").is_file():
        make_tiny_model(
            params.checkpoint_dir,
            seed=params.seed,
            hidden_size=params.hidden_size,
            num_layers=params.num_layers,
        )
    config = EngineConfig(
        ModelConfig(
            params.checkpoint_dir, max_model_len=params.max_prompt_tokens + params.max_output_tokens + 16
        ),
        cache=CacheConfig(kv_cache_bytes=128 * 2**20),
        scheduler=SchedulerConfig(
            chunk_size=params.chunk_size,
            max_num_seqs=params.max_num_seqs,
            max_prefill_chunks=params.max_prefill_chunks,
        ),
        parallel=ParallelConfig(pp_size=params.pp_size, torch_threads=1),
    )
    requests = harness.sharegpt_workload(load_tokenizer(params.checkpoint_dir), params)
    report = run_pipeline_bench(config, requests, one_process=False)
    rows = [
        {
            "policy": policy,
            "output_tokens_per_s": report[policy]["output_tokens_per_s"],
            "bubble_fraction": report[policy]["bubble_fraction"],
            "bubble_s": report[policy]["bubble_s"],
            "stage_utilisation": report[policy]["stage_utilisation"],
            "num_micro_batches": report[policy]["num_micro_batches"],
        }
        for policy in POLICIES
    ]
    return {
        "experiment": "pipeline",
        "title": TITLE,
        "params": {**asdict(params), "checkpoint_dir": params.checkpoint_dir},
        "layer_ranges": report["layer_ranges"],
        "rows": rows,
        "bubble_time_reduction": report["bubble_time_reduction"],
        "throughput_gain": report["throughput_gain"],
        "targets": [
            harness.target(
                "SARATHI micro-batches cut pp=2 bubble time >= 4x vs prefill_first",
                report["bubble_time_reduction"],
                4.0,
            )
        ],
    }


def render(result: dict[str, Any]) -> str:
    p = result["params"]
    rows = [
        [
            r["policy"],
            r["output_tokens_per_s"],
            f"{r['bubble_fraction']:.1%}",
            r["bubble_s"],
            ", ".join(f"{u:.0%}" for u in r["stage_utilisation"]),
            r["num_micro_batches"],
        ]
        for r in result["rows"]
    ]
    header = [
        "micro-batches",
        "output tokens/s",
        "bubble fraction",
        "bubble (stage-s)",
        "stage utilisation",
        "micro-batches run",
    ]
    return "\n\n".join(
        [
            f"pp {p['pp_size']}: one Ray actor per stage on this CPU, {p['pp_size']} micro-batches in flight; "
            f"{_checkpoint_text(p)} (layers {result['layer_ranges']}). "
            f"{p['num_requests']} ShareGPT requests at once, prompts cut to {p['max_prompt_tokens']} tokens, "
            f"forced outputs capped at {p['max_output_tokens']}; max_num_seqs {p['max_num_seqs']}; SARATHI chunk "
            f"{p['chunk_size']} with up to {p['max_prefill_chunks']} prefill chunks per micro-batch. SARATHI: "
            f"{result['bubble_time_reduction']:.2f}x less bubble time, {result['throughput_gain']:.2f}x the "
            f"throughput of prefill-first micro-batches.",
            harness.markdown_table(header, rows),
            harness.provenance(result),
        ]
    )


def _checkpoint_text(p: dict[str, Any]) -> str:
    if p.get("model_dir"):
        return f"the checkpoint `{Path(p['model_dir']).name}`"
    return f"a synthetic {p['num_layers']}-layer, {p['hidden_size']}-wide checkpoint"


def plot(result: dict[str, Any], path: str) -> None:
    fig, (ax_tput, ax_bubble) = harness.new_figure(2, width_in=4.0)
    policies = [r["policy"] for r in result["rows"]]
    ax_tput.bar(policies, [r["output_tokens_per_s"] for r in result["rows"]])
    ax_tput.set_ylabel("output tokens/s")
    ax_bubble.bar(policies, [r["bubble_fraction"] for r in result["rows"]], color="tab:red")
    ax_bubble.set_ylabel("bubble fraction (stage idle time)")
    ax_bubble.set_ylim(0, 1)
    fig.suptitle(f"pp {result['params']['pp_size']}: SARATHI vs prefill-first micro-batches")
    harness.save_figure(fig, path)
