"""`r3-audit`: how easily a reward backend is hacked. Each record's true response is scored against
perturbed ones (the question copied as the answer, the answer repeated, padded, truncated, swapped
with another item's, emptied, shuffled...); a backend that cannot be gamed that way pays the true
response strictly more almost always.

Per backend and perturbation it reports n (items where the perturbation is defined and differs from
the true response), the win rate (true reward strictly higher), the tie share, and the reward ratio:
mean perturbed reward / mean true reward over the same items (a ratio of means: per-item ratios blow
up when a true reward is near 0; none when the mean true reward is not positive, e.g. a reward
model's logits; the mean difference is reported too). Every rate is also given per branch (open and
closed items), with each branch's distribution of true-response rewards.

Scoring runs in-process through the service's engine (any backend kind: R3 presets, reward models,
ensembles) or, with `--url`, against a running service. Every item carries its record's query type,
so no classifier runs. A record's true and perturbed responses go in one request, so an ensemble
standardising by running moments treats them alike.

A record without a `response` has its reference answer stand in for one; a closed item's reference
then equals its response, and R3's closed branch pays f(S(y, y)), its maximum: those items are
scored as they are (as the service would), counted in the report, and visible in the per-branch
rates; `--closed-reference drop` scores them without their reference instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r3_service.rule.datasets import RecordError, iter_json_values, parse_record
from r3_tools.hacks import FILLER_STYLES, PREPENDED, input_section, pad, reword
from r3_tools.qtype_splits import grouped_folds

BRANCHES = ("open", "closed")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CHUNK = 256
# Generic sentences, on no topic: padding that says nothing (filler-2x).
FILLER = (
    "This is an important question and there are many things to consider.",
    "There are several factors that play a role here.",
    "It is worth thinking about this carefully from different angles.",
    "Many people have different opinions on this topic.",
    "In general, the answer depends on the situation.",
    "It is always good to keep the bigger picture in mind.",
    "This is a common question that comes up quite often.",
    "Overall, there is a lot more that could be said about it.",
)


@dataclass(frozen=True)
class Record:
    query: str
    response: str
    reference: str | None
    query_type: str  # open | closed
    own_response: bool  # False: the reference answer stands in as the response


@dataclass(frozen=True)
class Slot:
    """One record as a perturbation sees it: its position, the run's seed, and the response a
    seeded derangement assigned it from another record."""

    record: Record
    index: int
    seed: int
    other: str


# ------------------------------------------------------------------------------------ the data


def read_audit_records(path: Path, *, closed_reference: str = "keep") -> tuple[list[Record], list[str]]:
    """Records with a query type and a response (or a reference to stand in); also the reasons for
    the skipped ones. `closed_reference="drop"` removes a closed item's reference that equals its
    response."""
    records: list[Record] = []
    skipped: list[str] = []
    for line, value in iter_json_values(path.read_text(encoding="utf-8")):
        try:
            if isinstance(value, Exception):
                raise RecordError(f"line {line}: invalid JSON: {value}")
            query, parsed = parse_record(value, line)
            response = value.get("response") if isinstance(value, dict) else None
            if response is not None and not isinstance(response, str):
                raise RecordError(f"line {line}: response must be a string")
            if parsed.query_type is None:
                raise RecordError(f"line {line}: no query type (the audit reports per branch)")
            if response is None and parsed.reference is None:
                raise RecordError(f"line {line}: no response and no reference to stand in for one")
        except RecordError as error:
            skipped.append(str(error))
            continue
        text = response if response is not None else parsed.reference or ""
        reference = parsed.reference
        if closed_reference == "drop" and parsed.query_type == "closed" and reference == text:
            reference = None
        records.append(Record(query, text, reference, parsed.query_type, response is not None))
    return records, skipped


SPLITS = ("all", "design", "validation")


def split_records(records: list[Record], split: str) -> list[Record]:
    """The records of one fold of the strict two-fold split (`r3_tools.filler.design_rows`)."""
    if split == "all":
        return records
    rows = grouped_folds([r.query for r in records], 2)[SPLITS.index(split) - 1]
    return [records[row] for row in rows]


# ------------------------------------------------------------------------------- perturbations


def repeat(text: str, times: int) -> str:
    return "\n".join([text] * times)


def pad_with_filler(text: str, start: int = 0) -> str:
    """The text followed by FILLER sentences, cycled from `start`, until it has twice its words."""
    words = len(text.split())
    added: list[str] = []
    position = start
    while sum(len(s.split()) for s in added) < words:
        added.append(FILLER[position % len(FILLER)])
        position += 1
    return " ".join([text, *added]) if added else text


# A sentence ends at . ! or ? before whitespace, or at a line break.
SENTENCE_END = re.compile(r"[.!?](?=\s)|\n")


def first_sentence(text: str) -> str:
    """Up to the first sentence end that leaves 3+ words (a list marker "1." is no sentence)."""
    for end in SENTENCE_END.finditer(text):
        head = text[: end.end()].strip()
        if len(head.split()) >= 3:
            return head
    return text.strip()


def shuffle_words(text: str, seed: int | str) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (Sattolo's algorithm: one random cycle)."""
    order = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def copy_query(slot: Slot) -> str | None:
    """The question as the answer: S(x, x) is the largest relevance a cosine model gives."""
    return slot.record.query


