"""This engine against transformers on the same checkpoint, device and dtype: tokens and logits.

Two comparisons per prompt:

- greedy: this engine's ``generate`` against transformers' ``generate``, and the first output position
  where the tokens differ (``None``: they do not);
- teacher-forced logits: both models read the same sequence (the prompt, then transformers' greedy
  output), this engine through its paged path (the prompt as one prefill chunk, then one decode step per
  token, as generation runs) and transformers in one forward pass. At every position: the largest
  ``|difference|`` of the logits, whether the argmax agrees, and how many of the top 5 tokens agree.

In bfloat16 the two sum in different orders, and random weights give near-ties, so a greedy token can flip
where neither is wrong. The logits say whether that is all it is: the difference relative to the logits'
scale (bf16 keeps about 3 significant digits), and at each flipped argmax transformers' own margin between
its top two tokens (a near-tie has a margin within the logits' difference there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import CacheConfig, EngineConfig, ModelConfig
from pipeline.plan import ScheduledChunk, StepPlan
from pipeline.request import SamplingParams
from workers.attention import AttentionMetadata
from workers.runner import ModelRunner

CHAT_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in a few sentences.",
    "How do I bake a loaf of bread at home?",
    "Write a short story about a robot who learns to paint.",
    "Write a Python function that checks whether a number is prime.",
)
TOP_K = 5


@dataclass(frozen=True)
class ParitySetup:
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    max_tokens: int
    max_model_len: int = 1024


def first_divergence(ours: tuple[int, ...], theirs: tuple[int, ...]) -> int | None:
    """The first output position where the two token lists differ (a length difference counts)."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def prompt_ids(model_dir: str) -> list[list[int]]:
    from workers.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False
            )
            for t in CHAT_PROMPTS
        ]
    return [tokenizer(t).input_ids for t in CHAT_PROMPTS]  # the random checkpoints have no chat template


def _reference(
    setup: ParitySetup, prompts: list[list[int]]
) -> tuple[list[tuple[int, ...]], list[torch.Tensor]]:
    """transformers' greedy outputs and its logits (L, V) float32 on the host over prompt + output."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=setup.dtype)
    model = model.to(device=setup.device, dtype=setup.dtype).eval()  # the cast: whatever ``dtype`` meant
    # A full GenerationConfig, so a checkpoint's sampling defaults do not leak into the reference.
    generation = GenerationConfig(
        max_new_tokens=setup.max_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.eos_token_id,
    )
    outputs, logits = [], []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=setup.device), generation_config=generation)
            outputs.append(tuple(out[0, len(ids) :].tolist()))
            logits.append(model(out).logits[0].float().cpu())
    del model
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return outputs, logits


@torch.inference_mode()
def teacher_forced_logits(runner: ModelRunner, token_ids: list[int], num_prompt_tokens: int) -> torch.Tensor:
    """This engine's logits (L, V) float32 on the host at every position of ``token_ids``: the prompt as
    one prefill chunk, then each later token as a decode step over the paged cache."""
    num_blocks = -(-len(token_ids) // runner.block_size)
    block_ids = tuple(range(num_blocks))
    stage = runner.stage
    rows = []

    def forward(chunk: ScheduledChunk) -> None:
        plan = StepPlan(step_id=0, chunks=(chunk,))
        meta = AttentionMetadata.build(plan, runner.block_size, runner.sliding_window, runner.device)
        inputs = torch.tensor(chunk.token_ids, dtype=torch.long, device=runner.device)
        hidden = stage(inputs, runner.kv_caches, meta)
        rows.append(stage.lm_head(hidden).float().cpu())

    forward(ScheduledChunk("tf", tuple(token_ids[:num_prompt_tokens]), 0, block_ids, None, 0))
    for pos in range(num_prompt_tokens, len(token_ids)):
        forward(ScheduledChunk("tf", (token_ids[pos],), pos, block_ids, None, 0, is_decode=True))
    return torch.cat(rows)


def compare_logits(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Per-position agreement of two (L, V) logit matrices; transformers' is the reference."""
    diff = (ours - theirs).abs().amax(-1)  # (L,)
    top_ours = ours.topk(TOP_K, -1).indices
    top_theirs = theirs.topk(TOP_K, -1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_ours, top_theirs, strict=True)]
    best2 = theirs.topk(2, -1).values
    gap = best2[:, 0] - best2[:, 1]  # transformers' own margin between its top two tokens
    flips = (ours.argmax(-1) != theirs.argmax(-1)).nonzero().flatten().tolist()
    scale = float(theirs.abs().amax())
    return {
        "num_positions": ours.shape[0],
        "max_abs_diff": float(diff.max()),
        "relative_max_abs_diff": float(diff.max()) / scale if scale else None,
        "reference_logit_scale": scale,
        "max_abs_diff_by_position": [round(float(d), 5) for d in diff],
        "top5_overlap_by_position": overlap,
        "min_top5_overlap": min(overlap),
        "mean_top5_overlap": sum(overlap) / len(overlap),
        "reference_top2_gap_by_position": [round(float(g), 5) for g in gap],
        "argmax_flips": [
            {"position": p, "reference_top2_gap": float(gap[p]), "abs_diff": float(diff[p])} for p in flips
        ],
    }


def check_parity(setup: ParitySetup) -> dict:
    """Greedy tokens and teacher-forced logits for the chat prompts (see the module's docstring)."""
    from workers.llm import LLM

    prompts = prompt_ids(setup.model_dir)
    theirs, their_logits = _reference(setup, prompts)
    dtype_name = str(setup.dtype).removeprefix("torch.")
    num_blocks = len(prompts) * -(-setup.max_model_len // CacheConfig().block_size)
    config = EngineConfig(
        ModelConfig(
            setup.model_dir, dtype=dtype_name, device=str(setup.device), max_model_len=setup.max_model_len
        ),
        cache=CacheConfig(num_blocks=num_blocks),
    )
    llm = LLM(config)
    greedy = SamplingParams(max_tokens=setup.max_tokens, temperature=0.0, repetition_penalty=1.0)
    ours = [tuple(c.output_token_ids) for c in llm.engine.generate(prompts, greedy)]
    results = []
    for ids, a, b, reference in zip(prompts, ours, theirs, their_logits, strict=True):
        sequence = list(ids) + list(b)
        logits = compare_logits(teacher_forced_logits(llm.runner, sequence, len(ids)), reference)
        divergence = first_divergence(a, b)
        # The output token at ``divergence`` was predicted at position len(ids) + divergence - 1: how
        # close transformers' own top two were there says whether the divergence is a near-tie.
        at = len(ids) + divergence - 1 if divergence is not None and divergence < len(b) else None
        results.append(
            {
                "num_prompt_tokens": len(ids),
                "ours": list(a),
                "transformers": list(b),
                "first_divergence": divergence,
                "reference_top2_gap_at_divergence": (
                    None if at is None else logits["reference_top2_gap_by_position"][at]
                ),
                "logits": logits,
            }
        )
    del llm
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "model": setup.model_dir,
        "dtype": dtype_name,
        "device": str(setup.device),
        "max_tokens": setup.max_tokens,
        "prompts": results,
        "all_equal": all(r["first_divergence"] is None for r in results),
        "first_divergences": [r["first_divergence"] for r in results],
        "max_abs_logit_diff": max(r["logits"]["max_abs_diff"] for r in results),
        "min_top5_overlap": min(r["logits"]["min_top5_overlap"] for r in results),
        "num_argmax_flips": sum(len(r["logits"]["argmax_flips"]) for r in results),
        "num_positions": sum(r["logits"]["num_positions"] for r in results),
    }
