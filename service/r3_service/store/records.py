"""How the store keys a query, and a record's form in a Redis hash."""

from __future__ import annotations

import hashlib

from r3_service.rule.datasets import CLASSIFIED_BY_FIELD, QueryRecord
from r3_service.rule.features import collapse_whitespace
from r3_service.rule.querytypes import parse_query_type
from r3_service.rule.templates import extract_query

KEY_PREFIX = "r3:q:"


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
    return fields


def fields_to_record(query_type: str | None, reference: str | None,
                     classified_by: str | None = None) -> QueryRecord | None:
    if query_type is None and reference is None:
        return None
    try:
        parsed = parse_query_type(query_type) if query_type is not None else None
    except ValueError:
        parsed = None  # a foreign value in our key space: ignore it rather than fail scoring
    return QueryRecord(parsed, reference, classified_by if parsed is not None else None)