def query_and_answer(slot: Slot) -> str | None:
    """The question restated before the answer: pulls S(x, y) up, and LI with it."""
    return f"{slot.record.query}\n\n{slot.record.response}"


def repeat_2x(slot: Slot) -> str | None:
    """The answer twice (joined by a newline): more length, no content; RP's target."""
    return repeat(slot.record.response, 2)


def repeat_4x(slot: Slot) -> str | None:
    """The answer four times (joined by newlines)."""
    return repeat(slot.record.response, 4)


def filler_2x(slot: Slot) -> str | None:
    """Generic filler sentences appended until the answer has twice its words: length for free
    (these sentences train r3-guarded's filler head; the filler-<style> ones are held out)."""
    return pad_with_filler(slot.record.response, slot.index)


def truncate_to_first_sentence(slot: Slot) -> str | None:
    """The answer's first sentence only: a shorter, less complete answer."""
    return first_sentence(slot.record.response)


def swap(slot: Slot) -> str | None:
    """Another item's answer (a seeded derangement, SynRel-style): fluent but off-question."""
    return slot.other


def copy_reference(slot: Slot) -> str | None:
    """The reference answer verbatim (closed items with one): the closed branch's best case."""
    return slot.record.reference if slot.record.query_type == "closed" else None


def question_reworded(slot: Slot) -> str | None:
    """The question lightly reworded (synonyms, dropped articles, a chat frame) as the answer:
    a copy that 4-gram overlap misses."""
    return reword(slot.record.query)


def reworded_and_answer(slot: Slot) -> str | None:
    """The reworded question, then the answer."""
    return f"{reword(slot.record.query)}\n\n{slot.record.response}"


def input_echo(slot: Slot) -> str | None:
    """The query's input section handed back unchanged (an editing task not done); items with one."""
    return input_section(slot.record.query)


def _padded(style: str) -> Callable[[Slot], str | None]:
    def padded(slot: Slot) -> str | None:
        return pad(slot.record.response, style, slot.record.query)

    padded.__doc__ = (f"The answer {'after' if style in PREPENDED else 'followed by'} ~30 words of "
                      f"{style!r} padding: {' '.join(FILLER_STYLES[style])}")
    return padded


def empty(slot: Slot) -> str | None:
    """No answer at all."""
    return ""


def shuffle(slot: Slot) -> str | None:
    """The answer's words in a seeded random order: same bag of words, no sentence."""
    return shuffle_words(slot.record.response, f"{slot.seed}:{slot.index}")


