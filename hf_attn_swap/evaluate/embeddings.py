"""Sentence embeddings of encoder models and how close a converted encoder's embeddings stay to the original's.

Embeddings follow sentence-transformers' all-MiniLM-L6-v2 pipeline (its ``1_Pooling`` config: mean of the
last hidden states over non-padding tokens; ``max_seq_length`` 256). Cosine similarity is unaffected by the
final ``Normalize`` module, so it is skipped.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def mean_pooled_embeddings(
    model: nn.Module, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 32
) -> torch.Tensor:
    """[N, hidden] float32: mean of the last hidden states over each text's tokens (sentence-transformers'
    mean pooling), texts truncated to ``max_length`` tokens."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(model.device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).cpu())
    return torch.cat(rows)


def embedding_agreement(reference: torch.Tensor, embeddings: torch.Tensor) -> dict:
    """How well ``embeddings`` [N, D] match ``reference`` [N, D] row by row.

    cosine_mean/min/median: cosine similarity of each text's two embeddings. retrieval_top1: fraction of
    texts whose embedding has its own reference embedding as nearest neighbour among all N reference
    embeddings. reference_neighbour_cosine: mean cosine between each reference embedding and its nearest
    *other* reference embedding (how close distinct texts are: the scale the cosines should be read on).
    """
    ref = torch.nn.functional.normalize(reference.float(), dim=-1)
    emb = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cosine = (ref * emb).sum(-1)
    nearest = (emb @ ref.T).argmax(-1)
    between = ref @ ref.T
    between.fill_diagonal_(-2.0)
    return {
        "texts": ref.shape[0],
        "cosine_mean": cosine.mean().item(),
        "cosine_median": cosine.median().item(),
        "cosine_min": cosine.min().item(),
        "retrieval_top1": (nearest == torch.arange(len(ref))).float().mean().item(),
        "reference_neighbour_cosine": between.max(-1).values.mean().item(),
    }
