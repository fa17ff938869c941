"""The filler head: p(a sentence is generic padding) from its embedding by the packaged MiniLM.

Generic padding (pleasantries, hedges, statements that would fit any question) is a meaning, not a
vocabulary: a lexical classifier trained on some styles of it misses the others, a linear head on
sentence embeddings does not (bench/results/guards/). Trained by `python -m r3_tools.filler`,
shipped in the package (`filler_head.json`); it reads the model it was trained on, whatever model
the deployment's relevance uses.

Its prefilter, a linear head over the mean of a sentence's word-piece vectors (a table lookup, no
encoder pass), rules out most honest sentences before they cost an embedding; its threshold is set
so that it drops almost no padding of a kind it never saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

HEAD_PATH = Path(__file__).with_name("filler_head.json")
HEAD_FORMAT = "r3-filler-head/1"


@dataclass(frozen=True)
class Linear:
    """p = sigmoid(w · unit(x) + b)."""

    weights: torch.Tensor  # (dim,)
    bias: float

    def probability(self, rows: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.normalize(rows.float(), dim=-1)
        return torch.sigmoid(rows @ self.weights + self.bias)

    def to_json(self) -> dict[str, object]:
        return {"bias": round(self.bias, 6), "weights": [round(w, 6) for w in self.weights.tolist()]}

    @classmethod
    def from_json(cls, data: dict) -> Linear:
        return cls(torch.tensor(data["weights"], dtype=torch.float32), float(data["bias"]))


@dataclass(frozen=True)
class FillerHead:
    """p(filler) from a sentence's embedding; and, optionally, a prefilter from its word vectors
    (`EmbeddingModel.word_vectors`: a lookup, no encoder pass) that passes on to the embedding
    only the sentences it cannot rule out."""

    model: str  # the embedding model it reads (R3_MODEL spelling)
    head: Linear
    prefilter: Linear | None = None
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """The p(filler) it flags at: picked at training by leave-one-category-out (the highest at
        which padding of a kind it never saw is still mostly caught)."""
        return float(self.meta.get("threshold", 0.5))  # type: ignore[arg-type]

    @property
    def prefilter_threshold(self) -> float:
        """The prefilter's p(filler) below which a sentence is not padding: picked the same way,
        with a stricter floor (what it drops, the head never sees)."""
        return float(self.meta.get("prefilter_threshold", 0.0))  # type: ignore[arg-type]

    def probability(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.head.probability(embeddings)

    def save(self, path: Path) -> None:
        data = {"format": HEAD_FORMAT, "model": self.model, **self.head.to_json(),
                **({"prefilter": self.prefilter.to_json()} if self.prefilter else {}), "meta": self.meta}
        path.write_text(json.dumps(data, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path = HEAD_PATH) -> FillerHead:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != HEAD_FORMAT:
            raise ValueError(f"{path}: not a filler head ({HEAD_FORMAT})")
        prefilter = Linear.from_json(data["prefilter"]) if "prefilter" in data else None
        return cls(data["model"], Linear.from_json(data), prefilter, data.get("meta", {}))