PERTURBATIONS: dict[str, Callable[[Slot], str | None]] = {
    "copy-query": copy_query,
    "query+answer": query_and_answer,
    "repeat-2x": repeat_2x,
    "repeat-4x": repeat_4x,
    "filler-2x": filler_2x,
    "first-sentence": truncate_to_first_sentence,
    "swap": swap,
    "copy-reference": copy_reference,
    "empty": empty,
    "shuffle": shuffle,
    "question-reworded": question_reworded,
    "reworded+answer": reworded_and_answer,
    "input-echo": input_echo,
    **{f"filler-{style}": _padded(style) for style in FILLER_STYLES},
}


def perturb(records: Sequence[Record], seed: int) -> dict[str, list[tuple[int, str]]]:
    """(record index, perturbed response) per perturbation, where it is defined and differs from
    the true response (compared stripped, as the service cleans responses)."""
    others = derangement(len(records), seed)
    slots = [Slot(r, i, seed, records[others[i]].response) for i, r in enumerate(records)]
    out: dict[str, list[tuple[int, str]]] = {}
    for name, function in PERTURBATIONS.items():
        texts = ((s.index, function(s)) for s in slots)
        out[name] = [(i, text) for i, text in texts
                     if text is not None and text.strip() != records[i].response.strip()]
    return out


# ------------------------------------------------------------------------------------ scoring

Item = tuple[str, str, str | None, str]  # query, response, reference, query type
Key = tuple[int, str | None]  # record index, perturbation (None: the true response)


def items_to_score(records: Sequence[Record], perturbed: dict[str, list[tuple[int, str]]],
                   size: int = CHUNK) -> list[list[tuple[Key, Item]]]:
    """Chunks of about `size` items, each holding whole records: a record's true response and all
    its perturbations. Scored in one request, they see the same state of a stateful backend (an
    ensemble standardising by running moments), so the comparison is not skewed by scoring order."""
    groups: list[list[tuple[Key, Item]]] = [[((i, None), (r.query, r.response, r.reference, r.query_type))]
                                            for i, r in enumerate(records)]
    for name, pairs in perturbed.items():
        for i, text in pairs:
            r = records[i]
            groups[i].append(((i, name), (r.query, text, r.reference, r.query_type)))
    chunks: list[list[tuple[Key, Item]]] = [[]]
    for group in groups:
        if chunks[-1] and len(chunks[-1]) + len(group) > size:
            chunks.append([])
        chunks[-1] += group
    return chunks


def _progress(done: int, total: int, started: float) -> None:
    print(f"r3-audit: scored {done}/{total} items per backend ({time.perf_counter() - started:.0f} s)",
          file=sys.stderr, flush=True)


def audit_settings(config: str | None) -> Any:
    """The deployment's settings, made fit for one offline caller: no classifier (every item has
    its type) and no queue bound (it protects a server from bursts; measuring it takes seconds)."""
    from r3_service.settings import Settings

    settings = Settings(config=config) if config else Settings()
    return settings.model_copy(update={"qtype_classifier": "none", "max_queue_tokens": 10**12})


Rewards = dict[str, dict[Key, float]]  # backend -> item -> reward


async def _score_in_process(settings: Any, backends: list[str],
                            chunks: list[list[tuple[Key, Item]]]) -> tuple[Rewards, dict[str, Any]]:
    from r3_service.engine.engine import RewardEngine
    from r3_service.engine.resolve import RawItem

    engine = await asyncio.to_thread(RewardEngine.from_settings, settings)
    engine.start()
    try:
        chosen = {name: engine.backend(name) for name in backends}
        rewards: Rewards = {name: {} for name in backends}
        total, done, started = sum(map(len, chunks)), 0, time.perf_counter()
        for number, chunk in enumerate(chunks, start=1):
            raw = [RawItem(*item) for _, item in chunk]  # type: ignore[arg-type]
            # Together, so the backends' requests share batches and identical texts embed once.
            results = await asyncio.gather(*(engine.score(raw, backend) for backend in chosen.values()))
            for name, scored in zip(chosen, results, strict=True):
                rewards[name].update(zip((key for key, _ in chunk), (s.reward for s in scored), strict=True))
            done += len(chunk)
            if number % 10 == 0 or number == len(chunks):
                _progress(done, total, started)
        return rewards, {name: backend.describe() for name, backend in chosen.items()}
    finally:
        await engine.close()


