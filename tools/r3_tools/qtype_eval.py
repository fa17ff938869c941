"""`r3-qtypes train|eval`: train the packaged query-type head, and measure each classifier on held-out
queries of a labelled dataset (accuracy against its labels, per-class precision/recall, confusion
matrix, speed).

Train and eval split a file the same way, by the hash of each normalised query: the 20% held out
are never trained on, whichever file or order they come in.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r3_service.models.embedding import EmbeddingModel
from r3_service.qtype import KINDS, build_classifier
from r3_service.qtype.base import QueryTypeClassifier
from r3_service.qtype.learned import HEAD_PATH
from r3_service.rule.datasets import read_records
from r3_service.rule.querytypes import QueryType
from r3_service.rule.templates import extract_query, normalise_query
from r3_service.settings import DEFAULT_MODEL
from r3_service.store.records import KEY_PREFIX, query_key
from r3_tools.heads import fit_head, lazy_embedder

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

    def part(self, held: bool) -> Labelled:
        rows = [(q, t) for q, t in zip(self.queries, self.types, strict=True) if held_out(q) == held]
        return Labelled([q for q, _ in rows], [t for _, t in rows])

    def targets(self) -> torch.Tensor:
        return torch.tensor([t == "open" for t in self.types], dtype=torch.float32)


def read_labelled(path: Path) -> Labelled:
    """Typed records of a dataset, one per distinct normalised query (the first one wins)."""
    records, errors = read_records(path)
    if errors:
        print(f"{path}: skipped {len(errors)} malformed records (first: {errors[0]})", file=sys.stderr)
    seen: set[str] = set()
    queries: list[str] = []
    types: list[QueryType] = []
    for query, record in records:
        key = query_key(query)
        if record.query_type is not None and key not in seen:
            seen.add(key)
            queries.append(extract_query(query))
            types.append(record.query_type)
    return Labelled(queries, types)


# ---------------------------------------------------------------------------------------------
# train


def embed_queries(model: EmbeddingModel, queries: list[str]) -> torch.Tensor:
    return model.embed([normalise_query(query) for query in queries])


def cross_validate(data: Labelled, embeddings: torch.Tensor, *, model: str, l2: float, folds: int,
                   seed: int, min_count: int) -> list[float]:
    """Accuracy on each of `folds` shuffled folds of the training split."""
    order = list(range(len(data.queries)))
    random.Random(seed).shuffle(order)
    targets = data.targets()
    accuracies = []
    for fold in range(folds):
        test = order[fold::folds]
        train = sorted(set(order) - set(test))
        head = fit_head([data.queries[i] for i in train], targets[train], embeddings[train],
                        model=model, l2=l2, min_count=min_count)
        logits = head.logits([normalise_query(data.queries[i]) for i in test], embeddings[test])
        accuracies.append(((logits > 0).float() == targets[test]).float().mean().item())
    return accuracies


def train(args: argparse.Namespace) -> int:
    data = read_labelled(args.data).part(held=False)
    if len(set(data.types)) < 2:
        print(f"error: {args.data}: the training split needs both open and closed labels", file=sys.stderr)
        return 1
    model = EmbeddingModel(args.model, device=args.device)
    started = time.perf_counter()
    embeddings = embed_queries(model, data.queries)
    print(f"embedded {len(data.queries)} training queries in {time.perf_counter() - started:.1f}s")
    best = (args.l2[0], float("nan"))
    if args.folds >= 2:
        print(f"{args.folds}-fold cross-validation on the training split:")
        for l2 in args.l2:
            accuracies = cross_validate(data, embeddings, model=args.model, l2=l2, folds=args.folds,
                                        seed=args.seed, min_count=args.min_count)
            mean = sum(accuracies) / len(accuracies)
            spread = torch.tensor(accuracies).std().item() / math.sqrt(len(accuracies))
            print(f"  l2={l2:g}: accuracy {mean:.4f} ± {spread:.4f}")
            if math.isnan(best[1]) or mean > best[1]:
                best = (l2, mean)
    meta = {"data": args.data.name, "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "train_queries": len(data.queries), "l2": best[0], "min_count": args.min_count,
            "cv_folds": args.folds, "cv_accuracy": round(best[1], 4) if not math.isnan(best[1]) else None,
            "seed": args.seed, "held_out": f"1 in {HELD_OUT_EVERY} by query key"}
    head = fit_head(data.queries, data.targets(), embeddings, model=args.model, l2=best[0],
                    min_count=args.min_count, meta=meta)
    head.save(args.out)
    print(f"wrote {args.out} (l2={best[0]:g}, {len(head.lexical_weights)} lexical features, "
          f"version {head.version})")
    return 0


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
        rate = self.speed_queries / self.speed_s if self.speed_s > 0 else float("nan")
        per_1000 = 1000 * self.speed_s / self.speed_queries if self.speed_queries else float("nan")
        return [self.kind, f"{self.accuracy:.1%}",
                *(f"{self.precision(k):.1%} / {self.recall(k):.1%}" for k in TYPES),
                *(f"{self.confusion[(k, 'open')]} / {self.confusion[(k, 'closed')]}" for k in TYPES),
                f"{rate:,.0f}", f"{per_1000:.2f} s",
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


async def run_eval(args: argparse.Namespace) -> int:
    data = read_labelled(args.data)
    held = data.part(held=True)
    if not held.queries:
        print(f"error: {args.data}: no labelled queries in the held-out split", file=sys.stderr)
        return 1
    kinds = [k for k in KINDS if k != "llm" or args.llm_url] if args.kind == "all" else [args.kind]
    embed = lazy_embedder(args.model, args.device)
    reports = []
    for kind in kinds:
        classifier = build_classifier(kind, embed=embed, model_name=args.model, head_path=args.head,
                                      llm_url=args.llm_url, llm_model=args.llm_model,
                                      llm_api_key=args.llm_api_key, timeout_s=args.timeout_s)
        try:
            sample = speed_sample(data.queries, args.speed_queries)
            reports.append(await evaluate(kind, classifier, held, sample))
        finally:
            await classifier.aclose()
    print(f"{args.data.name}: {len(held.queries)} held-out queries (of {len(data.queries)} labelled); "
          f"speed over {args.speed_queries} queries, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs")
    print(format_table(reports, args.markdown))
    for report in reports:
        print(f"{report.kind}: {report.classifier_id}")
    return 0


# ---------------------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`train` and `eval` on the `r3-qtypes` parser."""
    for name, helptext in (("train", "train the learned head on the training split"),
                           ("eval", "measure classifiers on the held-out split")):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("data", type=Path, help="labelled JSON array or JSONL")
        command.add_argument("--model", default=DEFAULT_MODEL, help=f"embedding model ({DEFAULT_MODEL})")
        command.add_argument("--device", default="cpu", help="cpu (default), cuda:N or auto")
    trainer = commands.choices["train"]
    trainer.add_argument("--out", type=Path, default=HEAD_PATH, help="default: the packaged head")
    trainer.add_argument("--seed", type=int, default=0, help="cross-validation fold shuffle")
    trainer.add_argument("--folds", type=int, default=5, help="cross-validation folds; < 2: none")
    trainer.add_argument("--l2", type=float, nargs="+", default=list(DEFAULT_L2),
                         help="L2 strengths to cross-validate (the best one is trained on all rows)")
    trainer.add_argument("--min-count", type=int, default=1, help="keep lexical features seen this often")
    evaluator = commands.choices["eval"]
    evaluator.add_argument("--kind", choices=[*KINDS, "all"], default="all",
                           help="all: learned, rules, and llm when --llm-url is given")
    evaluator.add_argument("--head", type=Path, default=HEAD_PATH, help="default: the packaged head")
    evaluator.add_argument("--speed-queries", type=int, default=1000, help="queries to time (0: skip)")
    evaluator.add_argument("--markdown", action="store_true", help="print a Markdown table")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.data.is_file():
        parser.error(f"no such file: {args.data}")
    if args.command == "train":
        return train(args)
    if (args.kind == "llm" or args.llm_url) and not (args.llm_url and args.llm_model):
        parser.error("the llm kind needs --llm-url and --llm-model")
    return asyncio.run(run_eval(args))
