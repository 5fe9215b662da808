"""Image<->text retrieval: recall at K in both directions.

Every image of a split is paired with its caption. Generated captions repeat
(many images show the same thing), so a text ``j`` counts as a correct match
for image ``i`` exactly when the two captions are identical, and likewise an
image for a text. Chance is computed from the data: a random ranking puts a
match first with probability (matches of the query) / (gallery size), averaged
over queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from vlforge.components import BuildContext
    from vlforge.eval import RetrievalConfig

KS = (1, 5, 10)
QUERY_CHUNK = 1024  # queries ranked at once: bounds the (chunk, gallery) similarity matrix


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@dataclass
class SplitEmbeddings:
    images: torch.Tensor  # (N, E) float32
    texts: torch.Tensor | None  # (N, E) float32, None when not asked for
    captions: list[str]
    labels: dict[str, torch.Tensor]  # name -> (N,) long


def embed_split(
    model: Any, data: Any, split: str, *, batch_size: int, device: str, with_text: bool = True
) -> SplitEmbeddings:
    """Embed every item of ``data.dataset(split)`` in order, in this process (call under ``eval_mode``)."""
    loader = DataLoader(data.dataset(split), batch_size=batch_size, collate_fn=data.collate)
    images, texts, captions = [], [], []
    labels: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        images.append(model.encode_image(batch["images"].to(device)).float().cpu())  # (B,E)
        if with_text:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            texts.append(model.encode_text(ids, mask).float().cpu())  # (B,E)
        captions += batch["captions"]
        for name, values in batch.get("labels", {}).items():
            labels.setdefault(name, []).append(values)
    return SplitEmbeddings(
        images=torch.cat(images),
        texts=torch.cat(texts) if with_text else None,
        captions=captions,
        labels={name: torch.cat(values) for name, values in labels.items()},
    )


def caption_ids(captions: list[str]) -> torch.Tensor:
    """(N,) long: equal ids exactly for identical captions."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(caption, len(index)) for caption in captions])


def recall_at_k(
    queries: torch.Tensor, gallery: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor
) -> dict[int, float]:
    """k -> fraction of queries (Q,E) with a same-id gallery item (G,E) among their top k by dot product."""
    top_k = min(max(KS), len(gallery))
    hits = dict.fromkeys(KS, 0)
    for start in range(0, len(queries), QUERY_CHUNK):
        sims = queries[start : start + QUERY_CHUNK] @ gallery.T  # (b, G)
        top = sims.topk(top_k, dim=1).indices  # (b, top_k)
        matches = gallery_ids[top] == query_ids[start : start + QUERY_CHUNK, None]  # (b, top_k)
        for k in KS:
            hits[k] += int(matches[:, :k].any(dim=1).sum())
    return {k: hits[k] / len(queries) for k in KS}


def chance_r1(query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> float:
    """Expected R@1 of a random ranking: mean over queries of (same-id gallery items) / G."""
    counts = torch.bincount(gallery_ids, minlength=int(query_ids.max()) + 1)
    return float(counts[query_ids].float().mean()) / len(gallery_ids)


def retrieval_metrics(images: torch.Tensor, texts: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """R@K both ways for paired (N,E) image and text embeddings; item i's caption is ``captions[i]``."""
    ids = caption_ids(captions)
    i2t = recall_at_k(images, texts, ids, ids)
    t2i = recall_at_k(texts, images, ids, ids)
    metrics = {f"i2t_r{k}": i2t[k] for k in KS} | {f"t2i_r{k}": t2i[k] for k in KS}
    # Images and captions are paired one to one, so chance is the same in both directions.
    metrics["chance_r1"] = chance_r1(ids, ids)
    return metrics


class RetrievalEvaluator:
    """Image->text and text->image recall at 1/5/10 over a whole split of ``ctx.parts["data"]``.

    A text matches an image iff their captions are identical (generated
    captions repeat). Computed on the full split in the calling process, with
    no collective calls: the engine runs it on rank 0 and broadcasts.
    """

    def __init__(self, config: RetrievalConfig) -> None:
        self.config = config

    def evaluate(self, model: nn.Module, ctx: BuildContext) -> dict[str, float]:
        with eval_mode(model):
            split = embed_split(
                model,
                ctx.parts["data"],
                self.config.split,
                batch_size=self.config.batch_size,
                device=ctx.device,
            )
        assert split.texts is not None
        return retrieval_metrics(split.images, split.texts, split.captions)
