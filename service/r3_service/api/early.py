"""What the admission middleware reads of a parsed `/reward` body before it validates it: what a
valid body asks of the models (`admission.demand`), from the route's own shape, limits and query
types, at a fraction of the cost of validation. A refusal then costs the parse and the count; an
admitted body is validated with the route's strict model once, after."""

from __future__ import annotations

from typing import Any

from r3_service.engine.admission import Demand, item_texts
from r3_service.rule.querytypes import parse_query_type
from r3_service.settings import Settings


def reward_demand(document: Any, settings: Settings) -> tuple[Demand, str | None] | None:
    """(demand, backend name) of a parsed `/reward` body; None where validation decides instead:
    a field missing or of the wrong type, an unknown query type, a limit passed (413)."""
    if not isinstance(document, dict):
        return None
    items, backend = document.get("items"), document.get("backend")
    if not isinstance(items, list) or len(items) > settings.max_items or not (backend is None or
                                                                            isinstance(backend, str)):
        return None
    limit, found = settings.max_text_chars, Demand()
    pairs = found.pairs
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
        found.update(item_texts(query, response, reference, query_type))
        pairs.add((query, response))
    return found, backend