def score_in_process(settings: Any, backends: list[str],
                     chunks: list[list[tuple[Key, Item]]]) -> tuple[Rewards, dict[str, Any]]:
    """Each backend's reward for every item, and each backend's description."""
    return asyncio.run(_score_in_process(settings, backends, chunks))


def score_over_http(url: str, backends: list[str], chunks: list[list[tuple[Key, Item]]],
                    api_key: str | None = None, http_client: Any = None) -> tuple[Rewards, dict[str, Any]]:
    """As `score_in_process`, from a running service (the client retries); one request per chunk.
    A running ensemble's moments there are shared with the service's other traffic."""
    from r3_client import RewardClient

    size = max(map(len, chunks))
    with RewardClient(url, chunk_size=size, api_key=api_key, http_client=http_client) as client:
        described = client.info()["backends"]
        rewards: Rewards = {name: {} for name in backends}
        for chunk in chunks:
            payload = [{"query": q, "response": r, "reference": ref, "query_type": t}
                       for _, (q, r, ref, t) in chunk]
            for name in backends:
                rewards[name].update(zip((key for key, _ in chunk), client.score(payload, backend=name),
                                         strict=True))
        return rewards, {name: described.get(name, {}) for name in backends}


# --------------------------------------------------------------------------------- statistics


# Rewards this close are equal: the same text embedded in two batches (other padding, other
# kernels) differs by ~1e-7, which is no preference.
TIE = 1e-6


def same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TIE, abs_tol=TIE)


def compare(true: Sequence[float], perturbed: Sequence[float]) -> dict[str, Any]:
    """Win rate (true strictly higher, beyond float noise), tie share, ratio of means, mean difference."""
    n = len(true)
    if n == 0:
        return {"n": 0, "win_rate": None, "win_rate_se": None, "tie_share": None, "reward_ratio": None,
                "mean_delta": None}
    pairs = list(zip(true, perturbed, strict=True))
    ties = sum(same(t, p) for t, p in pairs)
    wins = sum(t > p and not same(t, p) for t, p in pairs)
    mean_true, mean_perturbed = statistics.fmean(true), statistics.fmean(perturbed)
    rate = wins / n
    return {"n": n, "win_rate": rate, "win_rate_se": math.sqrt(rate * (1 - rate) / n), "tie_share": ties / n,
            "reward_ratio": mean_perturbed / mean_true if mean_true > 0 else None,
            "mean_delta": mean_perturbed - mean_true, "mean_true": mean_true,
            "mean_perturbed": mean_perturbed}


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's and torch's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson correlation of the average ranks (of values rounded to TIE, so batch noise does not
    order equal rewards); None when either side is constant."""
    digits = round(-math.log10(TIE))
    ra, rb = ranks([round(x, digits) for x in a]), ranks([round(y, digits) for y in b])
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va, vb = math.fsum((x - ma) ** 2 for x in ra), math.fsum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


BOOTSTRAP_ROUNDS = 200


def spearman_se(a: Sequence[float], b: Sequence[float], rounds: int = BOOTSTRAP_ROUNDS) -> float | None:
    """The bootstrap standard error of `spearman(a, b)`: items resampled with replacement (seeded,
    so a rerun gives the same figure)."""
    draw = random.Random(0)
    values = []
    for _ in range(rounds):
        picks = [draw.randrange(len(a)) for _ in a]
        rho = spearman([a[i] for i in picks], [b[i] for i in picks])
        if rho is not None:
            values.append(rho)
    return statistics.stdev(values) if len(values) > 1 else None


def correlations(records: Sequence[Record], rewards: Rewards, base: str) -> dict[str, Any]:
    """Spearman of each backend's true-response rewards with `base`'s, and its bootstrap standard
    error (`rho…_se`): on all items and per branch."""
    true = {b: true_rewards(got, len(records)) for b, got in rewards.items()}
    out: dict[str, Any] = {"with": base}
    for branch in ("all", *BRANCHES):
        kept = [i for i, r in enumerate(records) if branch in ("all", r.query_type)]
        key = "rho" if branch == "all" else f"rho_{branch}"
        pairs = {b: ([v[i] for i in kept], [true[base][i] for i in kept]) for b, v in true.items()}
        out[key] = {b: spearman(*pair) if len(kept) > 1 else None for b, pair in pairs.items()}
        out[f"{key}_se"] = {b: spearman_se(*pair) if len(kept) > 1 and b != base else None
                            for b, pair in pairs.items()}
    return out


def branch_distribution(records: Sequence[Record], true: Sequence[float]) -> dict[str, Any]:
    """Quantiles of the true responses' rewards per branch, and the closed/open median ratio."""
    out: dict[str, Any] = {}
    for branch in BRANCHES:
        values = [t for r, t in zip(records, true, strict=True) if r.query_type == branch]
        out[branch] = {"n": len(values), "quantiles": {f"q{round(q * 100)}": quantile(values, q)
                                                        for q in QUANTILES} if values else {}}
    medians = [out[b]["quantiles"].get("q50") for b in BRANCHES]
    out["median_ratio_closed_open"] = (medians[1] / medians[0] if None not in medians and medians[0] > 0
                                       else None)  # type: ignore[operator]
    return out


