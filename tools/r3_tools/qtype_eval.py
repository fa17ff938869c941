"""`r3-qtypes train|eval`: train the packaged query-type head, and measure each classifier on
labelled queries (accuracy against the labels, per-class precision/recall, confusion matrix, speed),
as written or rewritten (`--variants`); `eval --strict` cross-validates the training recipe on
strict splits (`qtype_validate`).

Train and eval split a file the same way, by the hash of each normalised query: the 20% held out
are never trained on, whichever file or order they come in; a file the head was not trained on is
measured whole.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from r3_service.models.embedding import POOLINGS, EmbeddingModel
from r3_service.qtype import KINDS, build_classifier
from r3_service.qtype.base import QueryTypeClassifier
from r3_service.qtype.learned import HEAD_PATH, LinearHead
from r3_service.rule.datasets import read_records
from r3_service.rule.querytypes import QueryType
from r3_service.rule.templates import extract_query
from r3_service.settings import DEFAULT_MODEL
from r3_service.store.records import KEY_PREFIX, query_key
from r3_tools.heads import lazy_embedder
from r3_tools.qtype_splits import STRICT_VARIANTS, VARIANTS
from r3_tools.qtype_validate import (
    Recipe,
    TextEmbedder,
    choose_recipe,
    fit_recipe,
    format_strict,
    run_strict,
    write_strict,
)

HELD_OUT_EVERY = 5  # 1 in 5 queries: 20%
DEFAULT_L2 = (0.03, 0.1, 0.3)
TYPES: tuple[QueryType, QueryType] = ("open", "closed")


def held_out(query: str) -> bool:
    """Whether a query belongs to the held-out 20%: decided by its store key, so by its normalised text."""
    return int(query_key(query)[len(KEY_PREFIX):][:8], 16) % HELD_OUT_EVERY == 0


@dataclass(frozen=True)
class Labelled:
    queries: list[str]
    types: list[QueryType]
    references: list[str | None]

    def part(self, held: bool) -> Labelled:
        return self.rows([i for i, query in enumerate(self.queries) if held_out(query) == held])

    def rows(self, indices: list[int]) -> Labelled:
        return Labelled([self.queries[i] for i in indices], [self.types[i] for i in indices],
                        [self.references[i] for i in indices])

    def rewritten(self, variant: str) -> Labelled:
        return Labelled([VARIANTS[variant](query) for query in self.queries], self.types, self.references)

    def targets(self) -> torch.Tensor:
        return torch.tensor([t == "open" for t in self.types], dtype=torch.float32)


def read_labelled(path: Path) -> Labelled:
    """Typed records of a dataset, one per distinct normalised query (the first one wins)."""
    records, errors = read_records(path)
    if errors:
        print(f"{path}: skipped {len(errors)} malformed records (first: {errors[0]})", file=sys.stderr)
    seen: set[str] = set()
    out = Labelled([], [], [])
    for query, record in records:
        key = query_key(query)
        if record.query_type is not None and key not in seen:
            seen.add(key)
            out.queries.append(extract_query(query))
            out.types.append(record.query_type)
            out.references.append(record.reference)
    return out


# ---------------------------------------------------------------------------------------------
# train


def train(args: argparse.Namespace) -> int:
    data = read_labelled(args.data).part(held=False)
    if len(set(data.types)) < 2:
        print(f"error: {args.data}: the training split needs both open and closed labels", file=sys.stderr)
        return 1
    embed = TextEmbedder(EmbeddingModel(args.model, device=args.device))
    targets = data.targets()
    print(f"{len(data.queries)} training queries; grouped {args.folds}-fold cross-validation "
          f"(strict variants: {', '.join(STRICT_VARIANTS)}):")
    recipe, strict, temperature = choose_recipe(data.queries, targets, embed, args.l2 or DEFAULT_L2,
                                                folds=args.folds, min_count=args.min_count,
                                                augment=args.augment, pooling=args.pooling)
    meta = {"data": args.data.name, "data_sha256": file_sha256(args.data),
            "train_queries": len(data.queries), "l2": recipe.l2, "min_count": recipe.min_count,
            "augmented": recipe.augment, "pooling": recipe.pooling, "strict_cv_accuracy": round(strict, 4),
            "cv_folds": args.folds,
            "cv_split": "grouped by leading word", "held_out": f"1 in {HELD_OUT_EVERY} by query key"}
    head = replace(fit_recipe(data.queries, targets, embed, recipe, meta), temperature=temperature)
    head.save(args.out)
    print(f"wrote {args.out} (l2={recipe.l2:g}, temperature {temperature:.3f}, "
          f"{len(head.lexical_weights)} lexical features, version {head.version})")
    return 0


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# eval


@dataclass(frozen=True)
class Report:
    kind: str
    classifier_id: str
    total: int
    correct: int
    confusion: dict[tuple[QueryType, QueryType], int]  # (label, predicted) → count
    speed_queries: int
    speed_s: float
    fallbacks: int | None

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def precision(self, kind: QueryType) -> float:
        predicted = sum(self.confusion[(label, kind)] for label in TYPES)
        return self.confusion[(kind, kind)] / predicted if predicted else float("nan")

    def recall(self, kind: QueryType) -> float:
        actual = sum(self.confusion[(kind, predicted)] for predicted in TYPES)
        return self.confusion[(kind, kind)] / actual if actual else float("nan")

    def row(self) -> list[str]:
        timed = self.speed_queries > 0 and self.speed_s > 0
        rate = f"{self.speed_queries / self.speed_s:,.0f}" if timed else "—"
        per_1000 = f"{1000 * self.speed_s / self.speed_queries:.2f} s" if timed else "—"
        return [self.kind, f"{self.accuracy:.1%}",
                *(f"{self.precision(k):.1%} / {self.recall(k):.1%}" for k in TYPES),
                *(f"{self.confusion[(k, 'open')]} / {self.confusion[(k, 'closed')]}" for k in TYPES),
                rate, per_1000,
                "" if self.fallbacks is None else str(self.fallbacks)]


HEADER = ["kind", "accuracy", "open P / R", "closed P / R", "labelled open → open / closed",
          "labelled closed → open / closed", "queries/s", "1,000 queries", "fallbacks"]


async def evaluate(kind: str, classifier: QueryTypeClassifier, held: Labelled,
                   speed_queries: list[str]) -> Report:
    await classifier.classify(held.queries[:2])  # warm up (first forward pass, connections)
    fallbacks_before = _fallbacks(classifier)
    predicted = await classifier.classify(held.queries)
    fallbacks = _fallbacks(classifier)
    confusion = {(label, guess): 0 for label in TYPES for guess in TYPES}
    for label, guess in zip(held.types, predicted, strict=True):
        confusion[(label, guess)] += 1
    started = time.perf_counter()
    if speed_queries:
        await classifier.classify(speed_queries)
    elapsed = time.perf_counter() - started
    return Report(kind, classifier.id, len(held.queries), confusion[("open", "open")] +
                  confusion[("closed", "closed")], confusion, len(speed_queries), elapsed,
                  None if fallbacks is None else fallbacks - (fallbacks_before or 0))


def _fallbacks(classifier: QueryTypeClassifier) -> int | None:
    stats = getattr(classifier, "stats", None)
    return getattr(stats, "fallbacks", None)


def format_table(reports: list[Report], markdown: bool) -> str:
    rows = [HEADER, *(report.row() for report in reports)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def speed_sample(queries: list[str], count: int) -> list[str]:
    """`count` queries of the file (any split: only timed), cycling when the file has fewer."""
    return [queries[i % len(queries)] for i in range(count)] if queries else []


def eval_rows(args: argparse.Namespace, data: Labelled) -> tuple[Labelled, str]:
    """The rows `eval` measures, and how they were chosen: the head's training file gives only its
    held-out split (the rest was trained on); any other file is unseen, so all of it counts."""
    split = args.split
    if split == "auto":
        trained_on = LinearHead.load(args.head).meta.get("data_sha256") if args.head.is_file() else None
        split = "held-out" if trained_on == file_sha256(args.data) else "all"
    if split == "held-out":
        return data.part(held=True), "held-out split (1 in 5 by query key)"
    return data, "all rows (not the head's training file)" if args.split == "auto" else "all rows"


async def run_eval(args: argparse.Namespace) -> int:
    data = read_labelled(args.data)
    rows, chosen = eval_rows(args, data)
    if not rows.queries:
        print(f"error: {args.data}: no labelled queries in the {chosen}", file=sys.stderr)
        return 1
    kinds = [k for k in KINDS if k != "llm" or args.llm_url] if args.kind == "all" else [args.kind]
    variants = list(VARIANTS) if args.variants else ["as written"]
    embed = lazy_embedder(args.model, args.device)
    reports = []
    for kind in kinds:
        classifier = build_classifier(kind, embed_for=embed, model_name=args.model, head_path=args.head,
                                      llm_url=args.llm_url, llm_model=args.llm_model,
                                      llm_api_key=args.llm_api_key, timeout_s=args.timeout_s)
        try:
            for variant in variants:
                sample = speed_sample(data.queries, args.speed_queries if variant == "as written" else 0)
                name = kind if variant == "as written" else f"{kind}, {variant}"
                reports.append(await evaluate(name, classifier, rows.rewritten(variant), sample))
        finally:
            await classifier.aclose()
    print(f"{args.data.name}: {len(rows.queries)} queries, {chosen} (of {len(data.queries)} labelled); "
          f"speed over {args.speed_queries} queries, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs")
    print(format_table(reports, args.markdown))
    for report in reports:
        if report.kind in KINDS:
            print(f"{report.kind}: {report.classifier_id}")
    return 0


def run_strict_eval(args: argparse.Namespace) -> int:
    """`eval --strict`: cross-validate the training recipe on all labelled rows of the file."""
    data = read_labelled(args.data)
    if args.limit:
        data = data.rows(list(range(min(args.limit, len(data.queries)))))
    if len(set(data.types)) < 2:
        print(f"error: {args.data}: strict validation needs both open and closed labels", file=sys.stderr)
        return 1
    embed = TextEmbedder(EmbeddingModel(args.model, device=args.device))
    responses = {path.stem: read_responses(path, data.queries) for path in args.responses}
    l2 = args.l2[0] if args.l2 else float(str(LinearHead.load().meta.get("l2", DEFAULT_L2[1])))
    report = run_strict(args.data.name, data.queries, data.targets(), data.references, embed,
                        Recipe(l2, args.min_count, args.augment, args.pooling), args.folds, responses)
    if args.out:
        write_strict(report, args.out)
        print(f"wrote {args.out}/strict.md, strict.json and reliability.png", file=sys.stderr)
    print(format_strict(report))
    return 0


def read_responses(path: Path, queries: list[str]) -> list[str]:
    """Responses of a JSONL file of {query|prompt, response} (e.g. a trainer report's
    base-responses.jsonl), aligned to `queries` by store key; "" where the file has none."""
    by_key: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            query = row.get("query") or row.get("prompt") or row.get("input")
            if isinstance(query, str) and isinstance(row.get("response"), str):
                by_key[query_key(query)] = row["response"]
    return [by_key.get(query_key(query), "") for query in queries]


# ---------------------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`train` and `eval` on the `r3-qtypes` parser."""
    for name, helptext in (("train", "train the learned head on the training split"),
                           ("eval", "measure classifiers on labelled queries, or (--strict) "
                                    "cross-validate the training recipe on strict splits")):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("data", type=Path, help="labelled JSON array or JSONL")
        command.add_argument("--model", default=DEFAULT_MODEL, help=f"embedding model ({DEFAULT_MODEL})")
        command.add_argument("--device", default="cpu", help="cpu (default), cuda:N or auto")
        command.add_argument("--folds", type=int, default=5, help="cross-validation folds (train, --strict)")
        command.add_argument("--l2", type=float, nargs="+",
                             help=f"L2 strengths: train picks the best on the strict split (default "
                                  f"{' '.join(map(str, DEFAULT_L2))}); --strict uses the first "
                                  f"(default: the packaged head's)")
        command.add_argument("--min-count", type=int, default=1, help="keep lexical features seen this often")
        command.add_argument("--no-augment", dest="augment", action="store_false",
                             help="train on the rows as written only (no rewritten copies)")
        command.add_argument("--pooling", choices=POOLINGS, default="layers",
                             help="what the head reads: every layer's mean (layers, default) or the "
                                  "sentence embedding (mean)")
    trainer = commands.choices["train"]
    trainer.add_argument("--out", type=Path, default=HEAD_PATH, help="default: the packaged head")
    evaluator = commands.choices["eval"]
    evaluator.add_argument("--kind", choices=[*KINDS, "all"], default="all",
                           help="all: learned, rules, and llm when --llm-url is given")
    evaluator.add_argument("--head", type=Path, default=HEAD_PATH, help="default: the packaged head")
    evaluator.add_argument("--split", choices=("auto", "held-out", "all"), default="auto",
                           help="auto: the held-out 20%% of the head's own training file, else every row")
    evaluator.add_argument("--variants", action="store_true",
                           help="also score each query with its input dropped, inlined, and paraphrased")
    evaluator.add_argument("--speed-queries", type=int, default=1000, help="queries to time (0: skip)")
    evaluator.add_argument("--markdown", action="store_true", help="print a Markdown table")
    evaluator.add_argument("--strict", action="store_true",
                           help="cross-validate the training recipe: random vs grouped-by-leading-word "
                                "folds, every variant, calibration and the soft branch's reward error")
    evaluator.add_argument("--responses", type=Path, nargs="*", default=[],
                           help="--strict: JSONL files of {query, response} to measure the soft branch on")
    evaluator.add_argument("--out", type=Path, help="--strict: write strict.md, strict.json, reliability.png")
    evaluator.add_argument("--limit", type=int, default=0, help="--strict: only the first N labelled queries")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.data.is_file():
        parser.error(f"no such file: {args.data}")
    if args.command == "train":
        return train(args)
    if args.strict:
        return run_strict_eval(args)
    if (args.kind == "llm" or args.llm_url) and not (args.llm_url and args.llm_model):
        parser.error("the llm kind needs --llm-url and --llm-model")
    return asyncio.run(run_eval(args))
