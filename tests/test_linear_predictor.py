"""The linear length predictor: hashed n-grams, the stacked ridge collapsed into one linear head, and the
predictor that holds it predicting exactly what the fitted ridges predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cluster.predictor import LengthPredictor
from cluster.predictor.ngrams import hashed_ngrams, ngram_features

PROMPTS = [
    "hi",
    "Translate 'good morning' into French.",
    "Write a detailed essay about the sea, its tides and its storms.",
    "List three prime numbers.",
    "Explain how TCP congestion control works, step by step, with an example.",
    "What is 2 + 2?",
    "Write a poem about autumn leaves falling on a quiet street.",
    "Summarise the plot of Hamlet in one paragraph.",
    "Give me a recipe for pancakes with blueberries.",
    "Describe the water cycle to a ten-year-old.",
    "Name the capital of Peru.",
    "Draft a cover letter for a junior data engineer position at a bank.",
]


def test_hashed_ngrams_are_words_and_word_pairs_of_unit_length() -> None:
    indices, values = hashed_ngrams("The cat, the CAT sat.", 2**16)
    # words of 2+ characters, lower-cased: the, cat, the, cat, sat; pairs: the cat, cat the, the cat, cat sat
    counts = dict(zip(indices.tolist(), values.tolist(), strict=True))
    assert len(counts) == 6  # the, cat, sat, "the cat", "cat the", "cat sat"
    assert np.isclose(np.linalg.norm(values), 1.0)
    assert sorted(np.round(np.asarray(list(counts.values())) / min(counts.values()), 6)) == [1, 1, 1, 2, 2, 2]  # the, cat, "the cat" twice
    again = hashed_ngrams("the cat the cat sat", 2**16)
    assert sorted(zip(*again, strict=True)) == sorted(zip(indices, values, strict=True))
    assert len(hashed_ngrams("a ! ?", 2**16)[0]) == 0  # no word of two characters
    matrix = ngram_features(["the cat", "a"], 2**10)
    assert matrix.shape == (2, 2**10) and matrix[1].nnz == 0 and np.isclose(matrix[0].power(2).sum(), 1.0)


@pytest.mark.parametrize("num_layers", [0, 1])
def test_the_linear_head_predicts_what_the_stacked_ridges_predict(tmp_path: Path, num_layers: int) -> None:
    """Fit the two ridges on a handful of prompts, collapse them into the model, save, load, and predict:
    the loaded predictor's log lengths equal the ridges' own predictions on the same features."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.linear_model import Ridge

    from cluster.predictor.predictor import PredictorMetadata, build_model
    from tools.predictor.linear import NUM_NGRAM_FEATURES, Design, Standardiser, fit_stacked, to_model

    rng = np.random.default_rng(0)
    y = np.log1p(rng.integers(5, 500, len(PROMPTS)).astype(float))
    design = Design.of(PROMPTS, num_layers)[num_layers]
    everything = np.arange(len(PROMPTS))
    train, aux = everything[:6], everything[6:]
    standardiser = Standardiser.fit(design, everything)
    x = standardiser.matrix(design, everything)
    fit = fit_stacked(x, y, train, aux, alpha=1.0)

    # The pair of ridges, run as two models: what the collapsed function must reproduce.
    chatgpt = Ridge(alpha=1.0).fit(x[aux], y[aux])
    served = Ridge(alpha=1.0).fit(hstack([x[train], csr_matrix(chatgpt.predict(x[train])[:, None])]), y[train])
    expected = served.predict(hstack([x, csr_matrix(chatgpt.predict(x)[:, None])]))
    assert np.allclose(x @ fit.coef + fit.intercept, expected, atol=1e-8)

    metadata = PredictorMetadata(
        head="linear",
        num_encoder_layers=num_layers,
        num_finetune_layers=0,
        max_prompt_tokens=48,
        num_hidden=0,
        bucket_quantiles=[0.5],
        bucket_boundaries=[100],
        median_output_tokens=100.0,
        length_quantiles=[1.0, 512.0],
        num_training_records=len(train),
        validation_fraction=0.3,
        tokenizer="test",
        seed=0,
        max_output_tokens=100_000,
        num_ngram_features=NUM_NGRAM_FEATURES,
    )
    model = build_model(metadata, dropout=0.0)
    to_model(fit, standardiser, model)
    LengthPredictor(model, metadata).save(tmp_path / "linear")
    loaded = LengthPredictor.load(tmp_path / "linear")
    log_tokens, buckets = loaded.predict_log_tokens(PROMPTS)
    assert buckets is None
    assert np.allclose(log_tokens, expected, atol=1e-4)
    # One prompt at a time gives the same answers (padding is masked; n-grams are per prompt).
    assert np.allclose([loaded.predict_log_tokens([p])[0][0] for p in PROMPTS], log_tokens, atol=1e-4)


def test_n_gram_weights_need_the_linear_head() -> None:
    from cluster.predictor.encoder import PromptEncoder
    from cluster.predictor.model import LengthModel

    with pytest.raises(ValueError, match="num_ngram_features: only with the linear head"):
        LengthModel(PromptEncoder(1, 48), "regression", 2, 0, 8, 0.0, num_ngram_features=16)


def test_train_linear_rejects_bad_options_by_name(tmp_path: Path) -> None:
    from tests.calls import run_predictor_cli

    base = ["predictor", "train-linear", "--labels", "x.jsonl", "--tokenizer", str(tmp_path), "--out", str(tmp_path)]
    for extra, match in (
        (["--layers", "7"], "layers: must be in 0..6, got 7"),
        (["--alpha", "0"], "alpha: must be > 0"),
        (["--validation-fraction", "1"], r"validation_fraction: must be in \(0, 1\)"),
    ):
        with pytest.raises(ValueError, match=match):
            run_predictor_cli(*base, *extra)


def test_the_shipped_predictors_are_linear_and_named_by_path() -> None:
    from cluster.config import PredictorConfig
    from cluster.predictor import DEFAULT_DIR, FAST_DIR, predictor_dir
    from cluster.predictor.distribution import DistributionTable

    assert predictor_dir(None) == predictor_dir("default") == DEFAULT_DIR and predictor_dir("fast") == FAST_DIR
    assert predictor_dir("/some/dir").as_posix() == "/some/dir"
    default, fast = LengthPredictor.load(), LengthPredictor.load(PredictorConfig(path="fast").path)
    assert default.metadata.head == fast.metadata.head == "linear"
    assert (default.metadata.num_encoder_layers, fast.metadata.num_encoder_layers) == (4, 0)
    assert default.metadata.validation_fraction == fast.metadata.validation_fraction  # one held-out split
    for name in ("default", "fast"):
        assert DistributionTable.of_predictor(name) is not None
    prompts = ["hi", "Write a detailed essay about the history of the printing press."]
    for predictor in (default, fast):
        lengths = predictor.predict(prompts).output_tokens
        assert all(1 <= n <= 512 for n in lengths)
