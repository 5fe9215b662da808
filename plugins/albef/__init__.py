"""ALBEF (Align before Fuse, Li et al. 2021) as reusable components.

* teacher ``momentum``: EMA copies of the parts a recipe names (``teacher.py``);
* fusion ``albef.fusion``: the upper BERT layers with cross-attention to the image, and the MLM head
  (``fusion.py``);
* objectives ``albef.itc`` (queues + momentum distillation), ``albef.itm`` (hard negatives) and
  ``albef.mlm`` (masked LM + momentum distillation) (``itc.py``, ``itm.py``, ``mlm.py``);
* evaluator ``albef.retrieval``: ITC ranking, ITM re-ranking of the top k (``retrieval.py``).

This module stays light (no torch import): configs, start-up checks that need
the whole recipe, and registration. README.md lists every key.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from vlforge.hookspecs import hookimpl
from vlforge.registry import ComponentConfig, Registry

if TYPE_CHECKING:
    from vlforge.components import BuildContext


# --------------------------------------------------------------------------- configs


class MomentumTeacherConfig(ComponentConfig):
    """``[teacher] type = "momentum"``: an EMA copy of model parts, updated after every optimizer step."""

    parts: list[Literal["vision", "text", "adapter", "fusion"]] = Field(
        default_factory=lambda: ["vision", "text", "fusion"],
        min_length=1,
        description="model parts to copy; ALBEF needs vision and text (ITC), and fusion (MLM distillation)",
    )
    momentum: float = Field(0.995, ge=0.0, le=1.0, description="m in θ_m ← m·θ_m + (1−m)·θ")


class FusionConfig(ComponentConfig):
    """``[model.fusion] type = "albef.fusion"``: the text BERT's removed layers + cross-attention.

    The split is set on the text part: ``[model.text] num_layers = 6`` runs
    BERT layers [0, 6) as the text encoder and hands [6, 12) to this module.
    """

    mlm_head: bool = Field(
        True,
        description="build BERT's MLM head (albef.mlm needs it; without MLM, DDP refuses unused weights)",
    )
    gradient_checkpointing: bool = Field(
        False, description="activation checkpointing of every fusion layer (recomputed in backward)"
    )


class DistillConfig(ComponentConfig):
    """Momentum distillation options shared by ITC and MLM."""

    alpha: float = Field(0.4, ge=0.0, le=1.0, description="weight of the teacher's soft targets; 0: off")
    alpha_warmup_epochs: float = Field(
        1.0, ge=0.0, description="α ramps from 0 over this many epochs (ALBEF 1, LAVIS 2; 0: no ramp)"
    )


class ItcConfig(DistillConfig):
    """``[objectives.<name>] type = "albef.itc"``: contrastive loss against momentum queues."""

    queue_size: int = Field(
        65_536, gt=0, description="Q, per queue; a multiple of train.batch_size / train.accum_steps"
    )
    init_temperature: float = Field(0.07, gt=0, description="initial τ (learnable)")
    temperature_min: float = Field(0.001, gt=0, description="τ is clamped to [min, max] in every forward")
    temperature_max: float = Field(0.5, gt=0, description="upper clamp of τ")
    image_ids: str | None = Field(
        None,
        description="batch key of (B,) int image ids: captions of the same image become positives "
        "(ITC) and are never drawn as negatives (ITM); default: only the pair itself is positive",
    )

    @model_validator(mode="after")
    def _temperature_in_range(self) -> ItcConfig:
        if not self.temperature_min <= self.init_temperature <= self.temperature_max:
            raise ValueError(
                f"init_temperature {self.init_temperature} lies outside "
                f"[temperature_min, temperature_max] = [{self.temperature_min}, {self.temperature_max}]"
            )
        return self


class ItmConfig(ComponentConfig):
    """``[objectives.<name>] type = "albef.itm"``: image-text matching with in-batch hard negatives."""


class MlmConfig(DistillConfig):
    """``[objectives.<name>] type = "albef.mlm"``: masked language modelling conditioned on the image."""

    mask_probability: float = Field(
        0.15, gt=0.0, lt=1.0, description="chance a token is picked (then 80% [MASK], 10% random, 10% kept)"
    )


class AlbefRetrievalConfig(ComponentConfig):
    """``[evaluators.<name>] type = "albef.retrieval"``: R@K by ITC, and after ITM re-ranking of the top k."""

    split: str = Field("val", description="split of the run's data source to evaluate on")
    batch_size: int = Field(256, ge=1, description="items encoded, or pairs fused, per forward pass")
    k: int = Field(
        128, ge=1, description="gallery items per query re-ranked by ITM (ALBEF: 256 COCO, 128 Flickr)"
    )
    itm_objective: str = Field(
        "itm", description="name of the recipe's albef.itm objective (its head scores)"
    )


# --------------------------------------------------------------------------- factories


def _on_meta(ctx: BuildContext) -> Any:
    import torch

    return torch.device("meta") if ctx.meta else contextlib.nullcontext()


def _require_teacher(ctx: BuildContext, parts: tuple[str, ...], user: str) -> None:
    teacher = ctx.parts.get("teacher")
    copied = set(getattr(teacher, "parts", {}))
    if teacher is None or not set(parts) <= copied:
        raise ValueError(
            f"{user} needs [teacher] type = 'momentum' with parts including {list(parts)} "
            f"(the recipe's teacher copies {sorted(copied) or 'nothing'})"
        )


def _micro_batch(ctx: BuildContext) -> int:
    train = ctx.recipe.train
    return train.batch_size // (ctx.world_size * train.accum_steps)


def build_teacher(config: MomentumTeacherConfig, ctx: BuildContext) -> Any:
    """EMA copies of model parts (no gradients), updated after every optimizer step."""
    from vlforge_plugins.albef.teacher import MomentumTeacher

    missing = [part for part in config.parts if ctx.parts.get(part) is None]
    if missing:
        raise ValueError(f"teacher 'momentum' copies {missing}, but the recipe builds no such part")
    return MomentumTeacher({part: ctx.parts[part] for part in config.parts}, config.momentum)


def build_fusion(config: FusionConfig, ctx: BuildContext) -> Any:
    """ALBEF's multimodal encoder: the upper text BERT layers with cross-attention to the image."""
    from vlforge_plugins.albef.fusion import BertFusion

    text, vision = ctx.parts.get("text"), ctx.parts.get("vision")
    if vision is None or not getattr(text, "removed_layers", None):
        raise ValueError(
            "albef.fusion continues the text BERT with the layers the text part leaves out: it needs "
            "[model.vision] and [model.text] with num_layers below the model's layer count (ALBEF: 6 of 12)"
        )
    layers = list(text.removed_layers)
    text.removed_layers.clear()  # they belong to the fusion module now
    with _on_meta(ctx):
        fusion = BertFusion(
            layers, vision.width, text.model.config, config.mlm_head, config.gradient_checkpointing
        )
    pretrained = getattr(ctx.recipe.model.text.config, "pretrained", None) if ctx.recipe else None
    if pretrained and not ctx.meta:
        fusion.load_mlm_head(pretrained)
    return fusion


