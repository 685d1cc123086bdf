"""``binserve bench gpu-check``: the CUDA readiness check, one prepared script (under 8 minutes on one GPU).

    binserve bench gpu-check --json gpu-check.json          # CUDA: SmolLM2 in bfloat16
    binserve bench gpu-check --smoke --json smoke.json      # anywhere: the tiny model, a few tokens
    python -m bench.gpu_check --smoke --json smoke.json     # the same without the CLI's imports

Three parts, each recorded in the JSON; a part that raises is recorded with its error and the others
still run, so one broken part does not cost the whole (scarce) GPU run:

1. ``parity``: this engine's greedy tokens against transformers' ``generate`` on the same chat prompts,
   same device and dtype, and for each prompt the first position where they differ (``null``: they do
   not). In bfloat16 the two sum in different orders, so a near-tie can flip a token: the position says
   how long the outputs stay equal, not whether either is wrong.
2. ``offline``: ``bench offline`` (this engine against transformers' continuous batching, the same
   requests) at 64 and 256 requests.
3. ``roofline``: the decode step at batch 1 / 8 / 32 / 64 against the device's bandwidth and matmul rate.

``--smoke`` shrinks everything (the tiny random checkpoint written to a temporary directory, 8 tokens,
8 requests, a short context) so the whole path runs on a CPU in about a minute; the test suite runs it.
Without ``--smoke`` the check needs a CUDA device and the SmolLM2 checkpoint
(``binserve prepare-model smollm2-135m-instruct .models/smollm2-135m-instruct``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MODEL_DIR = ".models/smollm2-135m-instruct"

CHAT_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in a few sentences.",
    "How do I bake a loaf of bread at home?",
    "Write a short story about a robot who learns to paint.",
    "Write a Python function that checks whether a number is prime.",
)


@dataclass(frozen=True)
class CheckPlan:
    """How big each part is: the full CUDA check or the CPU smoke run."""

    parity_tokens: int
    offline_requests: tuple[int, ...]
    offline_max_prompt_tokens: int
    offline_max_output_tokens: int
    roofline_batches: tuple[int, ...]
    roofline_context_tokens: int
    roofline_steps: int
    max_model_len: int

    @classmethod
    def full(cls) -> CheckPlan:
        return cls(64, (64, 256), 512, 256, (1, 8, 32, 64), 256, 20, 2048)

    @classmethod
    def smoke(cls) -> CheckPlan:
        return cls(8, (8,), 64, 8, (1, 4), 64, 2, 512)


def first_divergence(ours: tuple[int, ...], theirs: tuple[int, ...]) -> int | None:
    """The first output position where the two token lists differ (a length difference counts)."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def _prompt_ids(tokenizer, num_prompts: int) -> list[list[int]]:  # noqa: ANN001 (a transformers tokenizer)
    texts = CHAT_PROMPTS[:num_prompts]
    if getattr(tokenizer, "chat_template", None):
        return [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False
            )
            for t in texts
        ]
    return [tokenizer(t).input_ids for t in texts]  # the tiny model has no chat template


def check_parity(model_dir: str, dtype: str, device: str, plan: CheckPlan) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from pipeline.config import CacheConfig, EngineConfig, ModelConfig
    from pipeline.request import SamplingParams
    from workers.checkpoint import load_tokenizer
    from workers.llm import LLM
    from workers.runner import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = load_tokenizer(model_dir)
    prompts = _prompt_ids(tokenizer, len(CHAT_PROMPTS))
    config = EngineConfig(
        ModelConfig(model_dir, dtype=dtype, device=device, max_model_len=plan.max_model_len),
        cache=CacheConfig(kv_cache_bytes=256 * 2**20),
    )
    llm = LLM(config)
    greedy = SamplingParams(max_tokens=plan.parity_tokens, temperature=0.0, repetition_penalty=1.0)
    ours = [tuple(c.output_token_ids) for c in llm.engine.generate(prompts, greedy)]
    del llm

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(torch_device).eval()
    # A full GenerationConfig, so a checkpoint's sampling defaults (SmolLM2's repetition_penalty 1.1)
    # do not leak into the reference.
    generation = GenerationConfig(
        max_new_tokens=plan.parity_tokens,
        do_sample=False,
        repetition_penalty=1.0,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    theirs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids], device=torch_device), generation_config=generation)
            theirs.append(tuple(out[0, len(ids) :].tolist()))
    results = [
        {
            "num_prompt_tokens": len(ids),
            "ours": list(a),
            "transformers": list(b),
            "first_divergence": first_divergence(a, b),
        }
        for ids, a, b in zip(prompts, ours, theirs, strict=True)
    ]
    return {
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": str(torch_device),
        "max_tokens": plan.parity_tokens,
        "prompts": results,
        "all_equal": all(r["first_divergence"] is None for r in results),
    }