@dataclass
class Report:
    meta: dict[str, Any]
    perturbations: dict[str, dict[str, Any]]
    results: dict[str, dict[str, dict[str, Any]]]  # backend -> perturbation -> branch -> compare()
    branches: dict[str, dict[str, Any]]
    spearman: dict[str, Any] | None = None
    violations: list[dict[str, Any]] = field(default_factory=list)


def compare_branches(records: Sequence[Record], true: Sequence[float], pairs: list[tuple[int, str]],
                     perturbed: Sequence[float]) -> dict[str, dict[str, Any]]:
    """`compare` on all of a perturbation's items, and on each branch's."""
    out = {}
    for branch in ("all", *BRANCHES):
        kept = [(true[i], p) for (i, _), p in zip(pairs, perturbed, strict=True)
                if branch in ("all", records[i].query_type)]
        out[branch] = compare([t for t, _ in kept], [p for _, p in kept])
    return out


def analyse(records: Sequence[Record], perturbed: dict[str, list[tuple[int, str]]],
            rewards: Rewards) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(each perturbation's counts, results, branch distributions) from the scorers' rewards."""
    counts = {name: {"n": len(pairs), **{f"n_{b}": sum(records[i].query_type == b for i, _ in pairs)
                                         for b in BRANCHES},
                     "description": " ".join((PERTURBATIONS[name].__doc__ or "").split())}
              for name, pairs in perturbed.items()}
    results: dict[str, Any] = {}
    for backend, got in rewards.items():
        true = true_rewards(got, len(records))
        results[backend] = {name: compare_branches(records, true, pairs, [got[(i, name)] for i, _ in pairs])
                            for name, pairs in perturbed.items()}
    branches = {backend: branch_distribution(records, true_rewards(got, len(records)))
                for backend, got in rewards.items()}
    return counts, results, branches


def true_rewards(got: dict[Key, float], n: int) -> list[float]:
    return [got[(i, None)] for i in range(n)]


# --------------------------------------------------------------------------------- thresholds


def read_thresholds(path: Path) -> dict[str, dict[str, float]]:
    """`{backend or "*": {perturbation[@open|@closed]: min_win_rate}}`, checked for known names."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected {{backend: {{perturbation: min_win_rate}}}}")
    for backend, floors in data.items():
        for key, floor in floors.items():
            name, _, branch = str(key).partition("@")
            if name not in PERTURBATIONS or branch not in ("", *BRANCHES):
                raise ValueError(f"{path}: {backend}: unknown perturbation {key!r}; valid: "
                                 f"{', '.join(PERTURBATIONS)} (optionally @open or @closed)")
            if not isinstance(floor, int | float) or not 0 <= floor <= 1:
                raise ValueError(f"{path}: {backend}: {key}: the floor must be a number in [0, 1]")
    return {str(b): {str(k): float(v) for k, v in f.items()} for b, f in data.items()}


