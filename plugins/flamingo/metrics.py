"""Generation metrics: CIDEr-D (Vedantam et al., 2015, as the COCO caption evaluation computes it)
and VQA accuracy (Antol et al., 2015; the VQAv2 evaluation's soft score, see ``vqa_accuracy``).

Every text is lowercased and split on whitespace. For n = 1..4, a text is a
vector of its n-gram counts weighted by idf = ln(#images) − ln(df), df being
the number of images whose references contain the n-gram. A candidate's
score against one reference is, per n, Σ min(c, r)·r / (|c|·|r|) (clipped
cosine), damped by exp(−Δlen² / 2σ²) with σ = 6; averaged over n and over the
references, times 10, then averaged over images.
"""

from __future__ import annotations

import itertools
import math
import re
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


# --------------------------------------------------------------------------- VQA accuracy

# The official VQA evaluation's answer normalisation (GT-Vision-Lab vqaEval.py, which OpenFlamingo
# uses as is): punctuation, then lowercase, number words to digits, articles dropped, contractions.
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official (ineffective) look-behind
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
_WRITTEN_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "shan't", "she'd've", "should've", "shouldn't",
    "shouldn't've", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll",
    "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)  # fmt: skip


def _unwritten(form: str) -> dict[str, str]:
    """Every spelling of ``form`` with some of its apostrophes left out -> ``form``."""
    pieces = form.split("'")
    return {
        "".join(p + ("'" if keep else "") for p, keep in zip(pieces, (*kept, False))): form
        for kept in itertools.product((True, False), repeat=len(pieces) - 1)
        if not all(kept)
    }


# The official table maps e.g. "dont" and "couldnt've" to "don't" and "couldn't've" (its capitalised
# entries, "Im" or "Ive", never match the lowercased words, so they are left out here too).
CONTRACTIONS = {
    **{k: v for form in _WRITTEN_CONTRACTIONS for k, v in _unwritten(form).items()},
    "twas": "'twas",
}


def normalize_vqa_answer(text: str) -> str:
    """The official VQA normalisation: "The Two dogs!" -> "2 dogs", "dont" -> "don't", "1,000" -> "1000"."""
    original = text  # as in the official code, every mark's test reads the input, not the output
    for mark in PUNCTUATION:
        spaced = mark + " " in original or " " + mark in original or COMMA_BETWEEN_DIGITS.search(original)
        text = text.replace(mark, "" if spaced else " ")
    text = PERIOD_NOT_IN_NUMBER.sub("", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's soft accuracy of one prediction: min(#other annotators who gave it / 3, 1), averaged
    over leaving out each of the annotators in turn (10 choose 9 subsets for VQAv2's 10 answers).

    As the official evaluation does, answers and prediction are normalised only when the
    annotators disagree (their answers are normalised already when all agree).
    """
    answers = [_one_line(answer) for answer in answers]
    prediction = _one_line(prediction)
    if len(set(answers)) > 1:
        answers = [normalize_vqa_answer(answer) for answer in answers]
        prediction = normalize_vqa_answer(prediction)
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(answers)


def vqa_answer_of(generated: str) -> str:
    """What OpenFlamingo scores of a generated answer: up to a new "Question"/"Answer"/"Short", then
    up to the first ", "."""
    return re.split(", ", re.split("Question|Answer|Short", generated, maxsplit=1)[0], maxsplit=1)[0].strip()
