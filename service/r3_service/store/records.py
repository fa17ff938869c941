"""How the store keys a query, and a record's form in a Redis hash."""

from __future__ import annotations

import hashlib
import math

from r3_service.rule.datasets import CLASSIFIED_BY_FIELD, OPEN_PROBABILITY_FIELD, QueryRecord
from r3_service.rule.features import collapse_whitespace
from r3_service.rule.querytypes import parse_query_type
from r3_service.rule.templates import extract_query

KEY_PREFIX = "r3:q:"
# The hash fields the service reads, in `fields_to_record`'s order.
READ_FIELDS = ("query_type", "reference", CLASSIFIED_BY_FIELD, OPEN_PROBABILITY_FIELD)


def query_key(query: str) -> str:
    """Store key of a query as sent: a hash of it with its chat template removed and whitespace
    collapsed."""
    return text_key(extract_query(query))


def text_key(user_text: str) -> str:
    """Store key of a query whose chat template is already removed (`extract_query`)."""
    return KEY_PREFIX + hashlib.sha256(collapse_whitespace(user_text).encode("utf-8")).hexdigest()


def record_to_fields(query: str, record: QueryRecord) -> dict[str, str]:
    fields = {"query": query}
    if record.query_type is not None:
        fields["query_type"] = record.query_type
    if record.reference is not None:
        fields["reference"] = record.reference
    if record.classified_by is not None:
        fields[CLASSIFIED_BY_FIELD] = record.classified_by
    if record.open_probability is not None:
        # repr round-trips the float exactly: a rescored item blends with the very same weight.
        fields[OPEN_PROBABILITY_FIELD] = repr(record.open_probability)
    return fields


def stale_fields(record: QueryRecord) -> list[str]:
    """Fields to delete when `record` is written over an older one (HSET merges): an authoritative
    type drops the classifier id it replaces, a hard answer the probability; a record without a
    type (a reference only) leaves the stored type, its id and its probability alone."""
    if record.query_type is None:
        return []
    stale = [CLASSIFIED_BY_FIELD] if record.classified_by is None else []
    return stale + ([OPEN_PROBABILITY_FIELD] if record.open_probability is None else [])


def fields_to_record(query_type: str | None, reference: str | None, classified_by: str | None = None,
                     open_probability: str | None = None) -> QueryRecord | None:
    if query_type is None and reference is None:
        return None
    try:
        parsed = parse_query_type(query_type) if query_type is not None else None
    except ValueError:
        parsed = None  # a foreign value in our key space: ignore it rather than fail scoring
    classified_by = classified_by if parsed is not None else None
    probability = parse_probability(open_probability) if classified_by is not None else None
    return QueryRecord(parsed, reference, classified_by, probability)


def parse_probability(text: str | None) -> float | None:
    """A stored p(open), or None for a missing or foreign value (never fail scoring over it)."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None