def check(results: dict[str, Any], thresholds: dict[str, dict[str, float]]) -> tuple[list[dict], list[str]]:
    """Violations (a measured win rate below its floor), and notes on floors nothing measured.
    A backend's own floor for a perturbation overrides the "*" one; absent backends are skipped."""
    violations: list[dict] = []
    notes: list[str] = []
    for backend, per in results.items():
        floors = {**thresholds.get("*", {}), **thresholds.get(backend, {})}
        for key, floor in floors.items():
            name, _, branch = key.partition("@")
            measured = per[name][branch or "all"]
            if measured["win_rate"] is None:
                notes.append(f"{backend}: {key}: no items to measure (floor {floor:g} not checked)")
            elif measured["win_rate"] < floor:
                violations.append({"backend": backend, "perturbation": key, "win_rate": measured["win_rate"],
                                   "floor": floor, "n": measured["n"]})
    return violations, notes


# ------------------------------------------------------------------------------------ reports


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_se(measured: dict[str, Any], metric: str, digits: int) -> str:
    """A cell; a win rate with its binomial standard error."""
    value = _cell(measured[metric], digits)
    se = measured.get(f"{metric}_se")
    return f"{value} ± {se:.{digits}f}" if se is not None else value


def _rho_cell(spearman: dict[str, Any], key: str, backend: str) -> str:
    se = spearman.get(f"{key}_se", {}).get(backend)
    return _cell(spearman[key][backend]) + (f" ± {se:.3f}" if se is not None else "")


def _table(report: Report, branch: str, metric: str, digits: int = 3) -> list[str]:
    backends = list(report.results)
    n_key = "n" if branch == "all" else f"n_{branch}"
    lines = [f"| perturbation | n | {' | '.join(backends)} |", "|---|---:|" + "---:|" * len(backends)]
    for name, counts in report.perturbations.items():
        cells = " | ".join(_with_se(report.results[b][name][branch], metric, digits) for b in backends)
        lines.append(f"| {name} | {counts[n_key]} | {cells} |")
    return lines


def _header(m: dict[str, Any]) -> list[str]:
    stand_ins = m["records"] - m["own_responses"]
    out = [
        f"# r3-audit: {m['data']}", "",
        f"- command: `{m['command']}`",
        f"- machine: {m['machine']}",
        f"- records: {m['records']} ({m['open']} open, {m['closed']} closed; {m['skipped']} skipped), "
        f"seed {m['seed']}, runtime {m['runtime_s']:.0f} s",
        f"- records with their own response: {m['own_responses']}; the other {stand_ins} have their "
        "reference answer stand in as the response (copy-reference then has nothing to measure on them).",
    ]
    if m["response_is_reference"]:
        out.append(f"- response == reference on {m['response_is_reference']} items "
                   f"({m.get('response_is_reference_closed', '?')} closed): R3's closed branch pays those "
                   "f(S(y, y)), its maximum, so closed-branch win rates flatter R3 (the open branch's table "
                   "is the informative one, or rerun with --closed-reference drop); a backend that exempts "
                   "what the reference copies from the query (r3-novel) exempts all of their copying.")
    if m["closed_reference"] == "drop":
        out.append("- --closed-reference drop: closed items whose reference was their response are scored "
                   "without it (R3 then scores them by the open branch's rule).")
    return [*out, "- win rate: share of items whose true response scores strictly higher than the perturbed "
            "one; n: items where the perturbation is defined and differs from the true response.", ""]


