"""What the admission middleware reads of a `/reward` body before the route validates it: the
distinct texts a valid body asks to embed (`admission.demand`), from a C-level JSON parse (orjson)
and the route's own shape, limits and query types, at a fraction of the cost of validation. A
refusal then costs the parse and the count; the route still validates every admitted body with
its strict model."""

from __future__ import annotations

from typing import Any

from r3_service.engine.admission import item_texts
from r3_service.rule.querytypes import parse_query_type
from r3_service.settings import Settings


def reward_demand(document: Any, settings: Settings) -> tuple[set[str], str | None] | None:
    """(distinct texts, backend name) of a parsed `/reward` body; None where the route answers
    instead: a field missing or of the wrong type, an unknown query type, a limit passed (413)."""
    if not isinstance(document, dict):
        return None
    items, backend = document.get("items"), document.get("backend")
    if not isinstance(items, list) or len(items) > settings.max_items or not (backend is None or
                                                                            isinstance(backend, str)):
        return None
    limit, texts = settings.max_text_chars, set()
    for item in items:
        if type(item) is not dict:
            return None
        query, response = item.get("query"), item.get("response")
        reference, query_type = item.get("reference"), item.get("query_type")
        if type(query) is not str or type(response) is not str or (
                reference is not None and type(reference) is not str):
            return None
        if len(query) > limit or len(response) > limit or (reference is not None and len(reference) > limit):
            return None
        if query_type is not None and query_type not in ("open", "closed"):
            if type(query_type) is not str:
                return None
            try:
                query_type = parse_query_type(query_type)
            except ValueError:
                return None
        texts.update(item_texts(query, response, reference, query_type))
    return texts, backend
