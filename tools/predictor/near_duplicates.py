"""Groups of prompts that must stay on one side of a split: near-duplicates and turns of one conversation.

    groups = prompt_groups(record_ids, prompts)              # one group id per prompt
    folds = grouped_folds(groups, num_folds=5)               # a group never spans two folds
    low, high = group_bootstrap_ci(estimates, truth, groups)

A held-out prompt that nearly repeats a training prompt (ShareGPT holds many: the same question pasted
twice, templates with one word changed) or comes from the same conversation tells how well a predictor
remembers, not how well it generalises. Near-duplicates are pairs whose word 5-gram sets have a Jaccard
similarity of at least 0.8, found with MinHash signatures (numpy) and locality-sensitive hashing, then
checked exactly on the sets, so every reported pair really is that similar.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

NGRAM_WORDS = 5
JACCARD_THRESHOLD = 0.8
NUM_PERMUTATIONS = 128
NUM_BANDS = 32
"""LSH bands of 4 rows each: a pair at Jaccard 0.8 shares a band with probability 1 - (1 - 0.8**4)**32,
above 0.99999; candidates are then checked exactly, so the loose bands cost time, not precision."""
_PRIME = np.uint64(4_294_967_291)  # the largest prime below 2**32: (a * x + b) fits 64 bits for x, a < 2**32


def shingles(text: str, num_words: int = NGRAM_WORDS) -> frozenset[int]:
    """32-bit hashes of the text's word ``num_words``-grams (lower-cased, split on whitespace). A text of
    fewer words is one shingle, the whole of it, so two short prompts match only when equal."""
    words = text.lower().split()
    grams = [" ".join(words[i : i + num_words]) for i in range(max(1, len(words) - num_words + 1))]
    return frozenset(
        int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=4).digest(), "little") for g in grams
    )


def minhash_signatures(
    shingle_sets: Sequence[frozenset[int]], num_permutations: int = NUM_PERMUTATIONS, seed: int = 0
) -> np.ndarray:
    """(num sets, num_permutations) uint64: per universal hash (a x + b) mod p, the set's minimum. Two
    sets agree in one column with probability equal to their Jaccard similarity."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(_PRIME), num_permutations, dtype=np.uint64)  # (P,)
    b = rng.integers(0, int(_PRIME), num_permutations, dtype=np.uint64)  # (P,)
    signatures = np.empty((len(shingle_sets), num_permutations), dtype=np.uint64)
    for row, items in enumerate(shingle_sets):
        x = np.fromiter(items, dtype=np.uint64, count=len(items))[:, None]  # (S, 1)
        signatures[row] = ((x * a + b) % _PRIME).min(axis=0)  # (S, P) -> (P,)
    return signatures


def jaccard(first: frozenset[int], second: frozenset[int]) -> float:
    return len(first & second) / len(first | second) if first or second else 1.0


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float = JACCARD_THRESHOLD, num_bands: int = NUM_BANDS
) -> list[tuple[int, int]]:
    """Index pairs (i < j) of texts whose word 5-gram sets have Jaccard similarity >= ``threshold``."""
    sets = [shingles(t) for t in texts]
    signatures = minhash_signatures(sets)
    rows = signatures.shape[1] // num_bands
    candidates: set[tuple[int, int]] = set()
    for band in range(num_bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, key in enumerate(signatures[:, band * rows : (band + 1) * rows]):
            buckets[key.tobytes()].append(i)
        for members in buckets.values():
            candidates.update((i, j) for n, i in enumerate(members) for j in members[n + 1 :])
    return sorted((i, j) for i, j in candidates if jaccard(sets[i], sets[j]) >= threshold)


def conversation_of(record_id: str) -> str:
    """ShareGPT ids are ``<conversation>_<part>``: parts of one conversation share the prefix."""
    return record_id.rsplit("_", 1)[0]


def prompt_groups(record_ids: Sequence[str], texts: Sequence[str]) -> list[int]:
    """A group id per prompt: the connected components of "same conversation" and "near-duplicate"."""
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    first_of_conversation: dict[str, int] = {}
    for i, record_id in enumerate(record_ids):
        join(i, first_of_conversation.setdefault(conversation_of(record_id), i))
    for i, j in near_duplicate_pairs(texts):
        join(i, j)
    return [root(i) for i in range(len(texts))]


def grouped_folds(groups: Sequence[int], num_folds: int) -> list[int]:
    """A fold per record, whole groups at a time: largest groups first, each into the fold that holds
    the fewest records so far (ties by fold number), so folds are balanced and deterministic."""
    if num_folds < 2:
        raise ValueError(f"num_folds: must be >= 2, got {num_folds}")
    members: dict[int, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    sizes = [0] * num_folds
    fold_of = [0] * len(groups)
    for group in sorted(members, key=lambda g: (-len(members[g]), members[g][0])):
        fold = min(range(num_folds), key=lambda f: (sizes[f], f))
        sizes[fold] += len(members[group])
        for i in members[group]:
            fold_of[i] = fold
    return fold_of


def group_bootstrap_ci(
    estimates: Sequence[float],
    true_tokens: Sequence[int],
    groups: Sequence[int],
    num_resamples: int = 1000,
    seed: int = 0,
) -> list[float]:
    """A 95% interval of the Spearman correlation, resampling whole groups with replacement: prompts of
    one group are not independent evidence, so resampling them one by one would narrow the interval."""
    from tools.predictor.evaluate import spearman

    rng = np.random.default_rng(seed)
    x, y = np.asarray(estimates, dtype=float), np.asarray(true_tokens, dtype=float)
    members: dict[int, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    by_group = [np.asarray(rows) for rows in members.values()]
    values = []
    for _ in range(num_resamples):
        rows = np.concatenate([by_group[g] for g in rng.integers(0, len(by_group), len(by_group))])
        rho = spearman(x[rows].tolist(), y[rows].tolist())
        if rho is not None:
            values.append(rho)
    if not values:
        return []
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