def build_itc(config: ItcConfig, ctx: BuildContext) -> Any:
    """Image-text contrastive loss against momentum queues, with momentum distillation."""
    from vlforge_plugins.albef.itc import ImageTextContrastive

    _require_teacher(ctx, ("vision", "text"), "albef.itc")
    widths = {part: getattr(ctx.parts.get(part), "embed_dim", 0) for part in ("vision", "text")}
    if not widths["vision"] or widths["vision"] != widths["text"]:
        raise ValueError(
            f"albef.itc needs model.vision and model.text with equal embed_dim > 0, got {widths}"
        )
    train = ctx.recipe.train
    rows = train.batch_size // train.accum_steps  # enqueued per micro-batch, all ranks together
    if config.queue_size % rows:
        raise ValueError(
            f"albef.itc: queue_size = {config.queue_size} must be a multiple of the features enqueued "
            f"per micro-batch, train.batch_size / train.accum_steps = {rows} "
            f"({rows // ctx.world_size} per rank × {ctx.world_size} ranks); "
            f"e.g. queue_size = {max(rows, config.queue_size // rows * rows)}"
        )
    with _on_meta(ctx):
        return ImageTextContrastive(
            widths["vision"],
            config.queue_size,
            config.init_temperature,
            (config.temperature_min, config.temperature_max),
            config.alpha,
            config.alpha_warmup_epochs,
            config.image_ids,
        )


