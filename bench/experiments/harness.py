"""What every experiment shares: the machine it ran on, engines on the tiny model, the lengths the
scheduler is told (oracle or predicted), and the small pieces of report output (tables, figures).

    engines = Engines(".models/tiny-llama")
    run = replay(engines.engine(SchedulerConfig(policy="sarathi")), requests, desc="sarathi")

Predicted lengths come from anything with the ``LengthPredictor`` interface (``predict(prompts)`` and
``bin_boundaries(num_bins)``), so the trained predictor, or a stand-in in tests, is injected.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from bench.workload import WorkloadRequest
from cluster.predictor.lengths import equal_mass_boundaries
from pipeline.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pipeline.engine import Engine

REPO_DIR = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = ".models/tiny-llama"
DEFAULT_RESULTS_DIR = REPO_DIR / "docs" / "results"
DEFAULT_REPORT = REPO_DIR / "docs" / "RESULTS.md"


# ---- the machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "num_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none): timings on a loaded machine are
    not comparable with a quiet one's, so every result records it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def simulated_sarathi(params: Any, queue_order: str) -> SchedulerConfig:
    """The SARATHI scheduler of a simulated replica from an experiment's ``Params`` (its ``max_num_seqs``,
    ``chunk_size`` and the wait bound's ``service_s_per_token``, ``max_wait_floor_s`` and
    ``max_wait_service_multiple``), ordering its queue by ``queue_order``."""
    return SchedulerConfig(
        policy="sarathi",
        max_num_seqs=params.max_num_seqs,
        chunk_size=params.chunk_size,
        queue_order=queue_order,
        service_s_per_token=params.service_s_per_token,
        max_wait_floor_s=params.max_wait_floor_s,
        max_wait_service_multiple=params.max_wait_service_multiple,
    )


def finish_module_run(
    module: Any, result: dict[str, Any], started_s: float, load_at_start: float | None, json_path: str
) -> None:
    """The end of a ``python -m bench.experiments.NAME`` run: its provenance (this command line, duration,
    load), the module's ``targets``, the JSON for the report, and the module's table on stdout."""
    import time

    spec = getattr(module, "__spec__", None)  # run with -m, the module is __main__ and its spec names it
    command = f"python -m {spec.name if spec is not None else module.__name__} " + " ".join(sys.argv[1:])
    result["meta"] = run_meta(command, time.perf_counter() - started_s, load_at_start)
    result["targets"] = module.targets(result)
    write_json(Path(json_path), result)
    print(module.render(result))


def add_simulation_flags(parser: Any, defaults: Any) -> None:
    """A simulation module's ``--profile``, ``--num-replicas``, ``--num-requests``, ``--rates`` and ``--seeds``,
    defaulting to the fields of ``defaults`` (its ``Params``); ``simulation_options`` reads them back."""
    parser.add_argument("--profile", default=defaults.profile)
    parser.add_argument("--num-replicas", type=int, default=defaults.num_replicas)
    parser.add_argument("--num-requests", type=int, default=defaults.num_requests)
    parser.add_argument(
        "--rates", default=",".join(f"{r:g}" for r in defaults.rates), help="req/s, comma-separated"
    )
    parser.add_argument("--seeds", default=",".join(str(s) for s in defaults.seeds))


def simulation_options(args: Any) -> dict[str, Any]:
    """The ``Params`` fields of ``add_simulation_flags``'s flags."""
    return {
        "profile": args.profile,
        "num_replicas": args.num_replicas,
        "num_requests": args.num_requests,
        "rates": tuple(float(r) for r in args.rates.split(",")),
        "seeds": tuple(int(s) for s in args.seeds.split(",")),
    }


def run_meta(command: str, duration_s: float, load_at_start: float | None = None) -> dict[str, Any]:
    """Where, when and how a result was produced, and the machine's load at its start and end; every
    table in the report prints it."""
    return {
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "duration_s": duration_s,
        "load_average": {"start": load_at_start, "end": load_average()},
    }


def this_command() -> str:
    return "binserve " + " ".join(sys.argv[1:])


# ---- engines -------------------------------------------------------------------------------------


