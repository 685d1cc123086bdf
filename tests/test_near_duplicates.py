"""Near-duplicate prompts, conversation groups, grouped folds and group bootstrap intervals."""

from __future__ import annotations

import random

import pytest

from tools.predictor.evaluate import spearman, spearman_ci95
from tools.predictor.near_duplicates import (
    JACCARD_THRESHOLD,
    group_bootstrap_ci,
    grouped_folds,
    jaccard,
    near_duplicate_pairs,
    prompt_groups,
    shingles,
)

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def variant(base: list[str], num_changed: int, rng: random.Random) -> str:
    words = list(base)
    for position in rng.sample(range(len(words)), num_changed):
        words[position] = rng.choice(WORDS) + "x"
    return " ".join(words)


def test_short_prompts_are_one_shingle_and_case_does_not_matter() -> None:
    assert shingles("Hi there") == shingles("hi  THERE") and len(shingles("hi there")) == 1
    assert shingles("hi") != shingles("hi there")
    assert len(shingles("a b c d e f")) == 2  # two word 5-grams


def test_minhash_finds_exactly_the_pairs_at_or_above_the_threshold() -> None:
    """Against brute force over every pair: LSH misses none (recall) and the exact check keeps no pair
    below the threshold (precision), on bases with variants from barely to very different."""
    rng = random.Random(0)
    texts = []
    for _ in range(12):
        base = [rng.choice(WORDS) for _ in range(rng.randint(60, 150))]
        texts.append(" ".join(base))
        texts += [variant(base, rng.randint(0, 5), rng) for _ in range(3)]
    sets = [shingles(t) for t in texts]
    brute = [
        (i, j)
        for i in range(len(texts))
        for j in range(i + 1, len(texts))
        if jaccard(sets[i], sets[j]) >= JACCARD_THRESHOLD
    ]
    near = {jaccard(sets[i], sets[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))}
    assert any(0.6 <= x < JACCARD_THRESHOLD for x in near) and len(brute) >= 12  # the test has both kinds
    assert near_duplicate_pairs(texts) == brute


def test_groups_join_conversations_and_near_duplicates_transitively() -> None:
    long_text = " ".join(f"w{i}" for i in range(60))
    texts = [long_text, "something else entirely here today", long_text + " extra", "unrelated", "other"]
    ids = ["a_0", "b_0", "c_0", "b_3", "d_0"]
    groups = prompt_groups(ids, texts)
    assert groups[0] == groups[2]  # near-duplicates
    assert groups[1] == groups[3]  # one conversation
    assert len({groups[0], groups[1], groups[4]}) == 3


def test_grouped_folds_keep_each_group_whole_and_balance_the_folds() -> None:
    rng = random.Random(1)
    groups = [rng.randrange(40) for _ in range(300)]
    folds = grouped_folds(groups, 5)
    assert all(
        len({f for f, g in zip(folds, groups, strict=True) if g == group}) == 1 for group in set(groups)
    )
    sizes = [folds.count(f) for f in range(5)]
    assert max(sizes) - min(sizes) <= max(groups.count(g) for g in set(groups))
    assert folds == grouped_folds(groups, 5)  # deterministic
    with pytest.raises(ValueError, match="num_folds: must be >= 2"):
        grouped_folds(groups, 1)


def test_group_bootstrap_widens_the_interval_when_prompts_repeat() -> None:
    """Each prompt counted three times: resampling records treats copies as evidence, groups do not."""
    rng = random.Random(2)
    truth = [rng.randint(1, 500) for _ in range(60)]
    estimates = [t + rng.gauss(0, 200) for t in truth]
    copies_truth, copies_estimates, groups = truth * 3, estimates * 3, list(range(60)) * 3
    low, high = group_bootstrap_ci(copies_estimates, copies_truth, groups, num_resamples=300)
    record_low, record_high = spearman_ci95(copies_estimates, copies_truth, num_resamples=300)
    assert low < spearman(copies_estimates, [float(t) for t in copies_truth]) < high
    assert high - low > 1.4 * (record_high - record_low)


def test_a_held_out_prompt_is_leaked_when_its_group_has_a_trained_prompt() -> None:
    from bench.labels import is_validation
    from tools.predictor.generalisation import Corpus

    ids = [f"c{i}_0" for i in range(200)]
    corpus = Corpus(group_of_id={i: n // 2 for n, i in enumerate(ids)}, ids=ids)  # groups of two
    trained = corpus.trained_groups(0.3)
    for n, record_id in enumerate(ids):
        partner = ids[n ^ 1]
        expected = not (is_validation(record_id, 0.3) and is_validation(partner, 0.3))
        assert (corpus.group_of_id[record_id] in trained) == expected


def test_out_of_fold_estimates_come_from_a_line_fitted_without_the_fold() -> None:
    import numpy as np

    from tools.predictor.generalisation import fold_estimates

    x = np.arange(10, dtype=float)
    y = 2 * x + 1
    y[0] = 100.0  # an outlier in fold 0 pulls only the other folds' lines
    estimates = fold_estimates(x, y, [0] * 5 + [1] * 5)
    assert estimates[:5] == pytest.approx(list(2 * x[:5] + 1))  # fold 0 scored by fold 1's exact line
    assert estimates[5:] != pytest.approx(list(2 * x[5:] + 1))
