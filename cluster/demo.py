"""``make demo``: write the tiny checkpoint if needed and run a few prompts through the engine.

The cluster issue turns this into the served system; for now it shows the offline engine: a mixed
batch decoded together with SARATHI's chunked prefills, and each request's timings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = [
    "Hello! Who are you?",
    "Write a haiku about paged attention.",
    "Summarise the plot of Hamlet in two sentences. " * 4,
    "List five prime numbers.",
    "Explain why shortest-job-first scheduling lowers mean completion time.",
    "Translate 'good morning' into French, German and Spanish.",
]


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from pipeline.config import EngineConfig, ModelConfig, SchedulerConfig
    from pipeline.request import SamplingParams
    from workers.llm import LLM
    from workers.tiny_model import make_tiny_model

    torch.set_num_threads(1)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        print(f"writing the tiny seeded checkpoint to {model_dir} ...")
        make_tiny_model(model_dir)
    llm = LLM(EngineConfig(ModelConfig(str(model_dir)), scheduler=SchedulerConfig(chunk_size=64)))
    params = [
        SamplingParams(max_tokens=8 + 6 * i, temperature=0.8, top_p=0.95, seed=i) for i in range(len(PROMPTS))
    ]
    done = llm.generate(PROMPTS, params)
    print(f"\n{'#':>2} {'prompt':>6} {'output':>6} {'TTFT ms':>8} {'total ms':>9}  text")
    for i, d in enumerate(done):
        m = d.completion.metrics
        text = d.text.replace("\n", " ")[:60]
        print(
            f"{i:>2} {m.num_prompt_tokens:>6} {m.num_output_tokens:>6} {m.ttft_s * 1e3:>8.1f} "
            f"{m.completion_s * 1e3:>9.1f}  {text!r}"
        )
    print("\n(random weights: the text is noise; the tokens, batching and timings are real)")
    return 0
