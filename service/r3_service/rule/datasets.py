"""Datasets of queries: what one says of a query (its type, its reference answer), read from a
JSON array or JSONL file, with every problem reported by line. Used by the store's loader, the
service's start-up preload, the query-type tools and the trainer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from r3_service.rule.querytypes import QueryType, parse_query_type

QUERY_FIELDS = ("input", "instruction", "query")
REFERENCE_FIELDS = ("output", "reference")
QUERY_TYPE_FIELDS = ("qtype", "query_type")
CLASSIFIED_BY_FIELD = "classified_by"
OPEN_PROBABILITY_FIELD = "open_probability"


@dataclass(frozen=True)
class QueryRecord:
    query_type: QueryType | None = None
    reference: str | None = None
    # `name@version` of the classifier that gave query_type; None: an authoritative label (a dataset's)
    classified_by: str | None = None
    # That classifier's p(open), when it gives one; only ever set together with classified_by.
    open_probability: float | None = None


def clean_reference(reference: str | None) -> str | None:
    """An empty or whitespace-only reference counts as no reference."""
    return reference if reference is not None and reference.strip() else None


class RecordError(ValueError):
    """A malformed record; the message names the line it starts on."""


def _first_field(record: dict, names: tuple[str, ...]) -> tuple[str, object] | None:
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return None


def parse_record(record: object, line: int, *, allow_bare: bool = False) -> tuple[str, QueryRecord]:
    """(query, record) from one dataset record, or RecordError naming the line and the problem;
    `allow_bare` accepts a query with nothing else (for `r3-qtypes classify`)."""
    if not isinstance(record, dict):
        raise RecordError(f"line {line}: expected a JSON object, got {type(record).__name__}")
    found = _first_field(record, QUERY_FIELDS)
    if found is None or not isinstance(found[1], str) or not found[1].strip():
        raise RecordError(f"line {line}: needs a non-empty string in one of {', '.join(QUERY_FIELDS)}")
    query = found[1]
    reference = None
    found = _first_field(record, REFERENCE_FIELDS)
    if found is not None:
        if not isinstance(found[1], str):
            raise RecordError(f"line {line}: {found[0]} must be a string")
        reference = clean_reference(found[1])
    query_type = None
    found = _first_field(record, QUERY_TYPE_FIELDS)
    if found is not None:
        try:
            query_type = parse_query_type(str(found[1]))
        except ValueError as error:
            raise RecordError(f"line {line}: {found[0]}: {error}") from None
    if query_type is None and reference is None and not allow_bare:
        raise RecordError(f"line {line}: nothing to store: no query type ({', '.join(QUERY_TYPE_FIELDS)})"
                          f" and no reference ({', '.join(REFERENCE_FIELDS)})")
    classified_by = record.get(CLASSIFIED_BY_FIELD)
    if classified_by is not None and not isinstance(classified_by, str):
        raise RecordError(f"line {line}: {CLASSIFIED_BY_FIELD} must be a string")
    if query_type is None:
        classified_by = None
    probability = _open_probability(record.get(OPEN_PROBABILITY_FIELD), line)
    return query, QueryRecord(query_type, reference, classified_by,
                              probability if classified_by is not None else None)


def _open_probability(value: object, line: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise RecordError(f"line {line}: {OPEN_PROBABILITY_FIELD} must be a number in [0, 1]")
    return float(value)


def iter_json_values(text: str) -> Iterator[tuple[int, object | Exception]]:
    """(line, value or decode error) for each element of a JSON array, or each line of JSONL."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if not stripped.startswith("["):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, error
        return
    position = text.index("[") + 1
    while True:
        position = _skip(text, position)
        if position >= len(text):
            yield text.count("\n", 0, position) + 1, ValueError("unterminated JSON array")
            return
        if text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            yield line, error
            return  # the rest of an array cannot be located reliably after a syntax error
        yield line, value
        position = _skip(text, position)
        if position < len(text) and text[position] == ",":
            position += 1


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def read_records(path: Path, *, allow_bare: bool = False) -> tuple[list[tuple[str, QueryRecord]], list[str]]:
    """(valid records, error messages) from a JSON array or JSONL file."""
    records: list[tuple[str, QueryRecord]] = []
    errors: list[str] = []
    for line, value in iter_json_values(path.read_text(encoding="utf-8")):
        if isinstance(value, Exception):
            errors.append(f"line {line}: invalid JSON: {value}")
            continue
        try:
            records.append(parse_record(value, line, allow_bare=allow_bare))
        except RecordError as error:
            errors.append(str(error))
    return records, errors
