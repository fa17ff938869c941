"""`r3-qtypes load PATH`: bulk-load query types and references into Redis."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import redis

from r3_service.store.records import QueryRecord, query_key, read_records
from r3_service.store.stores import record_to_fields, redact_url

BATCH = 1000


def write_records(client: redis.Redis, records: list[tuple[str, QueryRecord]]) -> int:
    """HSET every record in pipelined batches; returns how many distinct keys were written."""
    keys = set()
    for start in range(0, len(records), BATCH):
        with client.pipeline(transaction=False) as pipe:
            for query, record in records[start : start + BATCH]:
                key = query_key(query)
                keys.add(key)
                pipe.hset(key, mapping=record_to_fields(query, record))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r3-qtypes", description="Manage the R3 query-type store.")
    commands = parser.add_subparsers(dest="command", required=True)
    loader = commands.add_parser("load", help="load a JSON array or JSONL of records into Redis")
    loader.add_argument("path", type=Path)
    loader.add_argument("--redis-url", default=os.environ.get("R3_REDIS_URL"),
                        help="default: $R3_REDIS_URL")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("no Redis URL: pass --redis-url or set R3_REDIS_URL "
                     "(for the in-process store, start the service with R3_QTYPES_FILE=PATH)")
    if not args.path.is_file():
        parser.error(f"no such file: {args.path}")
    return load(args.path, args.redis_url)


if __name__ == "__main__":
    sys.exit(main())
