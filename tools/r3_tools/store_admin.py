"""The store's admin commands: `r3-qtypes load PATH` bulk-loads query types and references into
Redis; `r3-qtypes classify PATH` does the same after a classifier has typed the records that have
no type."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import redis

from r3_service.rule.datasets import CLASSIFIED_BY_FIELD, OPEN_PROBABILITY_FIELD, QueryRecord, read_records
from r3_service.rule.templates import extract_query
from r3_service.settings import DEFAULT_MODEL
from r3_service.store.records import query_key, record_to_fields, stale_fields
from r3_service.store.stores import redact_url

if TYPE_CHECKING:
    from r3_service.qtype.base import Label, QueryTypeClassifier

BATCH = 1000
Records = list[tuple[str, QueryRecord]]


def write_records(client: redis.Redis, records: list[tuple[str, QueryRecord]]) -> int:
    """HSET every record in pipelined batches; returns how many distinct keys were written.
    An authoritative type replaces a classifier's, so its `classified_by` goes too, and a hard
    answer drops the probability of the answer it replaces."""
    keys = set()
    for start in range(0, len(records), BATCH):
        with client.pipeline(transaction=False) as pipe:
            for query, record in records[start : start + BATCH]:
                key = query_key(query)
                keys.add(key)
                pipe.hset(key, mapping=record_to_fields(query, record))
                if stale := stale_fields(record):
                    pipe.hdel(key, *stale)
            pipe.execute()
    return len(keys)


def summary(records: list[tuple[str, QueryRecord]], distinct: int, rejected: int) -> str:
    types = Counter(record.query_type or "unset" for _, record in records)
    references = sum(record.reference is not None for _, record in records)
    return (f"loaded {len(records)} records ({distinct} distinct queries): "
            f"open {types['open']}, closed {types['closed']}, type unset {types['unset']}, "
            f"with reference {references}; rejected {rejected}")


def load(path: Path, redis_url: str) -> int:
    records, errors = read_records(path)
    for error in errors:
        print(f"{path}: {error}", file=sys.stderr)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        distinct = write_records(client, records)
    except redis.RedisError as error:
        print(f"error: cannot write to Redis at {redact_url(redis_url)}: {error}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(summary(records, distinct, len(errors)))
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------------
# classify


def already_labelled(client: redis.Redis | None, keys: list[str], classifier_id: str) -> set[str]:
    """Keys whose store record has a type from a dataset or from this very classifier version."""
    if client is None:
        return set()
    rows = []
    for start in range(0, len(keys), BATCH):
        with client.pipeline(transaction=False) as pipe:
            for key in keys[start : start + BATCH]:
                pipe.hmget(key, "query_type", CLASSIFIED_BY_FIELD)
            rows += pipe.execute()
    return {key for key, (query_type, by) in zip(keys, rows, strict=True)
            if query_type is not None and by in (None, classifier_id.encode())}


async def label_all(classifier: QueryTypeClassifier, queries: Sequence[str], batch_size: int) -> list[Label]:
    """Labels of `queries` in batches, with a progress line on stderr."""
    labels: list[Label] = []
    started = time.perf_counter()
    for start in range(0, len(queries), batch_size):
        labels += await classifier.label(queries[start : start + batch_size])
        rate = len(labels) / max(time.perf_counter() - started, 1e-9)
        end = "\r" if sys.stderr.isatty() and len(labels) < len(queries) else "\n"
        print(f"classified {len(labels)}/{len(queries)} ({len(labels) / len(queries):.0%}), "
              f"{rate:.0f} queries/s", end=end, file=sys.stderr, flush=True)
    return labels


async def classify_records(records: list[tuple[str, QueryRecord]], classifier: QueryTypeClassifier,
                           client: redis.Redis | None, batch_size: int) -> tuple[Records, int, int]:
    """(records with the classifier's types filled in, queries classified, queries skipped because
    the store already has their type)."""
    pending = {query_key(q): extract_query(q) for q, record in records if record.query_type is None}
    skip = already_labelled(client, list(pending), classifier.id)
    todo = {key: query for key, query in pending.items() if key not in skip}
    labels = dict(zip(todo, await label_all(classifier, list(todo.values()), batch_size), strict=True))
    typed = []
    for query, record in records:
        label = labels.get(query_key(query)) if record.query_type is None else None
        if label is not None:
            record = replace(record, query_type=label.query_type, classified_by=label.classified_by,
                             open_probability=label.open_probability)
        typed.append((query, record))
    return typed, len(todo), len(skip)


async def classify_with(args: argparse.Namespace, records: Records,
                        client: redis.Redis | None) -> tuple[Records, int, int, str]:
    """`classify_records` with the classifier the arguments name, built and closed in this loop."""
    from r3_service.qtype import build_classifier  # torch: only here
    from r3_tools.heads import lazy_embedder

    classifier = build_classifier(args.kind, embed_for=lazy_embedder(args.model, args.device),
                                  model_name=args.model, llm_url=args.llm_url, llm_model=args.llm_model,
                                  llm_api_key=args.llm_api_key, timeout_s=args.timeout_s)
    try:
        return (*await classify_records(records, classifier, client, args.batch_size), classifier.id)
    finally:
        await classifier.aclose()


def write_jsonl(path: Path, records: Records) -> None:
    """Records as `r3-qtypes load` and R3_QTYPES_FILE read them back, classifier ids included."""
    with path.open("w", encoding="utf-8") as out:
        for query, record in records:
            row = {"query": query, "query_type": record.query_type, "reference": record.reference,
                   CLASSIFIED_BY_FIELD: record.classified_by, OPEN_PROBABILITY_FIELD: record.open_probability}
            out.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")


def classify(args: argparse.Namespace) -> int:
    records, errors = read_records(args.path, allow_bare=True)
    for error in errors:
        print(f"{args.path}: {error}", file=sys.stderr)
    client = None
    if args.redis_url:
        client = redis.Redis.from_url(args.redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        typed, classified, skipped, classifier_id = asyncio.run(classify_with(args, records, client))
        distinct = len({query_key(query) for query, _ in typed})
        if client is not None:
            write_records(client, typed)
    except redis.RedisError as error:
        print(f"error: Redis at {redact_url(args.redis_url)}: {error}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
    if args.out is not None:
        write_jsonl(args.out, typed)
    print(f"classified {classified} queries with {classifier_id}; "
          f"skipped {skipped} already typed in the store")
    print(summary(typed, distinct, len(errors)))
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`load` and `classify` on the `r3-qtypes` parser."""
    loader = commands.add_parser("load", help="load a JSON array or JSONL of records into Redis")
    classifier = commands.add_parser("classify", help="type the records without a query type with a "
                                     "classifier, then load them all into Redis and/or a JSONL file")
    for command in (loader, classifier):
        command.add_argument("path", type=Path)
        command.add_argument("--redis-url", default=os.environ.get("R3_REDIS_URL"),
                             help="default: $R3_REDIS_URL")
    classifier.add_argument("--out", type=Path, help="also write the typed records here (JSONL)")
    classifier.add_argument("--kind", choices=("learned", "llm", "rules"), default="learned")
    classifier.add_argument("--model", default=os.environ.get("R3_MODEL", DEFAULT_MODEL),
                            help="embedding model of the learned kind (default: $R3_MODEL or MiniLM)")
    classifier.add_argument("--device", default="cpu")
    classifier.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.path.is_file():
        parser.error(f"no such file: {args.path}")
    if args.command == "classify":
        if not (args.redis_url or args.out):
            parser.error("nowhere to write: pass --redis-url (or set R3_REDIS_URL) and/or --out")
        if args.kind == "llm" and not (args.llm_url and args.llm_model):
            parser.error("--kind llm needs --llm-url and --llm-model")
        return classify(args)
    if not args.redis_url:
        parser.error("no Redis URL: pass --redis-url or set R3_REDIS_URL "
                     "(for the in-process store, start the service with R3_QTYPES_FILE=PATH)")
    return load(args.path, args.redis_url)
