"""``albef.retrieval``: ITC ranking, then ITM re-ranking of each query's top k (ALBEF's Retrieval.py).

Every image and caption of a split is encoded once (tokens and embeddings).
The ITC ranking gives the usual R@1/5/10 (``i2t_r1``, ...; the core
``retrieval`` evaluator's metrics). Then, for each query, the k gallery items
with the highest ITC similarity are scored by the ITM head on the fusion
encoder's CLS (the "match" logit) and ranked by that score, every other item
after them: ``itm_i2t_r1``, .... Matching follows the core evaluator: a caption
matches an image iff the two captions are identical (generated captions repeat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vlforge.eval.retrieval import KS, caption_ids, eval_mode, retrieval_metrics

if TYPE_CHECKING:
    from vlforge_plugins.albef import AlbefRetrievalConfig

    from vlforge.components import BuildContext
    from vlforge.model import VLModel


@dataclass
class EncodedSplit:
    image_tokens: torch.Tensor  # (N, T, Dv)
    images: torch.Tensor  # (N, E) normalised, fp32, on the CPU (as the core evaluator's)
    text_tokens: torch.Tensor  # (N, Lmax, D), zero past each caption's length
    text_masks: torch.Tensor  # (N, Lmax)
    texts: torch.Tensor  # (N, E) normalised, fp32, on the CPU
    captions: list[str]


def encode_split(model: VLModel, data: Any, split: str, batch_size: int, device: str) -> EncodedSplit:
    """Tokens and embeddings of every image and caption of ``split``, in order (call under ``eval_mode``)."""
    loader = DataLoader(data.dataset(split), batch_size=batch_size, collate_fn=data.collate)
    image_tokens, images, text_tokens, text_masks, texts, captions = [], [], [], [], [], []
    for batch in loader:
        vision = model.vision(batch["images"].to(device))
        text = model.text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        image_tokens.append(vision.tokens)
        images.append(vision.embedding.float().cpu())
        text_tokens.append(text.tokens)
        text_masks.append(text.attention_mask)
        texts.append(text.embedding.float().cpu())
        captions += batch["captions"]
    length = max(t.shape[1] for t in text_tokens)  # batches are padded to their own longest caption
    return EncodedSplit(
        image_tokens=torch.cat(image_tokens),
        images=torch.cat(images),
        text_tokens=torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in text_tokens]),
        text_masks=torch.cat([F.pad(m, (0, length - m.shape[1])) for m in text_masks]),
        texts=torch.cat(texts),
        captions=captions,
    )


def rerank_scores(similarity: torch.Tensor, k: int, score_pairs: Any, pairs_per_call: int) -> torch.Tensor:
    """(Q, G) ITC similarities (CPU) -> (Q, G) scores: ITM score for each query's top k, −inf elsewhere.

    ``score_pairs(queries (n,), gallery (n,))`` returns the (n,) ITM scores of those index pairs.
    """
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(similarity.shape[0], device=top.device)[:, None].expand_as(top).reshape(-1)
    gallery = top.reshape(-1)
    scores = torch.cat(
        [
            score_pairs(queries[start : start + pairs_per_call], gallery[start : start + pairs_per_call])
            for start in range(0, len(queries), pairs_per_call)
        ]
    )
    reranked = torch.full_like(similarity, float("-inf"))
    reranked[queries, gallery] = scores.to(reranked)
    return reranked


def recall_from_scores(scores: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> dict:
    """k -> fraction of queries with a same-id gallery item among their k highest-scored (Q, G)."""
    top = scores.topk(min(max(KS), scores.shape[1]), dim=1).indices  # (Q, 10)
    matches = gallery_ids[top] == query_ids[:, None]
    return {k: float(matches[:, :k].any(dim=1).float().mean()) for k in KS}


class AlbefRetrievalEvaluator:
    """R@1/5/10 both ways by ITC, and after ITM re-ranking of the top k; runs in the calling process."""

    def __init__(self, config: AlbefRetrievalConfig) -> None:
        self.config = config

    def evaluate(self, model: VLModel, ctx: BuildContext) -> dict[str, float]:
        config = self.config
        itm = model.objectives[config.itm_objective]
        with eval_mode(model):
            split = encode_split(model, ctx.parts["data"], config.split, config.batch_size, ctx.device)
            similarity = split.images @ split.texts.T  # (N images, N texts)

            def match_score(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
                logits = itm.score(
                    model.fusion,
                    split.text_tokens[text_index],
                    split.text_masks[text_index],
                    split.image_tokens[image_index],
                )
                return logits[:, 1]  # (n,) the "match" logit, as ALBEF ranks

            pairs = config.batch_size
            i2t = rerank_scores(similarity, config.k, match_score, pairs)
            t2i = rerank_scores(similarity.T, config.k, lambda t, i: match_score(i, t), pairs)
        metrics = retrieval_metrics(split.images, split.texts, split.captions)
        ids = caption_ids(split.captions)
        for direction, scores in (("i2t", i2t), ("t2i", t2i)):
            for k, value in recall_from_scores(scores, ids, ids).items():
                metrics[f"itm_{direction}_r{k}"] = value
        return metrics