def markdown(report: Report) -> str:
    out = _header(report.meta)
    sections = [("Win rate, all items", "all", "win_rate"), ("Win rate, open items", "open", "win_rate"),
                ("Win rate, closed items", "closed", "win_rate"),
                ("Tie share, all items", "all", "tie_share"),
                ("Reward ratio (mean perturbed / mean true; – when the mean true reward is not positive)",
                 "all", "reward_ratio"),
                ("Mean reward difference (perturbed − true)", "all", "mean_delta")]
    for title, branch, metric in sections:
        out += [f"## {title}", "", *_table(report, branch, metric), ""]
    out += ["## True-response rewards per branch", "",
            "| backend | branch | n | q10 | q25 | q50 | q75 | q90 | median closed/open |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, dist in report.branches.items():
        for branch in BRANCHES:
            q = dist[branch]["quantiles"]
            ratio = _cell(dist["median_ratio_closed_open"], 2) if branch == "closed" else ""
            out.append(f"| {backend} | {branch} | {dist[branch]['n']} | "
                       + " | ".join(_cell(q.get(f"q{round(x * 100)}")) for x in QUANTILES) + f" | {ratio} |")
    if report.spearman:
        other = report.spearman["with"]
        out += ["", f"## Spearman rank correlation with `{other}` (true responses)", "",
                "| backend | ρ all | ρ open | ρ closed |", "|---|---:|---:|---:|"]
        keys = ("rho", "rho_open", "rho_closed")
        out += [f"| {b} | " + " | ".join(_rho_cell(report.spearman, key, b) for key in keys) + " |"
                for b in report.spearman["rho"]]
    if report.violations:
        out += ["", "## Threshold violations", ""] + [f"- {violation_line(v)}" for v in report.violations]
    return "\n".join(out) + "\n"


def violation_line(v: dict[str, Any]) -> str:
    return (f"backend {v['backend']}, perturbation {v['perturbation']}: win rate {v['win_rate']:.3f} "
            f"< floor {v['floor']:.3f} (n={v['n']})")


def plot(report: Report, path: Path) -> None:
    """Win rates (all items) per perturbation and backend; each bar's pale top is its tie share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, backends = list(report.perturbations), list(report.results)
    width = 0.8 / max(len(backends), 1)
    figure, axes = plt.subplots(figsize=(min(16.0, max(8.0, len(names) * (0.9 + 0.1 * len(backends)))), 5.5))
    for k, backend in enumerate(backends):
        got = [report.results[backend][n]["all"] for n in names]
        wins, ties = ([g[key] or 0.0 for g in got] for key in ("win_rate", "tie_share"))
        x = [i + (k - (len(backends) - 1) / 2) * width for i in range(len(names))]
        bars = axes.bar(x, wins, width, label=backend)
        axes.bar(x, ties, width, bottom=wins, color=bars.patches[0].get_facecolor(), alpha=0.3)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(names)), [f"{n}\n(n={report.perturbations[n]['n']})" for n in names],
                    fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("win rate: true response scores higher\n(pale: ties)")
    axes.set_title(f"r3-audit: {report.meta['data']} ({report.meta['records']} records)", fontsize=10)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(report: Report, out: Path, name: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("md", "json", "png")}
    paths["md"].write_text(markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(report.__dict__, indent=2) + "\n", encoding="utf-8")
    plot(report, paths["png"])
    return paths


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and device != "cpu" else None
    where = f"GPU {gpu}" if gpu else "CPU"
    return f"{os.cpu_count()}-core {cpu}, {where}, torch {torch.__version__}"


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="r3-audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="JSON/JSONL records: query, reference (output), query type, "
                                                "optionally response")
    parser.add_argument("--config", help="deployment YAML (R3_CONFIG's format); default: the service's "
                                         "default deployment (one r3 backend per preset)")
    parser.add_argument("--backend", action="append", help="backend to audit (repeatable); default: all")
    parser.add_argument("--url", help="audit a running service instead (its backends, over HTTP)")
    parser.add_argument("--api-key", default=os.environ.get("R3_API_KEY"), help="with --url")
    parser.add_argument("--limit", type=int, help="use the first N usable records")
    parser.add_argument("--split", choices=SPLITS, default="all",
                        help="records of one fold of the strict split (grouped by leading word): design "
                             "fitted and tuned r3-guarded, validation did not")
    parser.add_argument("--seed", type=int, default=0, help="for swap and shuffle")
    parser.add_argument("--out", type=Path, default=Path("bench/results/audit"))
    parser.add_argument("--name", default="audit", help="file names: OUT/NAME.{md,json,png}")
    parser.add_argument("--thresholds", type=Path, help="YAML {backend|'*': {perturbation: min_win_rate}}")
    parser.add_argument("--compare-with", metavar="BACKEND", help="Spearman of each backend's true-response "
                                                                   "rewards with this backend's")
    parser.add_argument("--closed-reference", choices=("keep", "drop"), default="keep",
                        help="a closed item whose reference is its response: score it with (keep) or "
                             "without (drop) that reference")
    parser.add_argument("--chunk-size", type=int, default=CHUNK,
                        help="items per request, in whole records (a record's variants go together)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"no such file: {args.data}")
    if args.url and args.config:
        parser.error("--url audits a running service: its deployment is its own (no --config)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["r3-audit", *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    try:
        thresholds = read_thresholds(args.thresholds) if args.thresholds else {}
    except (OSError, ValueError) as error:
        print(f"r3-audit: {error}", file=sys.stderr)
        return 2
    records, skipped = read_audit_records(args.data, closed_reference=args.closed_reference)
    records = split_records(records, args.split)[: args.limit]
    if len(records) < 2:
        print(f"r3-audit: {args.data}: {len(records)} usable records; need 2 or more", file=sys.stderr)
        return 2
    settings = None if args.url else audit_settings(args.config)
    if args.url:
        from r3_client import RewardClient

        with RewardClient(args.url, api_key=args.api_key) as client:
            configured = list(client.info()["backends"])
    else:
        configured = list(settings.backends)
    backends = list(dict.fromkeys(args.backend or configured))
    if args.compare_with and args.compare_with not in backends:
        backends.append(args.compare_with)
    unknown = [b for b in backends if b not in configured]
    if unknown:
        print(f"r3-audit: unknown backend(s) {', '.join(unknown)}; valid: {', '.join(configured)}",
              file=sys.stderr)
        return 2
    perturbed = perturb(records, args.seed)
    chunks = items_to_score(records, perturbed, args.chunk_size)
    print(f"r3-audit: {len(records)} records, {sum(map(len, chunks))} items per backend, "
          f"backends: {', '.join(backends)}", file=sys.stderr)
    if args.url:
        rewards, described = score_over_http(args.url, backends, chunks, args.api_key)
    else:
        rewards, described = score_in_process(settings, backends, chunks)
    counts, results, branches = analyse(records, perturbed, rewards)
    rho = correlations(records, rewards, args.compare_with) if args.compare_with else None
    meta = {
        "command": command, "data": str(args.data),
        "machine": f"remote service at {args.url}" if args.url else machine(settings.device),
        "records": len(records), "skipped": len(skipped), "skipped_reasons": skipped[:20],
        **{b: sum(r.query_type == b for r in records) for b in BRANCHES},
        "response_is_reference": sum(r.reference == r.response for r in records),
        "response_is_reference_closed": sum(r.query_type == "closed" and r.reference == r.response
                                            for r in records),
        "own_responses": sum(r.own_response for r in records), "closed_reference": args.closed_reference,
        "seed": args.seed, "limit": args.limit, "split": args.split, "backends": described,
        "reward_ratio": "mean perturbed reward / mean true reward over the same items (ratio of means)",
    }
    report = Report(meta, counts, results, branches, rho)
    report.violations, notes = check(results, thresholds)
    meta["runtime_s"] = time.perf_counter() - started
    paths = write(report, args.out, args.name)
    print(markdown(report))
    print(f"r3-audit: wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    for note in notes:
        print(f"r3-audit: note: {note}", file=sys.stderr)
    for violation in report.violations:
        print(f"r3-audit: THRESHOLD VIOLATION: {violation_line(violation)}", file=sys.stderr)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
