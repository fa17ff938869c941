"""What a step logs: reward statistics over all processes, the rollout's own figures, and the
JSONL log they go to (one record per step, written by the main process)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from r3_trainer.rewards import ScoredRewards
from r3_trainer.rollout import Rollout


def reward_stats(accelerator: Accelerator, scored: list[ScoredRewards], tokens: int,
                 prefix: str) -> dict[str, float]:
    """Raw reward mean/std and each R3 component's mean, over all processes."""
    rewards = [r for s in scored for r in s.batch.rewards]
    components = [c for s in scored for c in s.batch.components]
    relevance = [c.relevance for c in components if c.relevance is not None]
    local = torch.tensor([
        sum(rewards), sum(r * r for r in rewards), len(rewards),
        sum(c.length_incentive for c in components), sum(c.repetition_penalty for c in components),
        sum(relevance), len(relevance), sum(c.relevance_target == "reference" for c in components),
        tokens,
    ], dtype=torch.float64, device=accelerator.device)
    (total, squares, n, li, rp, rel, n_rel, closed, tokens) = accelerator.reduce(local, "sum").tolist()
    mean = total / n
    return {
        f"{prefix}reward/mean": mean,
        f"{prefix}reward/std": math.sqrt(max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)),
        f"{prefix}components/length_incentive": li / n,
        f"{prefix}components/repetition_penalty": rp / n,
        f"{prefix}components/relevance": rel / n_rel if n_rel else float("nan"),
        f"{prefix}components/closed_branch": closed / n,
        f"{prefix}response/length_tokens": tokens / n,
    }


def rollout_stats(rollout: Rollout, generated: list[Rollout], scored: ScoredRewards,
                  step: int) -> dict[str, float]:
    """The trained-on rollout's figures, and the time spent on those sampled this step (`generated`)."""
    generation = sum(r.generation_s for r in generated)
    tokens = sum(r.n_tokens for r in generated)
    return {
        "policy/entropy": rollout.entropy,
        "response/ended": rollout.ended,
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
