"""Query types and every spelling of them the spec accepts."""

from __future__ import annotations

from typing import Literal

QueryType = Literal["open", "closed"]

_SPELLINGS: dict[str, QueryType] = {
    "open": "open",
    "oe": "open",
    "open-ended": "open",
    "openended": "open",
    "closed": "closed",
    "ce": "closed",
    "closed-ended": "closed",
    "closedended": "closed",
    "constrained": "closed",
}


def parse_query_type(value: str) -> QueryType:
    """Map any accepted spelling (case-insensitive, `_` or space as `-`) to open/closed."""
    key = value.strip().lower().replace("_", "-").replace(" ", "-")
    try:
        return _SPELLINGS[key]
    except KeyError:
        accepted = ", ".join(sorted(_SPELLINGS))
        raise ValueError(f"unknown query type {value!r}; accepted: {accepted}") from None
