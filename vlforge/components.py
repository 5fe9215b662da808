"""What each component kind looks like to the engine and to other components.

A factory registered for a kind returns an object with the interface below.
Encoders, adapters, fusion modules, masking and objectives are ``nn.Module``s
called directly in the step; datasets and evaluators are plain objects used
at setup and eval time.

Shapes use B = batch, N = patch tokens, P = prefix (CLS) tokens, T = tokens,
L = text length, D = token width, E = joint embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vlforge.model import VLModel
    from vlforge.recipe import Recipe


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # (B, T, D) after the blocks and final norm; T = P + kept patches
    pooled: torch.Tensor  # (B, D) CLS or average pool
    embedding: torch.Tensor | None  # (B, E) projected and L2-normalised, None without projection


@dataclass
class TextOutput:
    tokens: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor  # (B, D)
    embedding: torch.Tensor | None  # (B, E) projected and L2-normalised
    attention_mask: torch.Tensor  # (B, L) 1 = real token


@runtime_checkable
class VisionEncoderLike(Protocol):
    """vision_encoder: an image tower whose token stage is exposed.

    ``embed`` returns tokens with position embeddings added and prefix tokens
    prepended, so a masking component can drop patch tokens before ``blocks``.
    """

    width: int  # D
    embed_dim: int  # E (0: no projection)
    num_prefix_tokens: int  # P
    image_size: int
    data_config: dict[str, Any]  # timm-style: input_size, mean, std, interpolation

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...  # (B,3,H,W) -> (B, P+N, D)
    def blocks(self, tokens: torch.Tensor) -> torch.Tensor: ...  # (B,T,D) -> (B,T,D), final norm included
    def pool(self, tokens: torch.Tensor) -> torch.Tensor: ...  # (B,T,D) -> (B,D)
    def project(self, pooled: torch.Tensor) -> torch.Tensor | None: ...  # (B,D) -> (B,E) normalised
    def forward(self, images: torch.Tensor, masking: nn.Module | None = None) -> VisionOutput: ...


@runtime_checkable
class TextEncoderLike(Protocol):
    """text_encoder: a transformers model plus its tokenizer."""

    width: int
    embed_dim: int
    max_length: int
    tokenizer: Any  # transformers.PreTrainedTokenizerBase

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]: ...  # input_ids, attention_mask (B, L)
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextOutput: ...


@runtime_checkable
class MaskingLike(Protocol):
    """masking: drops tokens between a vision encoder's ``embed`` and ``blocks``.

    Active only in training mode; prefix tokens are always kept.
    """

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor: ...


@runtime_checkable
class ObjectiveLike(Protocol):
    """objective: named loss terms for one batch.

    Called as ``objective(step)`` with a ``vlforge.model.Step`` that computes
    image/text features lazily (once per micro-batch, shared by objectives).
    Returns ``{term_name: scalar tensor}``; the engine multiplies by the
    objective's ``weight`` and sums.
    """

    def forward(self, step: Any) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class DataSourceLike(Protocol):
    """dataset: produces torch datasets per split and the collate function.

    ``dataset(split)`` returns a map-style ``torch.utils.data.Dataset`` whose
    items the ``collate`` function turns into a batch dict (``images`` (B,3,H,W)
    float, ``input_ids``/``attention_mask`` (B,L), ``captions`` list[str], ...).
    """

    def dataset(self, split: str) -> Any: ...
    def collate(self, items: list[Any]) -> dict[str, Any]: ...


@runtime_checkable
class EvaluatorLike(Protocol):
    """evaluator: metrics of the model on held-out data.

    Every rank calls ``evaluate`` (same model, same ``ctx``) at the same points, so an
    evaluator may use collectives: each rank works on its share of the split and the shares
    are gathered (``vlforge.eval.shards``), and every rank must return the metrics one
    process would compute (rank 0's are logged). ``ctx.parts["data"]`` is the evaluator's
    data: its own ``[evaluators.<name>.data]`` table's source, else the run's. Evaluators put
    the model in eval mode and restore its previous mode."""

    def evaluate(self, model: VLModel, ctx: BuildContext) -> dict[str, float]: ...


@runtime_checkable
class ShardUnitsLike(Protocol):
    """Any model part (encoder, adapter, fusion, objective, teacher) may name its shard units.

    ``shard_units()`` returns sub-modules that forward *calls* (FSDP unshards a unit in its
    forward hooks, so not a bare ModuleList), in forward order (a ViT's blocks, a BERT's layers):
    FSDP shards each one by itself, then the root; ``train.compile`` compiles each one.
    Modules whose weights are tied (shared embeddings) must sit in one unit. A part that
    does not define it is sharded with the root.
    """

    def shard_units(self) -> list[nn.Module]: ...


@runtime_checkable
class PretrainedLike(Protocol):
    """A model part may name parameters that building it from the recipe reproduces exactly
    (weights read from a pretrained path, or a seeded init from a config table).

    ``pretrained_parameters()`` returns their names relative to the part (as in its
    ``named_parameters()``). Those that are frozen (``requires_grad=False``) are left out of
    checkpoints unless ``train.checkpoint_frozen``: a resume rebuilds them from the recipe.
    """

    def pretrained_parameters(self) -> list[str]: ...


@runtime_checkable
class PlanBatchesLike(Protocol):
    """Any model part may say what training micro-batches look like, for the ``--dry-run`` plan.

    ``plan_batches(model, recipe, micro_batch)`` returns ``{kind: batch}``: the largest batch of
    each kind the data produces (a mix's datasets), made with torch factory functions (the plan
    runs them on fake tensors: shapes matter, values do not). Without one the plan uses images at
    the vision tower's input size and texts at the text tower's ``max_length`` (docs/plan.md).
    """

    def plan_batches(self, model: VLModel, recipe: Recipe, micro_batch: int) -> dict[str, dict[str, Any]]: ...


@dataclass
class BuildContext:
    """What a factory may use to build its component.

    ``parts`` holds the components built so far (vision, text, adapter,
    fusion, masking); factories for objectives, teachers, datasets and
    evaluators may read them (e.g. a dataset uses ``parts["text"].tokenize``
    and ``parts["vision"].data_config``).
    """

    recipe: Recipe
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    meta: bool = False  # build on the meta device (--dry-run): no weights allocated
    parts: dict[str, Any] = field(default_factory=dict)
