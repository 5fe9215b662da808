"""Image<->text retrieval over image groups: recall at K in both directions (COCO/Flickr protocol).

A split is a list of images, each with an image id and one or more captions
(COCO and Flickr30k: five). Identity comes from image ids only, never from
caption text, so repeated captions of different images never count:

* image -> text: a hit at K when any caption of the image is among the K
  texts nearest to it;
* text -> image: per caption, a hit at K when its image is among the K
  images nearest to it.

Items that share an image id are one image shown several times (the
generated shapes: renders of one attribute combination), so each is a
positive of the others' captions. Chance is computed from the data: a random
ranking puts a positive first with probability (positives of the query) /
(gallery size), averaged over queries, per direction.

Every rank embeds its share of the split (``vlforge.eval.shards``); the
embeddings are gathered, so every rank returns the one-process metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlforge.eval.shards import eval_mode, gather_list, gather_rows, my_batches

if TYPE_CHECKING:
    from collections.abc import Callable

    from vlforge.components import BuildContext
    from vlforge.eval import RetrievalConfig

KS = (1, 5, 10)
QUERY_CHUNK = 1024  # queries ranked at once: bounds the (chunk, gallery) similarity matrix

Encoded = dict[str, torch.Tensor]  # named (B, ...) tensors of one batch


@dataclass
class SplitEmbeddings:
    """What a split holds, encoded, in split order, gathered from every rank."""

    images: Encoded  # name -> (N, ...); "embedding" (N, E) float32 for the core evaluators
    image_ids: list[str]  # (N,) identity of each image item
    texts: Encoded | None  # name -> (M, ...) over every caption of every item, None when not asked for
    text_image_ids: list[str]  # (M,) image id of each caption
    labels: dict[str, torch.Tensor]  # name -> (N,) long


def embed_split(
    data: Any,
    split: str,
    *,
    batch_size: int,
    encode_images: Callable[[torch.Tensor], Encoded],
    encode_texts: Callable[[list[str]], Encoded] | None = None,
) -> SplitEmbeddings:
    """Encode this rank's batches of ``data.dataset(split)``, gather every rank's (under ``eval_mode``).

    ``encode_images(images (B,3,H,W))`` and ``encode_texts(captions)`` return named tensors per
    batch; texts are all captions of a batch's items (``all_captions``, else ``captions``).
    """
    dataset = data.dataset(split)
    images: dict[str, list[torch.Tensor]] = {}
    texts: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    image_ids: list[str] = []
    text_image_ids: list[str] = []
    for items, keep in my_batches(len(dataset), batch_size):
        batch = data.collate([dataset[i] for i in items])
        encoded_images = encode_images(batch["images"])
        captions = batch.get("all_captions") or [[caption] for caption in batch.get("captions", [])]
        encoded_texts = encode_texts([text for group in captions for text in group]) if encode_texts else {}
        ids = batch.get("image_ids") or batch.get("keys") or [str(i) for i in items]
        # Padding batches count for the names (every rank gathers the same ones), not the rows.
        for outputs, encoded in (
            (images, encoded_images),
            (texts, encoded_texts),
            (labels, batch.get("labels", {})),
        ):
            for name, value in encoded.items():
                outputs.setdefault(name, []).extend([value] if keep else [])
        if keep:
            image_ids += ids
            text_image_ids += [image for image, group in zip(ids, captions) for _ in group]
    gathered_texts = None
    if encode_texts is not None:
        gathered_texts = {name: gather_rows(parts) for name, parts in texts.items()}
    return SplitEmbeddings(
        images={name: gather_rows(parts) for name, parts in images.items()},
        image_ids=gather_list(image_ids),
        texts=gathered_texts,
        text_image_ids=gather_list(text_image_ids),
        labels={name: gather_rows(parts) for name, parts in labels.items()},
    )


def core_encoders(model: Any, ctx: BuildContext, device: str) -> tuple[Callable, Callable]:
    """``encode_images``/``encode_texts`` giving the model's joint embeddings, fp32 on the CPU."""

    def encode_images(images: torch.Tensor) -> Encoded:
        return {"embedding": model.encode_image(images.to(device)).float().cpu()}  # (B, E)

    def encode_texts(captions: list[str]) -> Encoded:
        tokens = ctx.parts["text"].tokenize(captions)
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        return {"embedding": model.encode_text(ids, mask).float().cpu()}  # (M, E)

    return encode_images, encode_texts


def integer_ids(*groups: list[str]) -> list[torch.Tensor]:
    """Each list of string ids as (n,) long, equal exactly for equal strings across all lists."""
    index: dict[str, int] = {}
    return [torch.tensor([index.setdefault(value, len(index)) for value in group]) for group in groups]


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
    size = int(max(query_ids.max(), gallery_ids.max())) + 1
    counts = torch.bincount(gallery_ids, minlength=size)
    return float(counts[query_ids].float().mean()) / len(gallery_ids)


def retrieval_metrics(
    images: torch.Tensor, image_ids: list[str], texts: torch.Tensor, text_image_ids: list[str]
) -> dict[str, float]:
    """R@K both ways for (N,E) images and (M,E) captions; caption j shows image id ``text_image_ids[j]``."""
    image_keys, text_keys = integer_ids(image_ids, text_image_ids)
    i2t = recall_at_k(images, texts, image_keys, text_keys)
    t2i = recall_at_k(texts, images, text_keys, image_keys)
    metrics = {f"i2t_r{k}": i2t[k] for k in KS} | {f"t2i_r{k}": t2i[k] for k in KS}
    metrics["i2t_chance_r1"] = chance_r1(image_keys, text_keys)
    metrics["t2i_chance_r1"] = chance_r1(text_keys, image_keys)
    return metrics


class RetrievalEvaluator:
    """Image->text and text->image recall at 1/5/10 over a whole split of ``ctx.parts["data"]``.

    Every rank embeds its share; every rank returns the same, one-process metrics.
    """

    def __init__(self, config: RetrievalConfig) -> None:
        self.config = config

    def evaluate(self, model: nn.Module, ctx: BuildContext) -> dict[str, float]:
        encode_images, encode_texts = core_encoders(model, ctx, ctx.device)
        with eval_mode(model):
            split = embed_split(
                ctx.parts["data"],
                self.config.split,
                batch_size=self.config.batch_size,
                encode_images=encode_images,
                encode_texts=encode_texts,
            )
        assert split.texts is not None
        return retrieval_metrics(
            split.images["embedding"], split.image_ids, split.texts["embedding"], split.text_image_ids
        )
