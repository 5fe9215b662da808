"""Generation metrics: CIDEr-D (Vedantam et al., 2015, as the COCO caption evaluation computes it).

Every text is lowercased and split on whitespace. For n = 1..4, a text is a
vector of its n-gram counts weighted by idf = ln(#images) − ln(df), df being
the number of images whose references contain the n-gram. A candidate's
score against one reference is, per n, Σ min(c, r)·r / (|c|·|r|) (clipped
cosine), damped by exp(−Δlen² / 2σ²) with σ = 6; averaged over n and over the
references, times 10, then averaged over images.
"""

from __future__ import annotations

import math
from collections import Counter

MAX_N = 4
SIGMA = 6.0


def normalize_answer(text: str) -> str:
    """Lowercase, single spaces, no trailing punctuation: what exact match compares."""
    return " ".join(text.lower().split()).strip(" .?!")


def _ngrams(words: list[str]) -> list[Counter]:
    """[Counter of n-grams for n = 1..MAX_N]."""
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, MAX_N + 1)]


def _tfidf(counts: list[Counter], df: Counter, log_images: float) -> list[dict[tuple, float]]:
    return [{gram: tf * (log_images - math.log(max(1, df[gram]))) for gram, tf in c.items()} for c in counts]


def _norm(vector: dict[tuple, float]) -> float:
    return math.sqrt(sum(value * value for value in vector.values()))


def cider_d(candidates: list[str], references: list[list[str]]) -> float:
    """Mean CIDEr-D of ``candidates[i]`` against ``references[i]`` (the COCO scale: ×10, not ×100)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(
            f"need one reference list per candidate, got {len(candidates)} and {len(references)}"
        )
    ref_words = [[ref.lower().split() for ref in refs] for refs in references]
    ref_counts = [[_ngrams(words) for words in refs] for refs in ref_words]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({gram for counts in refs for c in counts for gram in c})
    log_images = math.log(len(references))
    total = 0.0
    for candidate, refs, counts in zip(candidates, ref_words, ref_counts):
        words = candidate.lower().split()
        cand = _tfidf(_ngrams(words), df, log_images)
        score = 0.0
        for ref_len, ref_count in zip((len(r) for r in refs), counts):
            ref = _tfidf(ref_count, df, log_images)
            penalty = math.exp(-((len(words) - ref_len) ** 2) / (2 * SIGMA**2))
            for c, r in zip(cand, ref):
                overlap = sum(min(value, r.get(gram, 0.0)) * r.get(gram, 0.0) for gram, value in c.items())
                norms = _norm(c) * _norm(r)
                score += penalty * (overlap / norms if norms else 0.0)
        total += 10.0 * score / (MAX_N * len(refs))
    return total / len(candidates)
