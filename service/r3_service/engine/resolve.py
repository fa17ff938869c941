"""Resolution: each raw item becomes one the rule can score. Its response is cleaned, and its
query type and reference come from the request, else the store, else the classifier (whose
answers are written back), else the configured default. Each query is keyed once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from r3_service.qtype.base import QueryTypeClassifier
from r3_service.rule.datasets import QueryRecord, clean_reference
from r3_service.rule.features import clean_response
from r3_service.rule.querytypes import QueryType
from r3_service.rule.reward import ResolvedItem
from r3_service.rule.templates import extract_query
from r3_service.store.records import text_key
from r3_service.store.stores import QueryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawItem:
    """One item as a caller sent it; `stop_strings` adds role prefixes of a detected template."""

    query: str
    response: str
    reference: str | None = None
    query_type: QueryType | None = None
    stop_strings: tuple[str, ...] = field(default=())


class Resolver:
    """`stop_strings` None: responses are only stripped, never cut."""

    def __init__(self, store: QueryStore, classifier: QueryTypeClassifier | None, *,
                 default_query_type: QueryType, stop_strings: tuple[str, ...] | None) -> None:
        self.store = store
        self.classifier = classifier
        self.default_query_type = default_query_type
        self.stop_strings = stop_strings
        fallback = getattr(classifier, "fallback", None)
        # Classifier ids whose stored answers are still good (a new version re-classifies).
        self.current = {c.id for c in (classifier, fallback) if c is not None}

    async def resolve(self, items: Sequence[RawItem], classify: bool = True) -> list[ResolvedItem]:
        queries = [extract_query(item.query) for item in items]
        keys = [text_key(query) if item.query_type is None or clean_reference(item.reference) is None
                else None for item, query in zip(items, queries, strict=True)]
        distinct = sorted({key for key in keys if key is not None})
        found = dict(zip(distinct, await self.store.get_many(distinct), strict=True)) if distinct else {}
        if classify and self.classifier is not None:
            found |= await self._classify(items, queries, keys, found)
        return [self._resolve_one(item, query, found.get(key) if key is not None else None)
                for item, query, key in zip(items, queries, keys, strict=True)]

    def _untyped(self, items: Sequence[RawItem], queries: list[str], keys: list[str | None],
                 found: dict[str, QueryRecord | None]) -> dict[str, str]:
        """key -> query of the queries that neither the request nor the store (by a current
        classifier, or a dataset) types, first seen first."""
        unknown: dict[str, str] = {}
        for item, query, key in zip(items, queries, keys, strict=True):
            if key is None or item.query_type is not None or key in unknown:
                continue
            stored = found.get(key)
            if stored is None or stored.query_type is None or (
                    stored.classified_by is not None and stored.classified_by not in self.current):
                unknown[key] = query
        return unknown

    async def _classify(self, items: Sequence[RawItem], queries: list[str], keys: list[str | None],
                        found: dict[str, QueryRecord | None]) -> dict[str, QueryRecord]:
        """Type the untyped queries and write the answers back to the store."""
        assert self.classifier is not None
        unknown = self._untyped(items, queries, keys, found)
        if not unknown:
            return {}
        try:
            labels = await self.classifier.label(list(unknown.values()))
        except Exception:  # the classifier is an aid: scoring goes on with the default type
            log.exception("query-type classifier failed on %d queries; using the default type", len(unknown))
            return {}
        answers = {key: QueryRecord(label.query_type, (found.get(key) or QueryRecord()).reference,
                                    label.classified_by, label.open_probability)
                   for key, label in zip(unknown, labels, strict=True)}
        await self.store.put_many([(key, unknown[key], record) for key, record in answers.items()])
        return answers

    def _resolve_one(self, item: RawItem, query: str, stored: QueryRecord | None) -> ResolvedItem:
        stored = stored or QueryRecord()
        if item.query_type is not None:
            query_type, type_source = item.query_type, "request"
        elif stored.query_type is not None:
            query_type, type_source = stored.query_type, "classifier" if stored.classified_by else "cache"
        else:
            query_type, type_source = self.default_query_type, "default"
        reference, reference_source = clean_reference(item.reference), "request"
        if reference is None:
            reference, reference_source = stored.reference, "cache"
        return ResolvedItem(
            query=query,
            response=self._clean(item.response, item.stop_strings),
            reference=reference,
            query_type=query_type,
            query_type_source=type_source,
            reference_source=reference_source if reference is not None else None,
            open_probability=stored.open_probability if type_source == "classifier" else None,
        )

    def _clean(self, response: str, extra_stop_strings: tuple[str, ...]) -> str:
        if self.stop_strings is None:
            return response.strip()
        return clean_response(response, self.stop_strings + extra_stop_strings)
