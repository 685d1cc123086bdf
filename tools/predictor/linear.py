"""The linear length predictor: ridge regressions stacked on ChatGPT's answer lengths, fitted in closed form.

    binserve predictor train-linear --labels cluster/predictor/data/smollm2-135m-instruct.seed0.jsonl \\
        --tokenizer .models/smollm2-135m-instruct --layers 4 --out cluster/predictor/default

Features of a prompt (``Design``), exactly as the served predictor computes them: MiniLM's output pooled
after ``layers`` layers (0: its word-piece embeddings alone), the head's prompt-length features
(``model.prompt_features``: log word pieces and its square) and its hashed word 1- and 2-grams
(``cluster/predictor/ngrams.py``). Pooled and length features are standardised on the fitted rows.

Stacking (``fit_stacked``): one ridge learns ChatGPT's answer length, in the served model's tokens, from the
auxiliary ShareGPT prompts (thousands, cheap to have); a second ridge learns the served model's own lengths
from its labels, over the same features plus the first one's prediction. Both are linear in the features, so
the pair collapses into one linear function, which ``LengthModel``'s ``linear`` head holds. The family, the
stacking and ``alpha`` were chosen on prompts unlike any the model saw (``tools/predictor/choice.py``).

The training split is the shipped predictors' (``validation_fraction`` by id hash): labels outside it, and
auxiliary records outside it and outside every held-out label's near-duplicate group, so the held-out and
clean figures of ``eval-predictor`` and ``tools/predictor/generalisation.py`` stay comparable across
predictors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_NGRAM_FEATURES = 2**16
MAX_OUTPUT_TOKENS = 512
MAX_PROMPT_TOKENS = 48
"""Word pieces the encoder reads per prompt (head and tail), as the shipped MiniLM predictors were trained."""
"""The labels' cap (SmolLM2's answers are collected at 512 tokens); ChatGPT's lengths are capped alike."""


@dataclass
class Design:
    """Per prompt: ``pooled`` (N, 384) raw, ``base`` (N, 2) raw prompt-length features, ``ngrams`` (N, F) CSR."""

    pooled: np.ndarray
    base: np.ndarray
    ngrams: object

    @classmethod
    def of(cls, prompts: list[str], num_layers: int, depths: tuple[int, ...] | None = None) -> dict[int, Design]:
        """The design of ``prompts`` for each encoder depth of ``depths`` (default: ``num_layers`` only),
        computed in one pass (float32, batches of 32, as the served float32 predictor runs)."""
        import torch

        from cluster.predictor.encoder import PromptEncoder
        from cluster.predictor.model import prompt_features
        from cluster.predictor.ngrams import ngram_features

        depths = depths or (num_layers,)
        encoder = PromptEncoder(max(depths), MAX_PROMPT_TOKENS)
        tokenized = encoder.tokenize(prompts)
        base = prompt_features(tokenized.num_prompt_tokens).numpy().astype(np.float64)
        ngrams = ngram_features(prompts, NUM_NGRAM_FEATURES)
        pooled = {d: np.empty((len(prompts), encoder.pooled_size), dtype=np.float32) for d in depths}
        order = sorted(range(len(prompts)), key=lambda i: len(tokenized.token_ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), 32):
                rows = order[start : start + 32]
                input_ids, mask = encoder.pad([tokenized.token_ids[i] for i in rows])
                hidden, depth = encoder.embed(input_ids), 0
                for target in sorted(depths):
                    hidden = encoder.run_layers(hidden, mask, depth, target)
                    depth = target
                    pooled[target][rows] = encoder.pool(hidden, mask).numpy()
        return {d: cls(pooled[d].astype(np.float64), base, ngrams) for d in depths}


@dataclass
class Standardiser:
    """Means and scales of the dense features over the fitted rows; pooled columns are also divided by the
    square root of their number, so the encoder does not outweigh the two length features in the penalty."""

    pooled_mean: np.ndarray
    pooled_scale: np.ndarray
    base_mean: np.ndarray
    base_std: np.ndarray

    @classmethod
    def fit(cls, design: Design, rows: np.ndarray) -> Standardiser:
        pooled, base = design.pooled[rows], design.base[rows]
        scale = (pooled.std(axis=0) + 1e-6) * np.sqrt(pooled.shape[1])
        return cls(pooled.mean(axis=0), scale, base.mean(axis=0), base.std(axis=0) + 1e-6)

    def matrix(self, design: Design, rows: np.ndarray, ngrams: bool = True):
        from scipy.sparse import csr_matrix, hstack

        pooled = (design.pooled[rows] - self.pooled_mean) / self.pooled_scale
        base = (design.base[rows] - self.base_mean) / self.base_std
        parts = [design.ngrams[rows]] if ngrams else []
        return hstack([*parts, csr_matrix(pooled), csr_matrix(base)]).tocsr()


