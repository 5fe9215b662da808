"""Tokenizers from local files only: a pretrained folder, or one built here.

``load_tokenizer(spec)``:

* ``"vlforge:<vocab>"``: a word-level tokenizer built in memory from one of
  the built-in vocabularies (``vlforge:shapes`` for the generated dataset).
  Nothing is downloaded; the same spec always gives the same ids.
* ``"vlforge:<name>"`` of a tokenizer folder vlforge ships
  (``vlforge:bert-base-uncased``): that folder, wherever vlforge is installed.
* anything else: a local folder holding tokenizer files, loaded by
  ``transformers.AutoTokenizer`` with ``local_files_only=True``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from vlforge.registry import did_you_mean
from vlforge.resources import shipped_folder

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BUILTIN_PREFIX = "vlforge:"
VOCABULARY_NAMES = ("shapes",)  # the keys of _builtin_vocabularies(), known without importing torch


def _builtin_vocabularies() -> dict[str, list[str]]:
    from vlforge.data.synthetic import VOCABULARY

    return {"shapes": VOCABULARY}


def builtin_names() -> list[str]:
    """Every ``vlforge:<name>``: the vocabularies built in memory, then the shipped tokenizer folders."""
    shipped = sorted(path.name for path in shipped_folder("tokenizers").iterdir() if path.is_dir())
    return [*VOCABULARY_NAMES, *shipped]


def tokenizer_spec_problem(spec: str) -> str | None:
    """Why ``load_tokenizer(spec)`` would fail, checked without loading anything; None if it can load."""
    if spec.startswith(BUILTIN_PREFIX):
        valid = [f"{BUILTIN_PREFIX}{name}" for name in builtin_names()]
        if spec not in valid:
            return (
                f"unknown built-in tokenizer '{spec}'{did_you_mean(spec, valid)} (valid: {', '.join(valid)})"
            )
        return None
    if not Path(spec).is_dir():
        return (
            f"tokenizer folder '{spec}' not found: give a local folder with tokenizer files "
            f"or a built-in one ({', '.join(BUILTIN_PREFIX + name for name in builtin_names())})"
        )
    return None


def word_level_tokenizer(words: list[str]) -> Any:
    """A BERT-style ([CLS] text [SEP]) word-level fast tokenizer over ``words``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@cache
def load_tokenizer(spec: str) -> Any:
    """A transformers tokenizer for ``spec`` (see module docstring)."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        vocabularies = _builtin_vocabularies()
        if name in vocabularies:
            return word_level_tokenizer(vocabularies[name])
        problem = tokenizer_spec_problem(spec)
        if problem is not None:
            raise ValueError(problem)
        spec = str(shipped_folder("tokenizers") / name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec, local_files_only=True)
