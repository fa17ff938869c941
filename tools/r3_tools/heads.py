"""Training the learned query-type head (L2-regularised logistic regression, LBFGS; temperature
scaling), and embed functions over a local model for the offline query-type tools."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import torch

from r3_service.models.embedding import EmbeddingModel, Pooling
from r3_service.qtype.base import Embed, EmbedFor
from r3_service.qtype.learned import LinearHead, lexical_features


def fit_head(queries: Sequence[str], labels: torch.Tensor, embeddings: torch.Tensor, *, model: str,
             l2: float, min_count: int = 1, meta: dict[str, object] | None = None,
             pooling: str = "mean") -> LinearHead:
    """L2-regularised logistic regression (labels: 1 = open) on standardised features, the
    standardisation then folded into the weights so that scoring needs no statistics."""
    features = [lexical_features(query) for query in queries]
    counts: dict[str, int] = {}
    for row in features:
        for name in row:
            counts[name] = counts.get(name, 0) + 1
    vocabulary = sorted(name for name, count in counts.items() if count >= min_count)
    index = {name: column for column, name in enumerate(vocabulary)}
    lexical = torch.zeros(len(queries), len(vocabulary))
    for row, names in enumerate(features):
        lexical[row, [index[name] for name in names if name in index]] = 1.0
    x = torch.cat([torch.nn.functional.normalize(embeddings.float(), dim=-1), lexical], dim=1)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    weights, bias = _logistic_regression((x - mean) / std, labels.float(), l2)
    raw = weights / std
    dim = embeddings.shape[1]
    return LinearHead(model=model, embedding_weights=raw[:dim],
                      lexical_weights=dict(zip(vocabulary, raw[dim:].tolist(), strict=True)),
                      bias=float(bias - (raw * mean).sum()), meta=dict(meta or {}), pooling=pooling)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the log loss of sigmoid(logits / T) (temperature scaling): fitted
    on predictions for queries the head never saw, it turns logits into calibrated probabilities."""
    log_t = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    logits, labels = logits.detach().float(), labels.float()

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits / log_t.exp(), labels)
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    return float(log_t.detach().exp())


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float,
                         weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(weights, bias) of an L2-regularised logistic regression; `weight`: one per row (None: 1)."""
    params = torch.zeros(x.shape[1] + 1, requires_grad=True)
    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ params[:-1] + params[-1]
        penalty = l2 * params[:-1].square().sum()
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight) + penalty
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    params = params.detach()
    return params[:-1], float(params[-1])


def model_embedder(model: EmbeddingModel) -> EmbedFor:
    """An `EmbedFor` over an `EmbeddingModel`, off the event loop (for tools and tests; the service
    passes its schedulers instead)."""

    def embed_for(pooling: str) -> Embed:
        view = model.view(cast(Pooling, pooling))

        async def embed(texts: list[str]) -> torch.Tensor:
            return await asyncio.to_thread(view.embed, texts)

        return embed

    return embed_for


def lazy_embedder(model_name: str, device: str = "cpu") -> EmbedFor:
    """`model_embedder` of a model loaded on first use: tools skip the load when nothing needs it."""
    loaded: list[EmbeddingModel] = []

    def embed_for(pooling: str) -> Embed:
        async def embed(texts: list[str]) -> torch.Tensor:
            if not loaded:
                loaded.append(await asyncio.to_thread(EmbeddingModel, model_name, device=device))
            return await model_embedder(loaded[0])(pooling)(texts)

        return embed

    return embed_for
