"""`learned` (the default): a linear head on the service's own model (the mean of every layer's
token states) plus lexical features, with a fitted temperature for calibrated probabilities;
shipped in the package (`qtype_head.json`, trained by `r3-qtypes train`)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from r3_service.qtype.base import BaseClassifier, EmbedFor, Label, short_hash, split_query
from r3_service.rule.features import collapse_whitespace

HEAD_PATH = Path(__file__).with_name("qtype_head.json")
HEAD_FORMAT = "r3-qtype-head/1"

_WORD = re.compile(r"[a-z]+|\d+|[?:!\"]")


def lexical_features(query: str) -> set[str]:
    """Instruction unigrams and bigrams, its first word(s), and the words of an input section:
    the instruction's verb says much of the task, which a mean-pooled embedding blurs."""
    instruction, section = split_query(query)
    words = _WORD.findall(instruction.lower())
    features = {f"u:{word}" for word in words} | {f"b:{a}_{b}" for a, b in pairwise(words)}
    if words:
        features.add(f"first:{words[0]}")
        features.add(f"first2:{'_'.join(words[:2])}")
    if section:
        features.add("has_input")
        features |= {f"i:{word}" for word in _WORD.findall(section.lower())}
    return features


@dataclass(frozen=True)
class LinearHead:
    """logit(open) = w·normalise(embedding) + Σ lexical weights of the query's features + bias;
    p(open) = sigmoid(logit / temperature), the temperature fitted on held-out-group predictions
    (`r3-qtypes train`) so that a probability of 0.8 is right about 80% of the time."""

    model: str  # the embedding model it was trained on (R3_MODEL spelling)
    embedding_weights: torch.Tensor  # (dim,)
    lexical_weights: dict[str, float]
    bias: float
    meta: dict[str, object] = field(default_factory=dict)  # how it was trained and how well it did
    temperature: float = 1.0
    pooling: str = "mean"  # which view of the model's forward pass it reads (models.embedding)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"a query-type head's temperature must be > 0, got {self.temperature}")

    @property
    def dim(self) -> int:
        return int(self.embedding_weights.shape[0])

    @property
    def version(self) -> str:
        return short_hash(self.to_json())

    def logits(self, queries: Sequence[str], embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape != (len(queries), self.dim):
            raise ValueError(f"expected embeddings of shape ({len(queries)}, {self.dim}), "
                             f"got {tuple(embeddings.shape)}")
        unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)  # whatever R3_NORMALIZE says
        lexical = torch.tensor([sum(self.lexical_weights.get(f, 0.0) for f in lexical_features(query))
                                for query in queries], dtype=torch.float32)
        return unit @ self.embedding_weights + lexical + self.bias

    def open_probabilities(self, queries: Sequence[str], embeddings: torch.Tensor) -> torch.Tensor:
        """p(open) per query: the one place that turns logits into probabilities (calibration)."""
        return torch.sigmoid(self.logits(queries, embeddings) / self.temperature)

    def to_json(self) -> str:
        return json.dumps({
            "format": HEAD_FORMAT, "model": self.model, "bias": round(self.bias, 6),
            "temperature": round(self.temperature, 6), "pooling": self.pooling,
            "embedding_weights": [round(w, 6) for w in self.embedding_weights.tolist()],
            "lexical_weights": {k: round(v, 6) for k, v in sorted(self.lexical_weights.items())},
            "meta": self.meta,
        }, indent=0, sort_keys=True)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path = HEAD_PATH) -> LinearHead:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != HEAD_FORMAT:
            raise ValueError(f"{path}: not a query-type head ({HEAD_FORMAT})")
        return cls(model=data["model"], bias=float(data["bias"]),
                   embedding_weights=torch.tensor(data["embedding_weights"], dtype=torch.float32),
                   lexical_weights={k: float(v) for k, v in data["lexical_weights"].items()},
                   meta=data.get("meta", {}), temperature=float(data.get("temperature", 1.0)),
                   pooling=str(data.get("pooling", "mean")))


class HeadMismatch(ValueError):
    """The head was trained on another embedding model than the one the service runs."""


class LearnedClassifier(BaseClassifier):
    """The packaged head on embeddings from `embed_for(head.pooling)`: in the service, a batching
    scheduler over the service's model (the `layers` view has a queue of its own, so new queries
    are classified in batches across concurrent requests; a `mean` head would share batches and
    the embedding cache with reward scoring)."""

    name = "learned"

    def __init__(self, embed_for: EmbedFor, model_name: str, head: LinearHead | None = None) -> None:
        self.head = head if head is not None else LinearHead.load()
        if self.head.model != model_name:
            raise HeadMismatch(f"the query-type head was trained on embeddings of {self.head.model!r}, "
                               f"but the service runs {model_name!r}; retrain it with "
                               f"`r3-qtypes train DATA --model {model_name}`")
        self.embed = embed_for(self.head.pooling)
        self.version = self.head.version

    async def label(self, queries: Sequence[str]) -> list[Label]:
        """Each answer with its p(open); the type follows it, so the two never disagree."""
        if not queries:
            return []
        texts = [collapse_whitespace(query) for query in queries]
        probabilities = self.head.open_probabilities(texts, await self.embed(texts)).tolist()
        return [Label("open" if p > 0.5 else "closed", self.id, p) for p in probabilities]
