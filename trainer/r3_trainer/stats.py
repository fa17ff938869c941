"""What a step logs: reward statistics over all processes, the rollout's own figures, and the
JSONL log they go to (one record per step, written by the main process)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from r3_service.rule.copying import copy_shares
from r3_service.rule.guards import REASONS, detect, tokenise
from r3_trainer.config import HackBounds
from r3_trainer.rewards import ScoredRewards
from r3_trainer.rollout import Rollout

LEXICAL_REASONS = tuple(r for r in REASONS if r != "filler")  # filler needs the service's model


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


def reward_stats(accelerator: Accelerator, scored: list[ScoredRewards], tokens: int,
                 prefix: str) -> dict[str, float]:
    """Raw reward mean/std, the mean per query type (a batch's mix of types moves the mean more
    than learning does) and each R3 component's mean, over all processes."""
    rewards = [r for s in scored for r in s.batch.rewards]
    components = [c for s in scored for c in s.batch.components]
    relevance = [c.relevance for c in components if c.relevance is not None]
    by_type = {kind: [r for r, c in zip(rewards, components, strict=True) if c.query_type == kind]
               for kind in ("open", "closed")}
    local = torch.tensor([
        sum(rewards), sum(r * r for r in rewards), len(rewards),
        sum(c.length_incentive for c in components), sum(c.repetition_penalty for c in components),
        sum(relevance), len(relevance), sum(c.relevance_target == "reference" for c in components),
        tokens, sum(by_type["open"]), len(by_type["open"]), sum(by_type["closed"]), len(by_type["closed"]),
    ], dtype=torch.float64, device=accelerator.device)
    (total, squares, n, li, rp, rel, n_rel, closed, tokens, open_sum, n_open, closed_sum,
     n_closed) = accelerator.reduce(local, "sum").tolist()
    mean = total / n
    return {
        f"{prefix}reward/open_mean": _ratio(open_sum, n_open),
        f"{prefix}reward/closed_mean": _ratio(closed_sum, n_closed),
        f"{prefix}reward/open_share": n_open / n,
        f"{prefix}reward/mean": mean,
        f"{prefix}reward/std": math.sqrt(max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)),
        f"{prefix}components/length_incentive": li / n,
        f"{prefix}components/repetition_penalty": rp / n,
        f"{prefix}components/relevance": _ratio(rel, n_rel),
        f"{prefix}components/closed_branch": closed / n,
        f"{prefix}response/length_tokens": tokens / n,
    }


def text_signals(accelerator: Accelerator, queries: list[str], texts: list[str], copy_threshold: float,
                 prefix: str) -> dict[str, float]:
    """The hack signals read off the texts, over all processes: share of responses copying the
    query (4-gram overlap past `copy_threshold`), share of empty ones, mean length in words, and
    the share of responses each of the service's pure-Python hack detectors flags (`rule.guards`:
    the question pasted back or reworded, an input handed back, text repeated)."""
    split = [tokenise(t) for t in texts]
    overlaps = copy_shares((q, s.tokens) for q, s in zip(queries, split, strict=True))
    flagged = [{r for r in detect(q, s).unpaid if r} for q, s in zip(queries, split, strict=True)]
    local = torch.tensor([
        sum(o >= copy_threshold for o in overlaps), sum(overlaps), sum(not t for t in texts),
        sum(len(s.tokens) for s in split), len(texts),
        *(sum(reason in f for f in flagged) for reason in LEXICAL_REASONS),
    ], dtype=torch.float64, device=accelerator.device)
    copying, overlap, empty, words, n, *by_reason = accelerator.reduce(local, "sum").tolist()
    return {f"{prefix}hack/copy_share": copying / n, f"{prefix}hack/copy_overlap": overlap / n,
            f"{prefix}hack/empty_share": empty / n, f"{prefix}response/words": words / n,
            **{f"{prefix}hack/{reason}_share": count / n
               for reason, count in zip(LEXICAL_REASONS, by_reason, strict=True)}}


class HackWatch:
    """Warns when a step's signal passes its configured bound; the length bound is relative to
    the mean length of the first `baseline_steps` steps."""

    def __init__(self, bounds: HackBounds, baseline_steps: int = 3) -> None:
        self.bounds = bounds
        self.baseline_steps = baseline_steps
        self._first_lengths: list[float] = []

    def check(self, record: dict[str, Any]) -> list[str]:
        b, warnings = self.bounds, []
        above = (("hack/copy_share", b.copy_share, "responses copying the query"),
                 ("hack/restate_share", b.restate_share, "responses rewording the question"),
                 ("hack/repeat_share", b.repeat_share, "responses repeating their own text"),
                 ("hack/empty_share", b.empty_share, "empty responses"),
                 ("hack/truncated_share", b.truncated_share, "responses cut at max_new_tokens"))
        for key, bound, what in above:
            value = record.get(key)
            if bound is not None and value is not None and value > bound:
                warnings.append(f"{key}={value:.2f} > {bound:g}: {what}")
        rp = record.get("components/repetition_penalty")
        if b.repetition_penalty_min is not None and rp is not None and rp < b.repetition_penalty_min:
            warnings.append(f"components/repetition_penalty={rp:.2f} < {b.repetition_penalty_min:g}: "
                            "the policy repeats itself")
        words = record.get("response/words")
        if words is not None:
            if len(self._first_lengths) < self.baseline_steps:
                self._first_lengths.append(words)
            base = sum(self._first_lengths) / len(self._first_lengths)
            if b.length_growth is not None and base > 0 and words > b.length_growth * base:
                warnings.append(f"response/words={words:.1f} > {b.length_growth:g} x {base:.1f} "
                                "(the first steps'): length is being farmed")
        return warnings


def rollout_stats(rollout: Rollout, generated: list[Rollout], scored: ScoredRewards,
                  step: int) -> dict[str, float]:
    """The trained-on rollout's figures, and the time spent on those sampled this step (`generated`)."""
    generation = sum(r.generation_s for r in generated)
    tokens = sum(r.n_tokens for r in generated)
    return {
        "policy/entropy": rollout.entropy,
        "response/ended": rollout.ended,
        "hack/truncated_share": 1.0 - rollout.ended,
        "staleness": step - 1 - rollout.policy_step,
        "reward/latency_s": scored.latency_s,
        "speed/tokens_per_s": tokens / generation if generation > 0 else float("nan"),
        "time/generation": generation,
        "time/rollout_forward": sum(r.forward_s for r in generated),
    }


def finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities (e.g. no relevance this step) as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class StepLog:
    """The JSONL training log; only the main process (`enabled`) touches the file."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def start(self, step: int) -> None:
        """A fresh run (step 0) starts an empty log; a resumed one drops the lines of steps after
        its checkpoint: they are about to be redone."""
        if not self.enabled:
            return
        if step == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