class Engines:
    """Loads the model once and hands out a fresh engine (new scheduler, same weights and KV pool) per
    run, so every configuration in an experiment sees the same model on the same memory."""

    def __init__(self, model_dir: str, max_model_len: int = 2048, kv_cache_bytes: int = 128 * 2**20) -> None:
        import torch

        from workers.llm import LLM

        torch.set_num_threads(1)  # two cores: more intra-op threads oversubscribe and run ~100x slower
        ensure_tiny_model(model_dir)
        self.config = EngineConfig(
            ModelConfig(model_dir, max_model_len=max_model_len),
            cache=CacheConfig(kv_cache_bytes=kv_cache_bytes),
        )
        self._llm = LLM(self.config)
        self.tokenizer = self._llm.tokenizer
        self.num_blocks: int = self._llm.runner.num_blocks
        self._warm_up()

    def _warm_up(self) -> None:
        """Run a few steps first, so one-off costs (allocator, first kernels) land in no measurement."""
        from pipeline.request import SamplingParams

        prompts = [[5 + i] * (3 + 19 * i) for i in range(16)]  # 3 to 288 tokens, batches up to 16
        self._llm.engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))

    def engine(self, scheduler: SchedulerConfig) -> Engine:
        from workers.llm import LLM

        return LLM(replace(self.config, scheduler=scheduler), runner=self._llm.runner).engine


def ensure_tiny_model(model_dir: str) -> None:
    """Write the repository's seeded tiny checkpoint where the default expects it, if it is missing."""
    if not (Path(model_dir) / "config.json").is_file() and model_dir == DEFAULT_MODEL_DIR:
        from workers.tiny_model import make_tiny_model

        make_tiny_model(model_dir)


# ---- lengths the scheduler is told ------------------------------------------------------------


class Predictor(Protocol):
    """The interface of ``cluster.predictor.LengthPredictor``."""

    def predict(self, prompts: list[str]) -> Any: ...  # -> Prediction with ``.output_tokens``

    def bin_boundaries(self, num_bins: int) -> list[int]: ...


@dataclass(frozen=True)
class LengthEstimates:
    """Per request, the output length the scheduler and router see, and how bins are cut."""

    source: str
    """``oracle`` (the forced length itself) or ``predicted`` (the trained predictor)."""
    output_tokens: tuple[int, ...]
    bin_boundaries: Callable[[int], list[int]]
    """Equal-mass bin edges for ``k`` bins: of the true lengths (oracle) or of the predictor's own
    predictions of the workload's prompts (predicted; ``tools/predictor/bins.py``)."""


def oracle_lengths(requests: Sequence[WorkloadRequest]) -> LengthEstimates:
    lengths = sorted(r.output_tokens for r in requests)
    return LengthEstimates(
        "oracle", tuple(r.output_tokens for r in requests), lambda k: equal_mass_boundaries(lengths, k)
    )


def predicted_lengths(requests: Sequence[WorkloadRequest], predictor: Predictor) -> LengthEstimates:
    prediction = predictor.predict([r.prompt for r in requests])
    lengths = tuple(int(n) for n in prediction.output_tokens)
    return LengthEstimates("predicted", lengths, lambda k: [int(e) for e in predictor.bin_boundaries(k)])


@dataclass(frozen=True)
class PredictorChoice:
    predictor: Predictor | None
    note: str
    """What was used, or why nothing was (printed in the report)."""


def load_predictor(path: str | None = None) -> PredictorChoice:
    """The trained predictor at ``path`` (default: the ChatGPT-length predictor in
    ``cluster/predictor/chatgpt``, since these experiments force ShareGPT's ChatGPT answer lengths on
    the tiny model), or None and the reason it could not be loaded."""
    try:
        from cluster.predictor import CHATGPT_DIR, LengthPredictor

        predictor = LengthPredictor.load(path or CHATGPT_DIR)
        return PredictorChoice(predictor, f"trained predictor from `{path or 'cluster/predictor/chatgpt'}`")
    except Exception as exc:  # optional here: any failure is reported in the results, not fatal
        return PredictorChoice(
            None, f"predictor unavailable ({type(exc).__name__}: {exc}); predicted rows not run"
        )


def length_estimates(requests: Sequence[WorkloadRequest], choice: PredictorChoice) -> list[LengthEstimates]:
    """Oracle lengths, then the predictor's when there is one."""
    estimates = [oracle_lengths(requests)]
    if choice.predictor is not None:
        estimates.append(predicted_lengths(requests, choice.predictor))
    return estimates


def prediction_quality(true_tokens: Sequence[int], predicted_tokens: Sequence[int]) -> dict[str, float]:
    """Mean absolute error (tokens) and Spearman rank correlation: SSJF needs the order, not the value."""
    mae = statistics.fmean(abs(t - p) for t, p in zip(true_tokens, predicted_tokens, strict=True))
    return {"mae_tokens": mae, "spearman": spearman(true_tokens, predicted_tokens)}


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    if len(xs) < 2 or len(set(rx)) < 2 or len(set(ry)) < 2:
        return math.nan
    return statistics.correlation(rx, ry)


