"""``python3 -m bench.gpu_check``: the GPU check, one prepared script for a bare GPU machine.

    python3 -m bench.gpu_check --out out/gpu            # full: under 6 minutes on one H100
    python3 -m bench.gpu_check --quick --out out/gpu    # a smaller grid, no 1B parity: under 3 minutes
    python3 -m bench.gpu_check --smoke --out /tmp/s     # a CPU, stand-in shapes: every path in seconds
    make gpu-check GPU_OUT=$OUT                         # the same as the first, on the machine's python3

It needs the repository and torch, transformers, safetensors, tokenizers and numpy: no Ray, no venv, no
download, no GGUF (nothing on its path imports them; ``tests/test_gpu_check.py`` proves it). Checkpoints
are written on the machine: seeded random weights in the real shapes of Llama-3-8B and Llama-3.2-1B
(``workers/random_model.py``) and the tiny test model, under ``--work-dir`` (default: a fresh directory
in /dev/shm when it has room, else the system's temporary directory; removed at the end).

Parts, each independent (one that raises is recorded with its error and the rest still run), the JSON
rewritten after every one (``OUT/gpu_check.json``), progress printed as it goes:

1. ``parity/tiny``: greedy tokens and teacher-forced logits against transformers (``bench/gpu/parity.py``);
2. ``machine``: the device's measured read bandwidth and matmul rate, and its datasheet HBM peak;
3. ``timing/llama-3-8b``, ``timing/llama-3.2-1b``: decode and prefill step times over a grid, fitted into
   a profile in the simulator's format (``OUT/profiles/gpu-llama3-8b-h100.json``), the fraction of the
   HBM roofline at batch 1 and 64, the profiler's split of a step (``bench/gpu/steps.py``, ``breakdown.py``);
4. ``parity/llama-3.2-1b`` (full only): the parity check on the 1B shape.

A part that would start after the plan's budget is skipped and recorded, so the JSON comes back inside
the machine's lease. Afterwards, on a machine with the tree's workloads, ``python -m
bench.gpu.simulations`` reruns the routing simulations on the measured profile (docs/GPU_CHECK.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.gpu.plan import CheckPlan

REPO_DIR = Path(__file__).resolve().parent.parent
ESTIMATE_PROFILE = REPO_DIR / "profiles" / "gpu-llama3-8b-h100-estimate.json"


class Report:
    """The check's JSON, rewritten after every part; parts run in order, each guarded."""

    def __init__(self, path: Path, plan: CheckPlan, header: dict) -> None:
        self.path, self.plan = path, plan
        self.start_s = time.perf_counter()
        self.data: dict = {**header, "plan": dataclasses.asdict(plan), "parts": {}, "skipped": []}

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start_s

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        print(f"-- skipped {what}: {why}", flush=True)
        self.save()

    def part(self, name: str, run: Callable[[], dict]) -> dict | None:
        if self.elapsed_s() > self.plan.budget_s:
            self.skip(name, f"the {self.plan.budget_s:.0f} s budget was spent ({self.elapsed_s():.0f} s)")
            return None
        print(f"== {name} (at {self.elapsed_s():.0f} s)", flush=True)
        start_s = time.perf_counter()
        result = guarded(run)
        result["wall_s"] = time.perf_counter() - start_s
        self.data["parts"][name] = result
        print(f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['wall_s']:.1f} s", flush=True)
        self.save()
        return result

    def save(self) -> None:
        self.data["wall_s"] = self.elapsed_s()
        self.data["ok"] = all(p["ok"] for p in self.data["parts"].values())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def guarded(run: Callable[[], dict]) -> dict:
    try:
        return {"ok": True, **run()}
    except Exception as error:  # noqa: BLE001 (recorded; the other parts still run)
        traceback.print_exc()
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


