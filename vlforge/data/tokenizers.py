"""Tokenizers from local files only: a pretrained folder, or one built here.

``load_tokenizer(spec)``:

* ``"vlforge:<vocab>"``: a word-level tokenizer built in memory from one of
  the built-in vocabularies (``vlforge:shapes`` for the generated dataset).
  Nothing is downloaded; the same spec always gives the same ids.
* ``"vlforge:<name>"``: a tokenizer shipped with vlforge (``vlforge/tokenizers/<name>``,
  e.g. ``vlforge:bert-base-uncased``), found wherever vlforge is installed.
* anything else: a local folder holding tokenizer files, loaded by
  ``transformers.AutoTokenizer`` with ``local_files_only=True``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vlforge.resources import shipped_folder, shipped_tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _builtin_vocabularies() -> dict[str, list[str]]:
    from vlforge.data.synthetic import VOCABULARY

    return {"shapes": VOCABULARY}


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
    if spec.startswith("vlforge:"):
        name = spec.removeprefix("vlforge:")
        vocabularies = _builtin_vocabularies()
        if name in vocabularies:
            return word_level_tokenizer(vocabularies[name])
        folder = shipped_tokenizer(name)
        if folder is None:
            valid = ", ".join([*vocabularies, *(p.name for p in shipped_folder("tokenizers").iterdir())])
            raise ValueError(f"unknown built-in tokenizer '{spec}' (valid: {valid})")
        spec = str(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec, local_files_only=True)
