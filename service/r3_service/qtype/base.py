"""What a query-type classifier is: it answers open or closed for user queries (chat template
already removed by the caller), and every answer carries the id (`name@version`) of the
classifier that gave it, so the store can tell a stale answer of an older classifier from a
current one, and both from an authoritative label."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol

import torch

from r3_service.rule.features import collapse_whitespace
from r3_service.rule.querytypes import QueryType

INPUT_MARKER = "### Input:"

Embed = Callable[[list[str]], Awaitable[torch.Tensor]]
# An Embed of the service's model for a pooling (`mean`, `layers`: see models.embedding).
EmbedFor = Callable[[str], Embed]


class Label(NamedTuple):
    query_type: QueryType
    classified_by: str  # id of the classifier that answered: `name@version`
    # The classifier's p(open), so a caller can tell a sure answer from a coin flip; None for
    # classifiers that only answer open or closed (rules, llm).
    open_probability: float | None = None


class QueryTypeClassifier(Protocol):
    name: str
    version: str

    @property
    def id(self) -> str: ...

    async def label(self, queries: Sequence[str]) -> list[Label]: ...

    async def classify(self, queries: Sequence[str]) -> list[QueryType]: ...

    async def aclose(self) -> None: ...


def short_hash(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
    return digest.hexdigest()[:12]


class BaseClassifier:
    """`id`, `classify` and `aclose` for classifiers whose every answer is their own."""

    name: str
    version: str

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    async def classify(self, queries: Sequence[str]) -> list[QueryType]:
        return [label.query_type for label in await self.label(queries)]

    async def label(self, queries: Sequence[str]) -> list[Label]:
        return [Label(query_type, self.id) for query_type in await self._types(queries)]

    async def _types(self, queries: Sequence[str]) -> list[QueryType]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def split_query(query: str) -> tuple[str, str]:
    """(instruction, input section) of a user query, whitespace collapsed; AlpacaFarm puts inputs
    after `### Input:`."""
    instruction, _, section = collapse_whitespace(query).partition(INPUT_MARKER)
    return instruction.strip(), section.strip()