# ---- report output -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(result: dict[str, Any]) -> str:
    """The line under every table: machine, date, command, duration, load average."""
    meta = result["meta"]
    m = meta["machine"]
    load = meta.get("load_average") or {}
    load_text = (
        f"load average {load['start']} at the start, {load['end']} at the end"
        if load.get("start") is not None or load.get("end") is not None
        else "load average not recorded"
    )
    duration = (
        f"{meta['duration_s']:.0f} s" if meta.get("duration_s") is not None else "duration not recorded"
    )
    return (
        f"*{m['cpu']}, {m['num_cores']} cores ({m['platform']}); {meta['date']}; "
        f"`{meta['command']}`; {duration}; {load_text}.*"
    )


def share_of_gain(gain: float | None, oracle_gain: float | None) -> float | None:
    """The share of the exact lengths' gain that predicted lengths keep (``gain`` over ``oracle_gain``, both
    signed so that larger is better); None where the exact lengths gained nothing, so there is no gain to
    share. Negative: the prediction made things worse where the exact lengths helped."""
    if gain is None or oracle_gain is None or math.isnan(gain) or not oracle_gain > 0:
        return None
    return gain / oracle_gain


def capacity_under_slo(ttft_s_by_rate: dict[float, float], slo_s: float) -> tuple[float | None, float | None]:
    """(capacity, first miss): the highest rate whose mean TTFT, and every lower rate's, is within ``slo_s``
    (None if the lowest misses), and the lowest rate that misses it (None if none does)."""
    held = None
    for rate in sorted(ttft_s_by_rate):
        if ttft_s_by_rate[rate] > slo_s:
            return held, rate
        held = rate
    return held, None


def target(description: str, value: float | None, threshold: float, higher_is_better: bool = True) -> dict:
    """One acceptance target and whether this run reached it (None: not measured in this run)."""
    if value is None or math.isnan(value):
        met = None
    else:
        met = value >= threshold if higher_is_better else value <= threshold
    return {"target": description, "value": value, "threshold": threshold, "met": met}


def new_figure(num_axes: int = 1, width_in: float = 5.0, height_in: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, num_axes, figsize=(width_in * num_axes, height_in), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """NaN and infinities (a metric with no samples) become null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def workload_text(p: dict[str, Any], num_requests: int) -> str:
    """How a result's requests were made, for its table's caption (``p``: the result's params)."""
    if p.get("labels"):
        return (
            f"{num_requests} held-out ShareGPT prompts of `{Path(p['labels']).name}` as chat (cut to "
            f"{p['max_prompt_tokens']} tokens), each answer forced to the length the model itself gave it there "
            f"(its own lengths, capped at {p['max_output_tokens']})"
        )
    return (
        f"{num_requests} ShareGPT requests (prompts cut to {p['max_prompt_tokens']} tokens, outputs forced to "
        f"ChatGPT's answer lengths, capped at {p['max_output_tokens']})"
    )


@dataclass(frozen=True)
class EngineWorkload:
    """The fields of an engine experiment's ``Params`` that choose its model and requests
    (``sharegpt_workload``); each experiment extends it and sets its own sizes."""

    model_dir: str = DEFAULT_MODEL_DIR
    labels: str = ""
    """The served model's length labels: its own answer lengths on held-out prompts; empty: ChatGPT's."""
    num_requests: int = 64
    max_prompt_tokens: int = 256
    max_output_tokens: int = 512
    seed: int = 0


@dataclass(frozen=True)
class SimulatedWorkload:
    """The fields of a simulated cluster's ``Params``: a measured (or estimated) step-cost profile, the tokenizer
    that cuts ShareGPT's prompts, and the cluster's size; each simulation extends it."""

    profile: str = str(REPO_DIR / "profiles" / "gpu-llama3-8b-h100-estimate.json")
    tokenizer_dir: str = DEFAULT_MODEL_DIR
    num_requests: int = 4000
    max_prompt_tokens: int = 2048
    max_output_tokens: int = 1024
    num_replicas: int = 16
    max_num_seqs: int = 32
    """Per replica."""
    seed: int = 0


def sharegpt_workload(tokenizer, params: EngineWorkload | SimulatedWorkload) -> list[WorkloadRequest]:
    """An experiment's ShareGPT requests (``params``: its ``Params``). Lengths are ChatGPT's answers' unless
    ``params.labels`` names the served model's own length labels: then the held-out labelled prompts,
    chat-rendered, with the model's own answer lengths (``bench.workload.labelled_requests``)."""
    from bench.workload import labelled_requests, sharegpt_requests

    if getattr(params, "labels", ""):
        return labelled_requests(
            params.model_dir,
            params.labels,
            params.num_requests,
            params.max_prompt_tokens,
            params.max_output_tokens,
        )
    return sharegpt_requests(
        tokenizer, params.num_requests, params.seed, params.max_prompt_tokens, params.max_output_tokens
    )
