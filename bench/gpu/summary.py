"""The GPU check's report in a few lines: what a reader of the run's log needs first."""

from __future__ import annotations

import json
from pathlib import Path


def _parity(name: str, part: dict) -> list[str]:
    return [
        f"{name}: first divergence per prompt {part['first_divergences']} (None: equal for {part['max_tokens']} "
        f"tokens); teacher-forced logits: max |diff| {part['max_abs_logit_diff']:.4g}, min top-5 overlap "
        f"{part['min_top5_overlap']}/5, argmax flips {part['num_argmax_flips']} of {part['num_positions']} positions"
    ]


def _timing(name: str, part: dict, estimate: dict | None) -> list[str]:
    lines = [f"{name}: {len(part['cells'])} cells timed, {len(part['skipped_cells'])} skipped"]
    profile = part.get("profile", {})
    if profile.get("ok"):
        coef = {k: v for k, v in profile["coefficients"].items() if k != "source"}
        lines.append(f"  profile {profile['path']}: " + ", ".join(f"{k} {v:.3g}" for k, v in coef.items()))
        lines.append(f"  worst cell off the fit: {profile['fit']['max_abs_relative_error']:.0%}")
        if estimate is not None and "8b" in name:
            lines.append("  estimate:  " + ", ".join(f"{k} {estimate[k]:.3g}" for k in coef))
    for point in part.get("roofline", {}).get("points", []):
        peak = point["hbm_fraction_peak_bandwidth"]
        lines.append(
            f"  decode batch {point['batch']} @ {point['context_tokens']}: {point['step_s'] * 1e3:.2f} ms, "
            f"{point['ratio_to_bound']:.2f}x its {point['bound']} bound; HBM fraction "
            f"{point['hbm_fraction_measured_bandwidth']:.0%} of measured"
            + ("" if peak is None else f", {peak:.0%} of peak")
        )
    for label, step in part.get("breakdown", {}).get("steps", {}).items():
        shares = ", ".join(f"{k} {v:.0%}" for k, v in step["share"].items() if v >= 0.005)
        lines.append(f"  {label}: {shares}")
    return lines


def targets(report: dict) -> list[dict]:
    """The issue's two targets, judged on what the run measured (absent parts: not judged)."""
    found = []
    tiny = report["parts"].get("parity/tiny")
    if tiny and tiny["ok"]:
        diverged = [d for d in tiny["first_divergences"] if d is not None]
        value = min(diverged) if diverged else tiny["max_tokens"]
        found.append(
            {
                "target": f"tiny model in {tiny['dtype']}: greedy tokens equal transformers' for at least 16 "
                "tokens on every prompt",
                "value": value,
                "threshold": 16,
                "met": value >= 16,
            }
        )
    timing = report["parts"].get("timing/llama-3-8b")
    points = timing.get("roofline", {}).get("points", []) if timing and timing["ok"] else []
    for p in points:
        if p["batch"] == 1:
            found.append(
                {
                    "target": f"8B decode at batch 1, context {p['context_tokens']}: at most 1.5x its HBM "
                    "roofline bound (measured bandwidth)",
                    "value": p["ratio_to_bound"],
                    "threshold": 1.5,
                    "met": p["ratio_to_bound"] <= 1.5,
                }
            )
    return found


def summary(report: dict) -> str:
    estimate_path = Path(__file__).resolve().parents[2] / "profiles" / "gpu-llama3-8b-h100-estimate.json"
    estimate = json.loads(estimate_path.read_text()) if estimate_path.is_file() else None
    lines = [
        f"gpu-check ({report['mode']}) on {report['device_name']}, {report['dtype']}, torch {report['torch']}: "
        f"{report['wall_s']:.0f} s, {'all parts ok' if report['ok'] else 'SOME PARTS FAILED'}"
    ]
    for name, part in report["parts"].items():
        if not part["ok"]:
            lines.append(f"{name}: FAILED: {part['error']}")
        elif name.startswith("parity/"):
            lines += _parity(name, part)
        elif name.startswith("timing/"):
            lines += _timing(name, part, estimate)
        elif name == "machine":
            limits = part["limits"]
            lines.append(
                f"machine: {limits['read_bytes_per_s'] / 1e9:.0f} GB/s read, "
                f"{limits['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s {limits['dtype']} matmul"
            )
    lines += [f"skipped {s['what']}: {s['why']}" for s in report["skipped"]]
    for t in report.get("targets", []):
        lines.append(
            f"target {'MET' if t['met'] else 'MISSED'}: {t['target']}: {t['value']:.3g} (threshold {t['threshold']})"
        )
    return "\n".join(lines)