def build_itm(config: ItmConfig, ctx: BuildContext) -> Any:
    """Image-text matching on the fusion CLS, with hard negatives drawn from ITC similarities."""
    from vlforge_plugins.albef.itm import ImageTextMatching

    fusion = ctx.parts.get("fusion")
    if fusion is None:
        raise ValueError("albef.itm needs [model.fusion] (e.g. type = 'albef.fusion')")
    types = [table.type for table in ctx.recipe.objectives.values()]
    if "albef.itc" not in types or types.index("albef.itc") > types.index("albef.itm"):
        raise ValueError(
            "albef.itm draws its negatives from albef.itc: list an albef.itc objective before it"
        )
    if _micro_batch(ctx) < 2:
        raise ValueError(
            f"albef.itm needs at least 2 pairs per rank and micro-batch to draw a negative from, "
            f"got {_micro_batch(ctx)} (train.batch_size / (world size × train.accum_steps))"
        )
    with _on_meta(ctx):
        return ImageTextMatching(fusion.width)


def build_mlm(config: MlmConfig, ctx: BuildContext) -> Any:
    """Masked language modelling through the fusion encoder, with momentum distillation."""
    from vlforge_plugins.albef.mlm import MaskedLanguageModelling

    fusion, text = ctx.parts.get("fusion"), ctx.parts.get("text")
    if getattr(fusion, "mlm_transform", None) is None:
        raise ValueError("albef.mlm needs [model.fusion] type = 'albef.fusion' with mlm_head = true")
    if config.alpha > 0:
        _require_teacher(ctx, ("vision", "text", "fusion"), "albef.mlm with alpha > 0")
    tokenizer = text.tokenizer
    if tokenizer.mask_token_id is None:
        raise ValueError("albef.mlm needs a tokenizer with a mask token ([MASK])")
    never_mask = tuple(t for t in (tokenizer.pad_token_id, tokenizer.cls_token_id) if t is not None)
    return MaskedLanguageModelling(
        vocab_size=text.model.get_input_embeddings().num_embeddings,
        mask_id=tokenizer.mask_token_id,
        never_mask=never_mask,
        probability=config.mask_probability,
        alpha=config.alpha,
        alpha_warmup_epochs=config.alpha_warmup_epochs,
    )


def build_retrieval(config: AlbefRetrievalConfig, ctx: BuildContext) -> Any:
    """Retrieval R@1/5/10 by ITC similarity, and after ITM re-ranking of each query's top k."""
    from vlforge_plugins.albef.retrieval import AlbefRetrievalEvaluator

    objective = ctx.recipe.objectives.get(config.itm_objective)
    if objective is None or objective.type != "albef.itm":
        names = [name for name, table in ctx.recipe.objectives.items() if table.type == "albef.itm"]
        raise ValueError(
            f"albef.retrieval: itm_objective = '{config.itm_objective}' is not an albef.itm objective "
            f"of the recipe (albef.itm objectives: {names or 'none'})"
        )
    return AlbefRetrievalEvaluator(config)


@hookimpl
def vlforge_register_components(registry: Registry) -> None:
    registry.add("teacher", "momentum", config=MomentumTeacherConfig, factory=build_teacher)
    registry.add("fusion", "albef.fusion", config=FusionConfig, factory=build_fusion)
    registry.add("objective", "albef.itc", config=ItcConfig, factory=build_itc)
    registry.add("objective", "albef.itm", config=ItmConfig, factory=build_itm)
    registry.add("objective", "albef.mlm", config=MlmConfig, factory=build_mlm)
    registry.add("evaluator", "albef.retrieval", config=AlbefRetrievalConfig, factory=build_retrieval)
