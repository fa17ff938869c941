"""Query-type classifiers: is a query open-ended or closed-ended (spec, "Query-type classification")?

Three kinds answer for queries that neither the request nor the store types:
- `learned` (default, `learned.py`): a linear head on the service's model (every layer's mean)
  plus lexical features;
- `llm` (`llm.py`): the paper's prompt sent to an OpenAI-compatible endpoint, falling back to
  `learned` per query;
- `rules` (`rules.py`): a keyword baseline, also the fallback when the head does not match the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from r3_service.qtype.base import EmbedFor, QueryTypeClassifier
from r3_service.qtype.learned import HEAD_PATH, HeadMismatch, LearnedClassifier, LinearHead
from r3_service.qtype.llm import LlmClassifier
from r3_service.qtype.rules import RulesClassifier

log = logging.getLogger(__name__)

KINDS = ("learned", "llm", "rules")


def build_classifier(kind: str, *, embed_for: EmbedFor | None = None, model_name: str | None = None,
                     llm_url: str | None = None, llm_model: str | None = None,
                     llm_api_key: str | None = None, timeout_s: float = 10.0, retries: int = 2,
                     concurrency: int = 8, head_path: Path = HEAD_PATH) -> QueryTypeClassifier:
    """The classifier of a kind in KINDS. `learned` (and `llm`'s fallback) needs `embed_for` and
    the service's `model_name`; a head trained on another model gives `rules`, with a warning."""
    if kind == "rules":
        return RulesClassifier()
    if kind == "learned":
        return _learned_or_rules(embed_for, model_name, head_path)
    if kind == "llm":
        if not llm_url or not llm_model:
            raise ValueError("the llm query-type classifier needs an endpoint URL and a model name")
        fallback = _learned_or_rules(embed_for, model_name, head_path)
        return LlmClassifier(llm_url, llm_model, api_key=llm_api_key, timeout_s=timeout_s, retries=retries,
                             concurrency=concurrency, fallback=fallback)
    raise ValueError(f"unknown query-type classifier {kind!r}; valid: {', '.join(KINDS)}")


def _learned_or_rules(embed_for: EmbedFor | None, model_name: str | None,
                      head_path: Path) -> QueryTypeClassifier:
    if embed_for is None or model_name is None:
        raise ValueError("the learned query-type classifier needs an embed function and the model name")
    try:
        return LearnedClassifier(embed_for, model_name, LinearHead.load(head_path))
    except HeadMismatch as error:
        log.warning("%s; classifying query types with the rules baseline instead", error)
        return RulesClassifier()
