"""Flamingo (Alayrac et al., 2022): a frozen vision encoder and a frozen LM joined by gated cross-attention.

Components:

* adapter ``flamingo.perceiver``: the Perceiver Resampler; it also freezes
  the ``[model.vision]`` encoder (no grad, eval mode) and reads its tokens;
* fusion ``flamingo.gated_xattn``: a Hugging Face causal LM (local folder or
  config table), frozen, with GATED XATTN-DENSE blocks before every N-th
  decoder layer and ``<image>``/``<|endofchunk|>`` added to its tokenizer;
* objective ``flamingo.lm``: next-token NLL, one weighted term per dataset;
* dataset ``flamingo.shapes``: generated pairs or interleaved documents;
  several datasets per run are sources of the core ``mix`` (``mode =
  "cycle"``), one micro-batch of each per round, accumulated within a step;
  ``data.make_pair_collate``/``make_document_collate`` format the core
  ``webdataset``/``interleaved`` readers' examples (LAION, MMC4);
* evaluator ``flamingo.fewshot``: k-shot captioning (CIDEr, exact match) or
  VQA (exact match on shapes, VQAv2 soft accuracy on a ``vqa`` dataset) with
  cached-media greedy generation.

This module stays light (no torch import); the modules live in
``resampler.py``, ``xattn.py``, ``lm.py``, ``objective.py``, ``data.py``,
``generate.py`` and ``fewshot.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from vlforge.hookspecs import hookimpl
from vlforge.paths import RecipePath
from vlforge.registry import ComponentConfig, ConfigIssue, Registry, did_you_mean

if TYPE_CHECKING:
    from vlforge.components import BuildContext


class PerceiverConfig(ComponentConfig):
    """``[model.adapter] type = "flamingo.perceiver"``: Perceiver Resampler over a frozen vision encoder."""

    depth: int = Field(6, gt=0, description="resampler layers (attention + feed-forward)")
    num_latents: int = Field(64, gt=0, description="output tokens per image")
    heads: int = Field(8, gt=0, description="attention heads")
    dim_head: int = Field(64, gt=0, description="width per head")
    ff_mult: int = Field(4, gt=0, description="feed-forward hidden width / visual width")
    max_media: int = Field(
        0, ge=0, description="learned media-time embeddings for up to this many images; 0: none"
    )
    max_frames: int = Field(
        0, ge=0, description="learned frame embeddings for up to this many frames; 0: none"
    )
    freeze_vision: bool = Field(True, description="freeze [model.vision]: no grad, eval mode")
    drop_prefix_tokens: bool = Field(
        True, description="resample patch tokens only (CLS dropped, OpenFlamingo)"
    )
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of every resampler layer (recomputed in backward)"
    )


SHAPES_TOKENIZER = "flamingo:shapes"  # built by vlforge_plugins.flamingo.lm.load_tokenizer


class GatedXAttnConfig(ComponentConfig):
    """``[model.fusion] type = "flamingo.gated_xattn"``: a frozen causal LM with gated cross-attention.

    Exactly one of ``lm`` (a local folder) or ``lm_config`` (a transformers
    config table, random weights). Supported layouts: GPT-2/GPT-J, OPT,
    GPT-NeoX/Pythia, LLaMA, MPT.
    """

    lm: RecipePath | None = Field(
        None, description="local folder with a transformers causal LM (and its tokenizer)"
    )
    lm_config: dict[str, Any] | None = Field(
        None,
        description="transformers config, e.g. {model_type = 'gpt2', n_embd = 64, ...}; "
        "vocab_size grows to fit the tokenizer",
    )
    tokenizer: RecipePath | None = Field(
        None, description="'flamingo:shapes', 'vlforge:<vocab>' or a local folder (default: lm)"
    )
    every: int = Field(1, gt=0, description="a gated block before decoder layer i when (i+1) % every == 0")
    heads: int = Field(8, gt=0, description="cross-attention heads")
    dim_head: int = Field(64, gt=0, description="cross-attention width per head")
    ff_mult: int = Field(4, gt=0, description="gated feed-forward hidden width / LM width")
    only_immediate_media: bool = Field(
        True, description="text attends only to the most recent image (else to all previous images)"
    )
    train_embeddings: bool = Field(
        True, description="train the <image> and <|endofchunk|> rows of the input embedding (else frozen)"
    )
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of the LM's decoder layers and the gated blocks"
    )

    @model_validator(mode="after")
    def _one_source(self) -> GatedXAttnConfig:
        if (self.lm is None) == (self.lm_config is None):
            raise ValueError("give exactly one of 'lm' (a local folder) or 'lm_config' (a table)")
        if self.lm_config is not None:
            if "model_type" not in self.lm_config:
                raise ValueError("'lm_config' needs a 'model_type' (e.g. 'gpt2')")
            if self.tokenizer is None:
                raise ValueError("'lm_config' needs a 'tokenizer' (e.g. 'flamingo:shapes' or a local folder)")
        return self

    def check_resources(self) -> Iterator[ConfigIssue]:
        """The LM folder and the tokenizer exist (``vlforge validate``; nothing is loaded)."""
        from vlforge.data.tokenizers import tokenizer_spec_problem

        if self.lm is not None and not Path(self.lm).is_dir():
            yield ConfigIssue("lm", f"LM folder '{self.lm}' not found")
            if self.tokenizer is None:
                return  # the tokenizer would come from that same folder
        spec = self.tokenizer or self.lm or ""
        if spec.startswith("flamingo:"):
            valid = [SHAPES_TOKENIZER]
            hint = did_you_mean(spec, valid)
            problem = (
                None if spec in valid else f"unknown Flamingo tokenizer '{spec}'{hint} (valid: {valid[0]})"
            )
        else:
            problem = tokenizer_spec_problem(spec)
        if problem:
            yield ConfigIssue("tokenizer" if self.tokenizer else "lm", problem)


class LMObjectiveConfig(ComponentConfig):
    """``[objectives.<name>] type = "flamingo.lm"``: next-token NLL conditioned on preceding images.

    With ``dataset_weights`` a step's loss is Σ_m λ_m·L_m over the datasets of
    its micro-batches (one per dataset per round), logged per dataset as λ_m·L_m.
    """

    dataset_weights: dict[str, float] = Field(
        default_factory=dict,
        description="loss weight λ per dataset name (paper: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03); "
        "empty: every micro-batch weighs 1",
    )

    @model_validator(mode="after")
    def _positive(self) -> LMObjectiveConfig:
        if any(weight <= 0 for weight in self.dataset_weights.values()):
            raise ValueError(f"dataset weights must be positive, got {self.dataset_weights}")
        return self


class ShapesDataConfig(ComponentConfig):
    """``[data] type = "flamingo.shapes"``: generated image-caption pairs or interleaved documents.

    Several datasets per run: sources of the core ``mix`` with ``mode = "cycle"``.
    """

    kind: Literal["pairs", "interleaved"] = Field(..., description="'pairs' or 'interleaved' documents")
    size: int = Field(20_000, gt=0, description="sequences per split")
    max_images: int = Field(3, gt=0, description="interleaved: up to this many images per document")
    max_length: int = Field(64, gt=0, description="tokens per sequence (longer ones are cut)")
    qa_fraction: float = Field(
        0.5, ge=0, le=1, description="interleaved: share of images tied to a question-answer, not a caption"
    )
    seed: int = Field(0, ge=0, description="item i of a split is a pure function of (seed, split, i)")
    image_size: int | None = Field(None, ge=8, description="default: the vision encoder's input size")
    background_noise: float = Field(0.05, ge=0.0, description="pixel noise std, in units of 0..255")


class FewShotConfig(ComponentConfig):
    """``[evaluators.<name>] type = "flamingo.fewshot"``: k-shot captioning or VQA (shapes or data)."""

    task: Literal["caption", "vqa"] = Field("vqa", description="'caption' (CIDEr, exact match) or 'vqa'")
    shots: list[int] = Field(default_factory=lambda: [0, 4], description="in-context examples per prompt")
    attribute: Literal["color", "shape", "size", "position"] = Field("color", description="vqa: asked about")
    num_queries: int = Field(64, gt=0, description="held-out images evaluated (source 'data': at most)")
    split: str = Field("val", description="split the queries come from (shapes: val or test)")
    source: Literal["shapes", "data"] = Field(
        "shapes",
        description="'shapes': generated; 'data': the evaluator's data splits (caption: captions, "
        "vqa: a 'vqa' dataset)",
    )
    support_split: str = Field("train", description="source 'data': split the in-context examples come from")
    max_new_tokens: int | None = Field(None, gt=0, description="default: 20 for captions, 5 for vqa")
    batch_size: int = Field(32, gt=0, description="prompts generated at once")
    seed: int = Field(0, ge=0, description="generated images and the choice of in-context examples")
    background_noise: float = Field(0.05, ge=0.0, description="pixel noise std of the generated images")

    @model_validator(mode="after")
    def _shots(self) -> FewShotConfig:
        if not self.shots or min(self.shots) < 0:
            raise ValueError(f"shots must be non-negative and not empty, got {self.shots}")
        if self.source == "shapes" and self.split not in ("val", "test"):
            raise ValueError(f"generated shapes have splits val and test, not '{self.split}'")
        return self

    def data_problems(self, data: Any, data_type: str) -> list[tuple[str, str]]:
        """(key, problem) of ``source = "data"``: the splits exist, and VQA reads a ``vqa`` dataset."""
        if self.source != "data":
            return []
        from vlforge.eval import split_problems

        problems = split_problems(self.split, data, data_type)
        problems += [
            ("support_split", message) for _, message in split_problems(self.support_split, data, data_type)
        ]
        if (self.task == "vqa") != (data_type == "vqa"):
            wanted = "a 'vqa' dataset (questions and answers)" if self.task == "vqa" else "captions"
            problems.append(
                ("data", f"task '{self.task}' on data needs {wanted}, not data type '{data_type}'")
            )
        return problems


# --------------------------------------------------------------------------- factories


def build_perceiver(config: PerceiverConfig, ctx: BuildContext) -> Any:
    """Perceiver Resampler: any number of visual tokens -> num_latents per image."""
    import torch
    from vlforge_plugins.flamingo.resampler import PerceiverAdapter

    vision = ctx.parts.get("vision")
    if vision is None or not hasattr(vision, "width"):
        raise ValueError("flamingo.perceiver needs [model.vision] (e.g. type = 'timm.vit')")
    if config.freeze_vision:
        vision.requires_grad_(False).eval()
    options = config.model_dump(exclude={"freeze_vision", "drop_prefix_tokens"})
    with torch.device("meta") if ctx.meta else contextlib.nullcontext():
        return PerceiverAdapter(
            vision.width,
            freeze_vision=config.freeze_vision,
            drop_prefix_tokens=config.drop_prefix_tokens,
            **options,
        )


def build_gated_xattn(config: GatedXAttnConfig, ctx: BuildContext) -> Any:
    """A frozen causal LM with GATED XATTN-DENSE blocks every N layers (tanh gates start at 0)."""
    from vlforge_plugins.flamingo.lm import build_flamingo_lm

    return build_flamingo_lm(config, ctx)


def build_lm_objective(config: LMObjectiveConfig, ctx: BuildContext) -> Any:
    """Next-token NLL of text given its preceding images; one weighted, logged term per dataset."""
    from vlforge_plugins.flamingo.objective import FlamingoObjective

    missing = [part for part in ("vision", "adapter", "fusion") if ctx.parts.get(part) is None]
    if missing:
        raise ValueError(f"flamingo.lm needs [model.{'], [model.'.join(missing)}]")
    if config.dataset_weights and ctx.recipe is not None:
        _check_cycle(config.dataset_weights, ctx.recipe)
    return FlamingoObjective(config.dataset_weights)


def _check_cycle(weights: dict[str, float], recipe: Any) -> None:
    """Each optimizer step must take one batch of every weighted dataset per round."""
    data = recipe.data
    mix = data.config if data.type == "mix" else None
    sources = sorted(mix.sources) if mix else []
    if mix is None or mix.mode != "cycle" or sources != sorted(weights):
        raise ValueError(
            f"flamingo.lm dataset_weights {sorted(weights)} need [data] type = 'mix' with mode = 'cycle' "
            f"and exactly these sources (got type '{data.type}', sources {sources})"
        )
    if recipe.train.accum_steps % len(weights):
        raise ValueError(
            f"flamingo.lm: train.accum_steps ({recipe.train.accum_steps}) must be a multiple of the number "
            f"of datasets ({len(weights)}), so that every optimizer step takes a batch of each"
        )


def build_shapes(config: ShapesDataConfig, ctx: BuildContext) -> Any:
    """Generated image-caption pairs or interleaved documents (with question-answers) in Flamingo's format."""
    from vlforge_plugins.flamingo.data import ShapesSource

    fusion, vision = ctx.parts.get("fusion"), ctx.parts.get("vision")
    if not hasattr(fusion, "tokenizer") or vision is None:
        raise ValueError("flamingo.shapes needs [model.vision] and [model.fusion] (its tokenizer)")
    data_config = vision.data_config
    return ShapesSource(
        config,
        fusion.tokenizer,
        image_size=config.image_size or int(data_config["input_size"][-1]),
        mean=data_config["mean"],
        std=data_config["std"],
    )


def build_fewshot(config: FewShotConfig, ctx: BuildContext) -> Any:
    """k-shot captioning (CIDEr) or VQA (exact match) on held-out generated shapes, greedy decoding."""
    from vlforge_plugins.flamingo.fewshot import FewShotEvaluator

    return FewShotEvaluator(config)


@hookimpl
def vlforge_register_components(registry: Registry) -> None:
    registry.add("adapter", "flamingo.perceiver", config=PerceiverConfig, factory=build_perceiver)
    registry.add("fusion", "flamingo.gated_xattn", config=GatedXAttnConfig, factory=build_gated_xattn)
    registry.add("objective", "flamingo.lm", config=LMObjectiveConfig, factory=build_lm_objective)
    registry.add("dataset", "flamingo.shapes", config=ShapesDataConfig, factory=build_shapes)
    registry.add("evaluator", "flamingo.fewshot", config=FewShotConfig, factory=build_fewshot)
