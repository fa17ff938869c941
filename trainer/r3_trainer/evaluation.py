"""Held-out evaluation: one path for the trainer's curves and for the before/after report.

The policy answers the dev prompts (never trained on) with a fixed seed and batch size, so two
evaluations of the same weights draw the same samples; the service scores the answers under
every requested preset. Each prompt's row keeps what the paper's evaluation asks for where it can
be done offline: the reward under each preset, ROUGE-L against the reference on closed prompts
(the SuperNI column: a lexical check of correctness independent of any reward model), the length,
whether the answer was cut, and which hack the service's detectors see in it. Rows of two
evaluations of the same prompts compare pairwise (`paired`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r3_client import ScoredBatch
from r3_service.rule.copying import copy_overlaps
from r3_service.rule.guards import REASONS, detect, tokenise
from r3_trainer.data import Record
from r3_trainer.rewards import RewardScorer
from r3_trainer.rollout import RolloutMaker, reward_items

Table = list[dict[str, Any]]  # one row per prompt
SEED_OFFSET = 10_000  # evaluation draws from cfg.seed + this, apart from the training stream
HACKS = ("copy", *REASONS)


@dataclass
class Answers:
    texts: list[str]
    truncated: list[bool]


def answer(maker: RolloutMaker, records: Sequence[Record], seed: int) -> Answers:
    """One sample per record in batches of eval_batch_size, from `seed` whatever the training
    RNG is (it is restored afterwards)."""
    size = maker.cfg.eval_batch_size
    texts: list[str] = []
    truncated: list[bool] = []
    device = maker.accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(records), size):
            sampled = maker.generate(list(records[start:start + size]))
            texts += maker.decode(sampled.response_ids, sampled.response_mask)
            truncated += (sampled.response_mask.sum(1) >= maker.cfg.max_new_tokens).tolist()
    return Answers(texts, truncated)


def score(scorer: RewardScorer, records: Sequence[Record], texts: Sequence[str],
          backends: Sequence[str]) -> dict[str, ScoredBatch]:
    """The answers scored under each backend, all requests in flight together."""
    items = reward_items(list(records), list(texts))
    pending = {name: scorer.submit(items, backend=name) for name in backends}
    return {name: p.result().batch for name, p in pending.items()}


def _alnum_words(text: str) -> list[str]:
    return [t for t in tokenise(text.lower()).tokens if t[0].isalnum()]


def rouge_l(candidate: str, reference: str) -> tuple[float, float, float]:
    """ROUGE-L (precision, recall, F1) over lower-cased words (punctuation dropped): the longest
    common subsequence. Recall is the share of the reference's words the candidate covers in
    order: unlike F1 it does not fall when a correct answer grows longer."""
    a, b = _alnum_words(candidate), _alnum_words(reference)
    if not a or not b:
        return 0.0, 0.0, 0.0
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0, 0.0, 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return precision, recall, 2 * precision * recall / (precision + recall)


def hack_flags(record: Record, text: str, copy_threshold: float,
               unpaid: dict[str, float] | None) -> dict[str, bool]:
    """Which hacks a response shows: the query copied (4-gram overlap), and each reason the
    guarded rule does not pay for; filler only where a guarded backend scored it (`unpaid`)."""
    detection = detect(record.query, tokenise(text), record.reference)
    flags = {reason: detection.shares[reason] > 0 for reason in REASONS if reason != "filler"}
    flags["filler"] = bool(unpaid and unpaid.get("filler", 0.0) > 0)
    flags["copy"] = copy_overlaps([(record.query, text)])[0] >= copy_threshold
    return flags


def rows(records: Sequence[Record], answers: Answers, scored: dict[str, ScoredBatch],
         copy_threshold: float) -> list[dict[str, Any]]:
    """One row per prompt: rewards by backend, ROUGE-L F1 and recall (closed prompts with a reference), words,
    cut, and the hack flags."""
    guarded = next((b for b in scored.values() if any(c.unpaid is not None for c in b.components)), None)
    out = []
    for i, (record, text) in enumerate(zip(records, answers.texts, strict=True)):
        query_type = next(iter(scored.values())).components[i].query_type
        closed = query_type == "closed" and bool(record.reference)
        unpaid = guarded.components[i].unpaid if guarded is not None else None
        _, recall, f1 = rouge_l(text, record.reference or "") if closed else (None, None, None)
        out.append({
            "query": record.query, "query_type": query_type, "text": text,
            "words": len(tokenise(text).tokens),
            "truncated": answers.truncated[i],
            "reward": {name: batch.rewards[i] for name, batch in scored.items()},
            "rouge_l": f1, "rouge_l_recall": recall,
            "hacks": hack_flags(record, text, copy_threshold, unpaid),
            "filler_scored": guarded is not None,
        })
    return out


def evaluate(maker: RolloutMaker, scorer: RewardScorer, records: Sequence[Record], seed: int,
             backends: Sequence[str]) -> Table:
    """Answer `records` from `seed`, score the answers under `backends`: one row per prompt."""
    answers = answer(maker, records, seed)
    return rows(records, answers, score(scorer, records, answers.texts, backends), maker.cfg.copy_threshold)


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


METRICS: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "words": lambda r: float(r["words"]),
    "truncated_share": lambda r: float(r["truncated"]),
    "rouge_l_closed": lambda r: r["rouge_l"],
    "rouge_l_recall_closed": lambda r: r.get("rouge_l_recall"),  # absent from evaluations before it
    **{f"hack/{h}_share": (lambda r, h=h: None if h == "filler" and not r["filler_scored"]
                           else float(r["hacks"][h])) for h in HACKS},
}


def metric_values(table: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Each figure per prompt (None where it does not apply), the rewards by backend first."""
    backends = list(table[0]["reward"]) if table else []
    values: dict[str, list[float | None]] = {}
    for b in backends:
        values[f"reward[{b}]"] = [r["reward"][b] for r in table]
    for kind in ("open", "closed"):
        for b in backends:
            values[f"reward[{b}]/{kind}"] = [r["reward"][b] if r["query_type"] == kind else None
                                             for r in table]
    values.update({name: [get(r) for r in table] for name, get in METRICS.items()})
    return values


def summary(table: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard error and count of every figure."""
    out = {}
    for name, values in metric_values(table).items():
        kept = [v for v in values if v is not None and math.isfinite(v)]
        mean, se = _mean_se(kept)
        out[name] = {"mean": mean, "se": se, "n": len(kept)}
    return out


def paired(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """after - before over the prompts both have a value for: mean, standard error, count."""
    a_values, b_values = metric_values(after), metric_values(before)
    out = {}
    for name, a in a_values.items():
        b = b_values.get(name)
        if b is None:
            continue
        diffs = [x - y for x, y in zip(a, b, strict=True)
                 if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
        mean, se = _mean_se(diffs)
        out[name] = {"mean": mean, "se": se, "n": len(diffs)}
    return out


def flat(stats: dict[str, dict[str, float]], prefix: str = "eval/") -> dict[str, float]:
    """`summary` as flat log keys: eval/<figure> and eval/<figure>/se."""
    out = {}
    for name, s in stats.items():
        out[f"{prefix}{name}"] = s["mean"]
        out[f"{prefix}{name}/se"] = s["se"]
    return out
