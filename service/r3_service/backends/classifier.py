"""Query-type classifiers: is a query open-ended or closed-ended (spec, "Query-type classification")?

Three kinds answer for queries that neither the request nor the store types:
- `learned` (default): a linear head on the service's own sentence embedding plus lexical features,
  shipped in the package (`qtype_head.json`, trained by `r3-qtype train`);
- `llm`: the paper's prompt sent to an OpenAI-compatible endpoint (`llm_classifier.py`), falling back
  to `learned` per query;
- `rules`: a transparent keyword baseline, also the fallback when the head does not match the model.

Every answer carries the id (`name@version`) of the classifier that gave it, so the store can tell a
stale answer of an older classifier from a current one, and both from an authoritative label.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

from r3_service.backends.embedding import EmbeddingModel
from r3_service.backends.templates import normalise_query
from r3_service.querytypes import QueryType

log = logging.getLogger(__name__)

KINDS = ("learned", "llm", "rules")
HEAD_PATH = Path(__file__).with_name("qtype_head.json")
HEAD_FORMAT = "r3-qtype-head/1"
_INPUT_MARKER = "### Input:"

Embed = Callable[[list[str]], Awaitable[torch.Tensor]]


class Label(NamedTuple):
    query_type: QueryType
    classified_by: str  # id of the classifier that answered: `name@version`


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
    """(instruction, input section) of a normalised query; AlpacaFarm puts inputs after `### Input:`."""
    instruction, _, section = normalise_query(query).partition(_INPUT_MARKER)
    return instruction.strip(), section.strip()


# ---------------------------------------------------------------------------------------------
# rules


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    weight: float  # > 0 votes open, < 0 votes closed
    on_input: bool = False  # match the input section instead of the instruction


def _rule(pattern: str, weight: float, *, on_input: bool = False) -> Rule:
    return Rule(re.compile(pattern), weight, on_input)


_CREATIVE_VERBS = (r"compose|design|come up with|propose|brainstorm|imagine|invent|formulate|recommend|"
                   r"suggest|construct|develop|draft|craft|produce|tell|write|create|generate|describe|"
                   r"make|build|plan|pretend")
_CONSTRAINED_VERBS = (r"classify|categori[sz]e|convert|summari[sz]e|calculate|determine|compute|solve|"
                      r"translate|rewrite|re-write|edit|correct|reverse|select|rearrange|arrange|sort|rank|"
                      r"extract|identify|find|name|list|count|combine|estimate|reword|paraphrase|change|"
                      r"transform|answer|read|detect|check|fill|complete|replace|delete|remove|format|"
                      r"output|pick|choose|match|given|give|state|define|spell|cite|label|tag|compare")

# Tuned by hand on the training split of data/alpacafarm_val.json (never the held-out rows).
RULES: tuple[Rule, ...] = (
    _rule(rf"^(please )?({_CREATIVE_VERBS})\b", 1.5),
    _rule(rf"^(please )?({_CONSTRAINED_VERBS})\b", -1.5),
    _rule(r"\b(story|poem|haiku|song|lyrics|limerick|essay|slogan|tagline|tweet|blog|letter|speech|"
          r"dialogue|joke|riddle|metaphor|simile|recipe|ideas?|tips|advice|strategies|strategy|plan|"
          r"creative|imaginative|original|unique|your own|opinion|catchy|fictional|motto|menu|"
          r"persuasive|advertisement|marketing|campaign)\b", 1.0),
    _rule(r"^(how (can|could|should|would|do|does|to|might)|what (are|is) (some|a good|the best|your)|"
          r"why|should|would you|what would|what if|imagine|suppose)\b", 1.0),
    _rule(r"^(what|which|who|whom|when|where|how (many|much|long|old|far|fast)|is|are|does|do|did|"
          r"can|was|were|has|have)\b", -1.0),
    _rule(r"\b(equation|formula|sum|average|percentage|number of|capital of|synonyms?|antonyms?|"
          r"opposite|plural|past tense|grammar|grammatical|spelling|true or false|yes or no|correct|"
          r"sentiment|classify|category|categories|definition|meaning of|translate|summary|"
          r"part of speech|noun|verb|adjective|adverb|chronological|alphabetical|largest|smallest)\b",
          -1.0),
    _rule(r"\d\s*[-+*/x^=]\s*\d", -1.5),
    _rule(r"\b(list|name|identify|give|provide|find) (\d+|two|three|four|five|six|seven|eight|nine|ten)\b",
          -0.5),
    _rule(r"\S", -0.75, on_input=True),  # an input section pins the task to given material
)
RULES_BIAS = 0.25


def rule_score(query: str) -> float:
    """Sum of the weights of the rules that match; > 0 means open-ended."""
    instruction, section = split_query(query)
    instruction = instruction.lower()
    return RULES_BIAS + sum(rule.weight for rule in RULES
                            if rule.pattern.search(section if rule.on_input else instruction))


class RulesClassifier(BaseClassifier):
    """Keyword baseline: creative imperatives vote open, factual questions and edits of given text
    vote closed."""

    name = "rules"
    version = short_hash(repr([(r.pattern.pattern, r.weight, r.on_input) for r in RULES]), str(RULES_BIAS))

    async def _types(self, queries: Sequence[str]) -> list[QueryType]:
        return ["open" if rule_score(query) > 0 else "closed" for query in queries]


# ---------------------------------------------------------------------------------------------
# learned: a linear head on the sentence embedding and lexical features

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
    """logit(open) = w·normalise(embedding) + Σ lexical weights of the query's features + bias."""

    model: str  # the embedding model it was trained on (R3_MODEL spelling)
    embedding_weights: torch.Tensor  # (dim,)
    lexical_weights: dict[str, float]
    bias: float
    meta: dict[str, object] = field(default_factory=dict)  # how it was trained and how well it did

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

    def to_json(self) -> str:
        return json.dumps({
            "format": HEAD_FORMAT, "model": self.model, "bias": round(self.bias, 6),
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
                   meta=data.get("meta", {}))


def fit_head(queries: Sequence[str], labels: torch.Tensor, embeddings: torch.Tensor, *, model: str,
             l2: float, min_count: int = 1, meta: dict[str, object] | None = None) -> LinearHead:
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
                      bias=float(bias - (raw * mean).sum()), meta=dict(meta or {}))


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    params = torch.zeros(x.shape[1] + 1, requires_grad=True)
    optimiser = torch.optim.LBFGS([params], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        logits = x @ params[:-1] + params[-1]
        penalty = l2 * params[:-1].square().sum()
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + penalty
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(loss)
    params = params.detach()
    return params[:-1], float(params[-1])


class HeadMismatch(ValueError):
    """The head was trained on another embedding model than the one the service runs."""


class LearnedClassifier(BaseClassifier):
    """The packaged head on embeddings from `embed` (in the service: the batching scheduler, so
    classification shares batches and the embedding cache with reward scoring)."""

    name = "learned"

    def __init__(self, embed: Embed, model_name: str, head: LinearHead | None = None) -> None:
        self.head = head if head is not None else LinearHead.load()
        if self.head.model != model_name:
            raise HeadMismatch(f"the query-type head was trained on embeddings of {self.head.model!r}, "
                               f"but the service runs {model_name!r}; retrain it with "
                               f"`r3-qtype train DATA --model {model_name}`")
        self.embed = embed
        self.version = self.head.version

    async def _types(self, queries: Sequence[str]) -> list[QueryType]:
        if not queries:
            return []
        texts = [normalise_query(query) for query in queries]
        logits = self.head.logits(texts, await self.embed(texts))
        return ["open" if logit > 0 else "closed" for logit in logits.tolist()]


def model_embedder(model: EmbeddingModel) -> Embed:
    """An `Embed` over an `EmbeddingModel` off the event loop (for tools and tests; the service
    passes its scheduler instead)."""

    async def embed(texts: list[str]) -> torch.Tensor:
        return await asyncio.to_thread(model.embed, texts)

    return embed


def lazy_embedder(model_name: str, device: str = "cpu") -> Embed:
    """`model_embedder` of a model loaded on first use: tools skip the load when nothing needs it."""
    loaded: list[Embed] = []

    async def embed(texts: list[str]) -> torch.Tensor:
        if not loaded:
            model = await asyncio.to_thread(EmbeddingModel, model_name, device=device)
            loaded.append(model_embedder(model))
        return await loaded[0](texts)

    return embed


# ---------------------------------------------------------------------------------------------


def build_classifier(kind: str, *, embed: Embed | None = None, model_name: str | None = None,
                     llm_url: str | None = None, llm_model: str | None = None,
                     llm_api_key: str | None = None, timeout_s: float = 10.0, retries: int = 2,
                     concurrency: int = 8, head_path: Path = HEAD_PATH) -> QueryTypeClassifier:
    """The classifier of a kind in KINDS. `learned` (and `llm`'s fallback) needs `embed` and the
    service's `model_name`; a head trained on another model gives `rules`, with a warning."""
    if kind == "rules":
        return RulesClassifier()
    if kind == "learned":
        return _learned_or_rules(embed, model_name, head_path)
    if kind == "llm":
        if not llm_url or not llm_model:
            raise ValueError("the llm query-type classifier needs an endpoint URL and a model name")
        from r3_service.backends.llm_classifier import LlmClassifier  # it imports this module

        fallback = _learned_or_rules(embed, model_name, head_path)
        return LlmClassifier(llm_url, llm_model, api_key=llm_api_key, timeout_s=timeout_s, retries=retries,
                             concurrency=concurrency, fallback=fallback)
    raise ValueError(f"unknown query-type classifier {kind!r}; valid: {', '.join(KINDS)}")


def _learned_or_rules(embed: Embed | None, model_name: str | None, head_path: Path) -> QueryTypeClassifier:
    if embed is None or model_name is None:
        raise ValueError("the learned query-type classifier needs an embed function and the model name")
    try:
        return LearnedClassifier(embed, model_name, LinearHead.load(head_path))
    except HeadMismatch as error:
        log.warning("%s; classifying query types with the rules baseline instead", error)
        return RulesClassifier()
