"""The filler head: p(a sentence is generic padding) from its embedding by the packaged MiniLM.

Generic padding (pleasantries, hedges, statements that would fit any question) is a meaning, not a
vocabulary: a lexical classifier trained on some styles of it misses the others, a linear head on
sentence embeddings does not (bench/results/guards/). Trained by `python -m r3_tools.filler`,
shipped in the package (`filler_head.json`); it reads the model it was trained on, whatever model
the deployment's relevance uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

HEAD_PATH = Path(__file__).with_name("filler_head.json")
HEAD_FORMAT = "r3-filler-head/1"


@dataclass(frozen=True)
class FillerHead:
    """p(filler) = sigmoid(w · unit(embedding) + b)."""

    model: str  # the embedding model it reads (R3_MODEL spelling)
    weights: torch.Tensor  # (dim,)
    bias: float
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """The p(filler) it flags at: picked at training by leave-one-category-out (the highest at
        which padding of a kind it never saw is still mostly caught)."""
        return float(self.meta.get("threshold", 0.5))  # type: ignore[arg-type]

    def probability(self, embeddings: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return torch.sigmoid(rows @ self.weights + self.bias)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"format": HEAD_FORMAT, "model": self.model, "bias": round(self.bias, 6),
                                    "weights": [round(w, 6) for w in self.weights.tolist()],
                                    "meta": self.meta}, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path = HEAD_PATH) -> FillerHead:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != HEAD_FORMAT:
            raise ValueError(f"{path}: not a filler head ({HEAD_FORMAT})")
        return cls(data["model"], torch.tensor(data["weights"], dtype=torch.float32), float(data["bias"]),
                   data.get("meta", {}))