def check_offline(model_dir: str, dtype: str, device: str, plan: CheckPlan) -> dict:
    from bench.offline import run_offline_bench
    from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    config = EngineConfig(
        ModelConfig(model_dir, dtype=dtype, device=device, max_model_len=plan.max_model_len),
        cache=CacheConfig(kv_cache_bytes=256 * 2**20),
        scheduler=SchedulerConfig(max_num_seqs=64),
    )
    return {
        str(n): run_offline_bench(
            config,
            num_requests=n,
            max_prompt_tokens=plan.offline_max_prompt_tokens,
            max_output_tokens=plan.offline_max_output_tokens,
        )
        for n in plan.offline_requests
    }


def check_roofline(model_dir: str, dtype: str, device: str, plan: CheckPlan) -> dict:
    from bench.roofline import run_roofline

    return run_roofline(
        model_dir,
        batches=plan.roofline_batches,
        context_tokens=plan.roofline_context_tokens,
        num_steps=plan.roofline_steps,
        dtype=dtype,
        device=device,
    )


def _run_part(name: str, part: Callable[[], dict]) -> dict:
    print(f"== {name}", flush=True)
    start_s = time.perf_counter()
    try:
        result = {"ok": True, **part()}
    except Exception as error:  # noqa: BLE001 (recorded; the other parts still run)
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    result["wall_s"] = time.perf_counter() - start_s
    print(f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['wall_s']:.1f} s", flush=True)
    return result


def run_gpu_check(smoke: bool, model_dir: str | None = None, work_dir: str | None = None) -> dict:
    """Run the three parts; ``model_dir`` defaults to SmolLM2 (full) or a fresh tiny model (smoke)."""
    import torch

    has_cuda = torch.cuda.is_available()
    if not smoke and not has_cuda:
        raise ValueError("gpu-check: no CUDA device here; run with --smoke for the CPU smoke check")
    plan = CheckPlan.smoke() if smoke else CheckPlan.full()
    device = "cuda" if has_cuda else "cpu"
    dtype = "bfloat16" if has_cuda else "float32"
    if model_dir is None and smoke:
        from workers.tiny_model import make_tiny_model

        model_dir = str(make_tiny_model(tempfile.mkdtemp(prefix="gpu-check-tiny-", dir=work_dir)))
    model_dir = model_dir or DEFAULT_MODEL_DIR
    report: dict = {
        "mode": "smoke" if smoke else "full",
        "model": model_dir,
        "device": torch.cuda.get_device_name() if has_cuda else "cpu",
        "dtype": dtype,
        "torch": torch.__version__,
        "plan": dataclasses.asdict(plan),
    }
    start_s = time.perf_counter()
    for name, part in (("parity", check_parity), ("offline", check_offline), ("roofline", check_roofline)):
        report[name] = _run_part(name, lambda part=part: part(model_dir, dtype, device, plan))
    report["wall_s"] = time.perf_counter() - start_s
    report["ok"] = all(report[name]["ok"] for name in ("parity", "offline", "roofline"))
    return report


def _summary(report: dict) -> str:
    lines = [f"gpu-check ({report['mode']}, {report['device']}, {report['dtype']}): {report['wall_s']:.0f} s"]
    parity = report["parity"]
    if parity["ok"]:
        firsts = [p["first_divergence"] for p in parity["prompts"]]
        lines.append(
            f"parity: first divergence per prompt {firsts} (None: equal for {parity['max_tokens']} tokens)"
        )
    if report["offline"]["ok"]:
        for n in report["plan"]["offline_requests"]:
            bench = report["offline"][str(n)]
            lines.append(f"offline {n} requests: {bench['speedup_vs_hf']:.2f}x transformers' output tokens/s")
    if report["roofline"]["ok"]:
        ratios = {p["batch"]: round(p["ratio"], 2) for p in report["roofline"]["points"]}
        lines.append(f"roofline ratio by batch: {ratios}")
    return "\n".join(lines)


def cmd_bench_gpu_check(args: argparse.Namespace) -> int:
    report = run_gpu_check(args.smoke, args.model)
    print(_summary(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--smoke", action="store_true", help="tiny model, few tokens: runs on a CPU in about a minute"
    )
    p.add_argument(
        "--model", help=f"checkpoint directory (default: {DEFAULT_MODEL_DIR}; smoke: a fresh tiny model)"
    )
    p.add_argument("--json", help="write the report here")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "gpu-check", help="CUDA readiness: bf16 parity, offline bench and roofline in one JSON"
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench_gpu_check)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(cmd_bench_gpu_check(parser.parse_args()))
