"""Fit the length predictor's distribution table and measure its calibration on fresh prompts.

    python -m tools.predictor.uncertainty --labels cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl \
        --tokenizer .models/smollm2-135m-instruct --json docs/results/smollm2-135m-instruct/length_distribution.json \
        --save cluster/predictor/default

The shipped predictor's point predictions on its **clean** held-out prompts (held out, and no near-duplicate
or conversation-mate among the prompts it trained on: ``generalisation.Corpus``) are the only ones whose
errors are those of fresh prompts, so the table (``cluster/predictor/distribution.py``) is fitted on them.
Calibration is measured by grouped cross-fitting: the prompts fall into 5 folds by near-duplicate group,
each fold's quantiles come from the table fitted on the other four, and for each level q the share of true
lengths below the predicted q-quantile is counted (ideal: q). Many answers stop at the 512-token cap, so a
quantile at the cap has an atom under it: the share strictly below and the share at or below are both
given, and q is calibrated when it lies between them. The JSON keeps every prompt's counts and fold, so
``bench.experiments.expected_remaining`` can give each simulated request its out-of-fold distribution.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.labels import is_validation, read_records
from cluster.predictor.distribution import DistributionTable
from tools.predictor.generalisation import Corpus, write_with_meta
from tools.predictor.near_duplicates import grouped_folds

NUM_FOLDS = 5
REPORT_LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)


def clean_held_out(
    labels_path: str, tokenizer_dir: str, corpus: Corpus, predictor_path: str | None = None
) -> tuple[list[dict], int]:
    """Per clean held-out prompt: id, chat-rendered prompt tokens, true and predicted output tokens, group;
    and the predictor's cap (its labels' ``max_tokens``)."""
    from cluster.predictor.predictor import LengthPredictor
    from workers.checkpoint import load_tokenizer

    predictor = LengthPredictor.load(predictor_path)
    fraction = predictor.metadata.validation_fraction
    trained = corpus.trained_groups(fraction)
    records = [
        r
        for r in read_records(labels_path, tokenizer_dir)
        if is_validation(r.record_id, fraction) and corpus.group_of_id[r.record_id] not in trained
    ]
    predicted = predictor.predict([r.prompt for r in records]).output_tokens
    tokenizer = load_tokenizer(tokenizer_dir)
    rows = []
    for record, guess in zip(records, predicted, strict=True):
        chat = [{"role": "user", "content": record.prompt}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)["input_ids"]
        rows.append(
            {
                "id": record.record_id,
                "prompt_tokens": len(ids),
                "output_tokens": record.output_tokens,
                "predicted_tokens": int(guess),
                "group": corpus.group_of_id[record.record_id],
            }
        )
    return rows, predictor.metadata.max_output_tokens or max(r["output_tokens"] for r in rows)


def calibration(rows: list[dict], max_output_tokens: int, num_bands: int) -> dict:
    """Out-of-fold coverage of each reported quantile, and of the point prediction read as one."""
    below = {q: 0 for q in REPORT_LEVELS}
    at_or_below = {q: 0 for q in REPORT_LEVELS}
    point_below = point_at_or_below = 0
    for fold in range(NUM_FOLDS):
        train = [r for r in rows if r["fold"] != fold]
        table = DistributionTable.fit(
            [r["predicted_tokens"] for r in train],
            [r["output_tokens"] for r in train],
            max_output_tokens,
            num_bands,
        )
        for r in rows:
            if r["fold"] != fold:
                continue
            spread = table.for_prediction(r["predicted_tokens"])
            true = r["output_tokens"]
            for q in REPORT_LEVELS:
                predicted_q = spread.quantile(r["predicted_tokens"], q)
                below[q] += true < predicted_q
                at_or_below[q] += true <= predicted_q
            point_below += true < r["predicted_tokens"]
            point_at_or_below += true <= r["predicted_tokens"]
    n = len(rows)
    return {
        "num_prompts": n,
        "num_groups": len({r["group"] for r in rows}),
        "num_bands": num_bands,
        "levels": [
            {"level": q, "share_below": below[q] / n, "share_at_or_below": at_or_below[q] / n}
            for q in REPORT_LEVELS
        ],
        "point_prediction": {"share_below": point_below / n, "share_at_or_below": point_at_or_below / n},
        "share_at_cap": sum(r["output_tokens"] >= max_output_tokens for r in rows) / n,
    }


def run(
    labels_path: str, tokenizer_dir: str, num_bands: int, predictor_path: str | None = None
) -> tuple[dict, DistributionTable]:
    rows, max_output_tokens = clean_held_out(labels_path, tokenizer_dir, Corpus.load(), predictor_path)
    for r, fold in zip(rows, grouped_folds([r["group"] for r in rows], NUM_FOLDS), strict=True):
        r["fold"] = fold
    made_by = (
        f"tools/predictor/uncertainty.py: the default predictor's {len(rows)} clean held-out prompts of "
        f"{os.path.basename(labels_path)} (true / predicted length), {num_bands} equal-count bands of predictions"
    )
    table = DistributionTable.fit(
        [r["predicted_tokens"] for r in rows],
        [r["output_tokens"] for r in rows],
        max_output_tokens,
        num_bands,
        made_by=made_by,
    )
    result = {
        "labels": labels_path,
        "max_output_tokens": max_output_tokens,
        "num_folds": NUM_FOLDS,
        "calibration": calibration(rows, max_output_tokens, num_bands),
        "calibration_one_band": calibration(rows, max_output_tokens, 1),
        "table": {"band_centres": table.band_centres, "levels": table.levels, "ratios": table.ratios},
        "rows": rows,
    }
    return result, table


def render(result: dict) -> str:
    lines = []
    for key in ("calibration", "calibration_one_band"):
        c = result[key]
        lines += [
            f"{c['num_prompts']} clean held-out prompts ({c['num_groups']} groups), {c['num_bands']} band(s), "
            f"{result['num_folds']}-fold grouped cross-fitting; {c['share_at_cap']:.0%} of answers at the cap",
            "| predicted quantile | share of answers below | at or below |",
            "|---|---|---|",
            *(
                f"| p{round(x['level'] * 100)} | {x['share_below']:.2f} | {x['share_at_or_below']:.2f} |"
                for x in c["levels"]
            ),
            f"| the point prediction | {c['point_prediction']['share_below']:.2f} | "
            f"{c['point_prediction']['share_at_or_below']:.2f} |",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="a label file of cluster/predictor/data/")
    parser.add_argument("--tokenizer", required=True, help="the served model's directory (its tokenizer)")
    parser.add_argument("--num-bands", type=int, default=3, help="bands of predicted length (equal counts)")
    parser.add_argument("--json", required=True, help="write the calibration and the per-prompt rows here")
    parser.add_argument(
        "--save", help="also write the table fitted on every clean prompt into this directory"
    )
    parser.add_argument("--predictor", default=None, help="a predictor directory, or default / fast (default)")
    args = parser.parse_args(argv)
    if args.num_bands < 1:
        parser.error(f"--num-bands: must be >= 1, got {args.num_bands}")
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    result, table = run(args.labels, args.tokenizer, args.num_bands, args.predictor)
    write_with_meta(result, args.json, "uncertainty", argv, started, load_at_start)
    if args.save:
        print(f"wrote {table.save(args.save)}")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
