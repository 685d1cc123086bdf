"""Hashed word n-grams of a prompt: the length predictor's cheapest features (no model, microseconds).

    ngram_features(["Write an essay on ...", ...], num_features=2**16)  # (N, num_features) scipy CSR
    hashed_ngrams("Write an essay on ...", num_features)               # (indices, l2-normalised counts)

Words are runs of two or more word characters, lower-cased; a prompt's features are its words and its pairs
of adjacent words, each counted at ``zlib.crc32(gram) % num_features`` (a fixed hash, so training and serving
agree on every machine without a vocabulary), and the counts are scaled to unit length.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

import numpy as np

WORD = re.compile(r"(?u)\b\w\w+\b")


def hashed_ngrams(text: str, num_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the prompt's hashed word 1- and 2-grams, values of unit l2 norm."""
    words = WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
    counts = Counter(zlib.crc32(g.encode("utf-8")) % num_features for g in grams)
    if not counts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    indices = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    values = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    return indices, values / np.linalg.norm(values)


def ngram_features(texts: list[str], num_features: int):
    """(len(texts), num_features) CSR matrix of ``hashed_ngrams`` rows (training and evaluation)."""
    from scipy.sparse import csr_matrix

    rows = [hashed_ngrams(t, num_features) for t in texts]
    indptr = np.cumsum([0] + [len(i) for i, _ in rows])
    indices = np.concatenate([i for i, _ in rows]) if rows else np.zeros(0, dtype=np.int64)
    values = np.concatenate([v for _, v in rows]) if rows else np.zeros(0, dtype=np.float32)
    return csr_matrix((values, indices, indptr), shape=(len(texts), num_features))
