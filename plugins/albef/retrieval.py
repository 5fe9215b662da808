"""``albef.retrieval``: ITC ranking, then ITM re-ranking of each query's top k (ALBEF's Retrieval.py).

Every image and caption of a split is encoded once (tokens and embeddings),
each rank its share of the images and their captions, then gathered
(``vlforge.eval.shards``). The ITC ranking gives the usual R@1/5/10
(``i2t_r1``, ...; the core ``retrieval`` evaluator's metrics, over image
groups: a caption matches an image iff it is one of that image's captions, by
image id). Then, for each query, the k gallery items with the highest ITC
similarity are scored by the ITM head on the fusion encoder's CLS (the
"match" logit) and put first in that order, every other item after them in
ITC order: ``itm_i2t_r1``, .... The queries are shared out among the ranks in
whole groups of ``batch_size // k`` and the hits gathered, so every rank
scores the same pairs in the same groups as one process would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlforge.eval.retrieval import KS, embed_split, integer_ids, retrieval_metrics
from vlforge.eval.shards import eval_mode, gather_rows, my_batches

if TYPE_CHECKING:
    from collections.abc import Callable

    from vlforge_plugins.albef import AlbefRetrievalConfig

    from vlforge.components import BuildContext
    from vlforge.model import VLModel


def reranked_recall(
    similarity: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    k: int,
    score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pairs_per_call: int,
) -> dict[int, float]:
    """R@K after re-ranking each query's ITC top k of (Q, G) ``similarity`` by ``score_pairs``.

    ``score_pairs(queries (n,), gallery (n,))`` returns the (n,) ITM scores of those index
    pairs. This rank scores its share of the queries; the per-query hits are gathered.
    """
    k = min(k, similarity.shape[1])
    depth = min(max(k, max(KS)), similarity.shape[1])
    hits = []
    for rows, keep in my_batches(similarity.shape[0], max(1, pairs_per_call // k)):
        queries = torch.arange(rows.start, rows.stop)
        top = similarity[queries].topk(depth, dim=1).indices  # (n, depth) in ITC order
        scores = score_pairs(queries[:, None].expand(-1, k).reshape(-1), top[:, :k].reshape(-1))
        order = scores.view(len(queries), k).float().cpu().argsort(dim=1, descending=True, stable=True)
        ranked = torch.cat([top[:, :k].gather(1, order), top[:, k:]], dim=1)[:, : max(KS)]
        if keep:
            hits.append((gallery_ids[ranked] == query_ids[queries, None]).to(torch.uint8))  # (n, 10)
    matches = gather_rows(hits).bool()  # (Q, 10)
    return {at: float(matches[:, :at].any(dim=1).float().mean()) for at in KS}


class AlbefRetrievalEvaluator:
    """R@1/5/10 both ways by ITC, and after ITM re-ranking of the top k; every rank its share."""

    def __init__(self, config: AlbefRetrievalConfig) -> None:
        self.config = config

    def encoders(self, model: VLModel, ctx: BuildContext) -> tuple[Callable, Callable]:
        device = ctx.device

        def encode_images(images: torch.Tensor) -> dict[str, torch.Tensor]:
            vision = model.vision(images.to(device))
            return {"tokens": vision.tokens, "embedding": vision.embedding.float().cpu()}  # (B,T,Dv), (B,E)

        def encode_texts(captions: list[str]) -> dict[str, torch.Tensor]:
            tokens = ctx.parts["text"].tokenize(captions)
            text = model.text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
            # (M, L, D), (M, L) 1 = real token, (M, E)
            return {
                "tokens": text.tokens,
                "mask": text.attention_mask,
                "embedding": text.embedding.float().cpu(),
            }

        return encode_images, encode_texts

    def evaluate(self, model: VLModel, ctx: BuildContext) -> dict[str, float]:
        config = self.config
        itm = model.objectives[config.itm_objective]
        encode_images, encode_texts = self.encoders(model, ctx)
        with eval_mode(model):
            split = embed_split(
                ctx.parts["data"],
                config.split,
                batch_size=config.batch_size,
                encode_images=encode_images,
                encode_texts=encode_texts,
            )
            images, texts = split.images, split.texts
            assert texts is not None
            similarity = images["embedding"] @ texts["embedding"].T  # (N images, M captions)
            image_ids, text_ids = integer_ids(split.image_ids, split.text_image_ids)

            def match_score(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
                logits = itm.score(
                    model.fusion,
                    texts["tokens"][text_index],
                    texts["mask"][text_index],
                    images["tokens"][image_index],
                )
                return logits[:, 1]  # (n,) the "match" logit, as ALBEF ranks

            pairs = config.batch_size
            i2t = reranked_recall(similarity, image_ids, text_ids, config.k, match_score, pairs)
            t2i = reranked_recall(
                similarity.T, text_ids, image_ids, config.k, lambda t, i: match_score(i, t), pairs
            )
        metrics = retrieval_metrics(
            images["embedding"], split.image_ids, texts["embedding"], split.text_image_ids
        )
        for direction, recall in (("i2t", i2t), ("t2i", t2i)):
            for at, value in recall.items():
                metrics[f"itm_{direction}_r{at}"] = value
        return metrics
