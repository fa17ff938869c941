"""What the admission middleware reads of a `/reward` body before the route validates it: the
items a valid body holds, from a C-level JSON parse (orjson) and the route's own shape, limits
and query types, at a fraction of the cost of validation. A refusal then costs the parse and the
count; the route still validates every admitted body with its strict model."""

from __future__ import annotations

from typing import Any

from r3_service.engine.resolve import RawItem
from r3_service.rule.querytypes import parse_query_type
from r3_service.settings import Settings


def _text(value: Any, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit


def reward_items(document: Any, settings: Settings) -> tuple[list[RawItem], str | None] | None:
    """(items, backend name) of a parsed `/reward` body; None where the route answers instead:
    a field missing or of the wrong type, an unknown query type, a limit passed (413)."""
    if not isinstance(document, dict):
        return None
    items, backend = document.get("items"), document.get("backend")
    if not isinstance(items, list) or len(items) > settings.max_items or not (backend is None or
                                                                            isinstance(backend, str)):
        return None
    limit, found = settings.max_text_chars, []
    for item in items:
        if not isinstance(item, dict):
            return None
        query, response, reference, query_type = (item.get("query"), item.get("response"),
                                                  item.get("reference"), item.get("query_type"))
        if not (_text(query, limit) and _text(response, limit)):
            return None
        if reference is not None and not _text(reference, limit):
            return None
        if query_type is not None:
            if not isinstance(query_type, str):
                return None
            try:
                query_type = parse_query_type(query_type)
            except ValueError:
                return None
        found.append(RawItem(query, response, reference, query_type))
    return found, backend