def device_slug(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the part of a profile's file name that names the device."""
    found = re.search(r"\b([A-Z]+\d+)\b", device_name)
    return (found.group(1) if found else re.sub(r"\W+", "-", device_name)).lower()


def profile_stem(shape_name: str) -> str:
    """``llama-3-8b`` -> ``llama3-8b``, as the estimate's file is named."""
    return shape_name.replace("llama-", "llama", 1)


class Checkpoints:
    """Random checkpoints written on demand under ``work_dir``, each removed after its last use."""

    def __init__(self, work_dir: Path, device, dtype) -> None:  # noqa: ANN001 (torch.device, torch.dtype)
        self.work_dir, self.device, self.dtype = work_dir, device, dtype
        self.written: dict[str, dict] = {}

    def get(self, shape_name: str) -> dict:
        from workers.random_model import SHAPES, write_random_checkpoint

        if shape_name not in self.written:
            shape = SHAPES[shape_name]
            start_s = time.perf_counter()
            path = write_random_checkpoint(self.work_dir / shape_name, shape, device=self.device)
            self.written[shape_name] = {
                "dir": str(path),
                "num_parameters": shape.num_parameters,
                "write_s": time.perf_counter() - start_s,
            }
            print(
                f"  wrote {shape_name} ({shape.num_parameters / 1e9:.2f}e9 parameters) in "
                f"{self.written[shape_name]['write_s']:.1f} s",
                flush=True,
            )
        return self.written[shape_name]

    def drop(self, shape_name: str) -> None:
        if shape_name in self.written:
            shutil.rmtree(self.written.pop(shape_name)["dir"], ignore_errors=True)


def free_device_memory(device) -> None:  # noqa: ANN001
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timing(shape: str, checkpoints: Checkpoints, plan: CheckPlan, report: Report) -> dict:
    from bench.gpu.timing import TimingSetup, timing_part

    header = report.data
    device = checkpoints.device
    checkpoint = checkpoints.get(shape)
    # gpu-llama3-8b-h100.json as the estimate's file is named; a CPU's (the smoke run): cpu-smoke-8b.json
    if device.type == "cuda":
        name = f"gpu-{profile_stem(shape)}-{device_slug(header['device_name'])}.json"
    else:
        name = f"cpu-{profile_stem(shape)}.json"
    setup = TimingSetup(
        shape_name=shape,
        model_dir=checkpoint["dir"],
        num_parameters=checkpoint["num_parameters"],
        device=device,
        dtype=checkpoints.dtype,
        device_name=header["device_name"],
        profile_path=report.path.parent / "profiles" / name,
        provenance=f"{header['device_name']}, torch {header['torch']}, CUDA {header['cuda']}, {header['date_utc']}",
    )
    machine = header["parts"].get("machine")
    limits = machine["limits"] if machine and machine["ok"] else None
    return {"checkpoint": checkpoint, **timing_part(setup, plan, limits, guarded)}


def run_gpu_check(
    plan: CheckPlan, out_dir: str | Path, device_name: str | None = None, work_dir: str | None = None
) -> dict:
    import torch

    device = torch.device(device_name or ("cpu" if plan.mode == "smoke" else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: no CUDA device here; run with --smoke (a CPU) for the smoke check")
    import transformers

    from bench.gpu.breakdown import device_limits, peak_read_bytes_per_s
    from bench.gpu.parity import ParitySetup, check_parity
    from bench.gpu.summary import targets
    from workers.random_model import SHAPES
    from workers.tiny_model import make_tiny_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    header = {
        "mode": plan.mode,
        "command": "python -m bench.gpu_check " + " ".join(sys.argv[1:]),
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    report = Report(Path(out_dir) / "gpu_check.json", plan, header)
    biggest = max(SHAPES[s].num_parameters for s in plan.timing_shapes + plan.parity_shapes) * 2
    work = Path(work_dir) if work_dir else _default_work_dir(biggest)
    work.mkdir(parents=True, exist_ok=True)
    report.data["work_dir"] = str(work)
    print(
        f"gpu-check ({plan.mode}) on {name}, {header['dtype']}, torch {torch.__version__}; checkpoints in {work}"
    )
    if plan.mode == "smoke":
        report.skip(
            "real shapes", "the smoke run times the smoke-* stand-ins of the 8B and 1B shapes on this device"
        )
    if "llama-3-8b" not in plan.parity_shapes:
        report.skip(
            "parity/llama-3-8b", "transformers would hold a second 16 GB copy; the 1B compares the same code"
        )
    if plan.mode == "quick":
        report.skip("parity/llama-3.2-1b", "quick run: only the tiny model's parity")
    checkpoints = Checkpoints(work, device, dtype)
    try:
        report.part(
            "parity/tiny",
            lambda: check_parity(
                ParitySetup(str(make_tiny_model(work / "tiny")), device, dtype, plan.parity_tokens)
            ),
        )
        report.part(
            "machine",
            lambda: {
                "limits": dataclasses.asdict(device_limits(device, dtype, plan.mode == "smoke")),
                "peak_read_bytes_per_s": peak_read_bytes_per_s(name),
            },
        )
        for shape in plan.timing_shapes:
            report.part(f"timing/{shape}", lambda shape=shape: _timing(shape, checkpoints, plan, report))
            if shape not in plan.parity_shapes:
                checkpoints.drop(shape)
            free_device_memory(device)
        for shape in plan.parity_shapes:
            report.part(
                f"parity/{shape}",
                lambda shape=shape: check_parity(
                    ParitySetup(checkpoints.get(shape)["dir"], device, dtype, plan.parity_tokens)
                ),
            )
            checkpoints.drop(shape)
            free_device_memory(device)
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report.data["targets"] = targets(report.data)
    report.save()
    return report.data


def _default_work_dir(largest_checkpoint_bytes: int) -> Path:
    """/dev/shm when it holds the largest checkpoint with room to spare (writing and reading it there is
    a memory copy), else the system's temporary directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * largest_checkpoint_bytes + (2 << 30):
        return Path(tempfile.mkdtemp(prefix="binserve-gpu-check-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="binserve-gpu-check-"))


def cmd_bench_gpu_check(args: argparse.Namespace) -> int:
    from bench.gpu.summary import summary

    plan = CheckPlan.smoke() if args.smoke else CheckPlan.quick() if args.quick else CheckPlan.full()
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    report = run_gpu_check(plan, args.out, args.device, args.work_dir)
    print(summary(report))
    print(f"wrote {Path(args.out) / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="a smaller grid and no 1B parity (under 3 minutes)"
    )
    mode.add_argument("--smoke", action="store_true", help="stand-in shapes and a tiny grid (a CPU, seconds)")
    p.add_argument("--out", required=True, help="directory for gpu_check.json and profiles/")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; smoke: cpu)")
    p.add_argument("--work-dir", default=None, help="where checkpoints are written (kept when given)")
    p.add_argument("--budget-s", type=float, default=None, help="skip parts that would start after this")


def register(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "gpu-check", help="the GPU check: parity, step-time profiles, roofline and step breakdown in one JSON"
    )
    add_arguments(p)
    p.set_defaults(func=cmd_bench_gpu_check)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(cmd_bench_gpu_check(parser.parse_args()))