@dataclass
class LinearFit:
    """``log1p(length) = matrix @ coef + intercept`` over ``Standardiser.matrix`` columns."""

    coef: np.ndarray
    intercept: float


def fit_stacked(x, y: np.ndarray, train: np.ndarray, aux: np.ndarray, alpha: float) -> LinearFit:
    """Ridge on ChatGPT's lengths (``aux`` rows), then ridge on the labels (``train`` rows) with that
    prediction as one more column; collapsed into one linear function of ``x``'s columns."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.linear_model import Ridge

    chatgpt = Ridge(alpha=alpha).fit(x[aux], y[aux])
    stacked = hstack([x[train], csr_matrix(chatgpt.predict(x[train])[:, None])]).tocsr()
    served = Ridge(alpha=alpha).fit(stacked, y[train])
    weight = served.coef_[-1]
    return LinearFit(served.coef_[:-1] + weight * chatgpt.coef_, served.intercept_ + weight * chatgpt.intercept_)


def to_model(fit: LinearFit, standardiser: Standardiser, model) -> None:
    """Write ``fit`` into a ``LengthModel`` with the ``linear`` head (its output 0 is log1p tokens)."""
    import torch

    num_ngrams = len(model.ngram_weight)
    ngram_coef, pooled_coef, base_coef = np.split(fit.coef, [num_ngrams, num_ngrams + len(standardiser.pooled_mean)])
    pooled_weight = pooled_coef / standardiser.pooled_scale
    bias = fit.intercept - float(pooled_weight @ standardiser.pooled_mean)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(np.concatenate([pooled_weight, base_coef]))[None, :])
        model.head.bias.fill_(bias)
        model.feature_mean.copy_(torch.tensor(standardiser.base_mean))
        model.feature_std.copy_(torch.tensor(standardiser.base_std))
        model.log_tokens_mean.fill_(0.0)
        model.log_tokens_std.fill_(1.0)
        model.ngram_weight.copy_(torch.tensor(ngram_coef))


def train_linear(
    labels_path: str, tokenizer: str, num_layers: int, alpha: float, validation_fraction: float, label_source: str
):
    """The fitted ``LengthPredictor`` (not saved)."""
    from bench.labels import count_tokens, is_validation, read_records
    from bench.workload import read_sharegpt
    from cluster.predictor.predictor import LengthPredictor, build_model
    from tools.predictor.generalisation import Corpus
    from tools.predictor.train import TrainConfig, make_metadata

    labels = read_records(labels_path, tokenizer)
    train_labels = [r for r in labels if not is_validation(r.record_id, validation_fraction)]
    corpus = Corpus.load()
    held_out_groups = {corpus.group_of_id[r.record_id] for r in labels if is_validation(r.record_id, validation_fraction)}
    labelled = {r.record_id for r in labels}
    aux_pairs = [
        p
        for p in read_sharegpt()
        if p["id"] not in labelled
        and not is_validation(p["id"], validation_fraction)
        and corpus.group_of_id[p["id"]] not in held_out_groups
    ]
    prompts = [r.prompt for r in train_labels] + [p["prompt"] for p in aux_pairs]
    aux_lengths = np.minimum(count_tokens([p["response"] for p in aux_pairs], tokenizer), MAX_OUTPUT_TOKENS)
    y = np.log1p(np.concatenate([[r.output_tokens for r in train_labels], aux_lengths]).astype(float))
    design = Design.of(prompts, num_layers)[num_layers]
    everything = np.arange(len(prompts))
    train, aux = everything[: len(train_labels)], everything[len(train_labels) :]
    standardiser = Standardiser.fit(design, everything)
    fit = fit_stacked(standardiser.matrix(design, everything), y, train, aux, alpha)

    config = TrainConfig(
        head="linear",
        num_encoder_layers=num_layers,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        validation_fraction=validation_fraction,
        max_output_tokens=MAX_OUTPUT_TOKENS,
    )
    metadata = make_metadata(train_labels, config, str(tokenizer), label_source=label_source)
    metadata = dataclasses.replace(metadata, num_ngram_features=NUM_NGRAM_FEATURES, num_hidden=0)
    model = build_model(metadata, dropout=0.0)
    to_model(fit, standardiser, model)
    return LengthPredictor(model, metadata), {"num_training_labels": len(train_labels), "num_aux_records": len(aux_pairs)}


def main(args) -> int:
    predictor, counts = train_linear(
        args.labels, args.tokenizer, args.layers, args.alpha, args.validation_fraction, args.label_source
    )
    from tools.predictor.bins import cut_and_report

    directory = predictor.save(Path(args.out))
    print(f"wrote {directory}: {counts['num_training_labels']} labels, {counts['num_aux_records']} auxiliary records")
    cut_and_report(directory)
    return 0
