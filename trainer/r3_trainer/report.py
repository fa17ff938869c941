"""Before and after: the base model and a trained checkpoint answer the same held-out prompts
(the config's dev set, never trained on) with the same seed, and the live service scores both.

    python -m r3_trainer.report --config trainer/configs/smollm2-cpu.yaml \\
        --checkpoint runs/smollm2-cpu/checkpoint-000032 --out bench/results/smollm2-cpu

Reported per side: mean R3 reward (all, open, closed) under the trained-on backend and under
each `--also` backend, length in words, RP, relevance, and the hack signals (share copying the
query, mean copy overlap, empty, cut at max_new_tokens); the after - before difference with its
paired standard error; and a few responses side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from r3_client import RewardClient, RewardItem, ScoredBatch
from r3_service.rule.copying import copy_overlaps
from r3_service.rule.features import word_tokens
from r3_trainer.checkpoint import load_weights
from r3_trainer.config import TrainConfig, load_config
from r3_trainer.data import Record, load_records, split_dev
from r3_trainer.model import build_policy, load_tokenizer
from r3_trainer.rollout import RolloutMaker, reward_items, reward_scorer


@dataclass
class Side:
    """One model's answers to the held-out prompts and what the service made of them."""

    name: str
    texts: list[str]
    truncated: list[bool]
    scored: dict[str, ScoredBatch]  # backend -> rewards with components


def sample(maker: RolloutMaker, records: list[Record], seed: int, batch: int) -> tuple[list[str], list[bool]]:
    """One response per record, seeded so that both sides draw the same random numbers."""
    texts: list[str] = []
    truncated: list[bool] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(records), batch):
            _, _, ids, mask = maker.generate(records[start:start + batch])
            texts += maker.decode(ids, mask)
            truncated += (mask.sum(1) >= maker.cfg.max_new_tokens).tolist()
    return texts, truncated


def side_figures(side: Side, records: list[Record], backend: str, copy_threshold: float) -> dict[str, float]:
    batch = side.scored[backend]
    parts = batch.components
    overlaps = copy_overlaps((r.query, t) for r, t in zip(records, side.texts, strict=True))
    relevance = [c.relevance for c in parts if c.relevance is not None]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    figures = {
        "reward": mean(batch.rewards),
        "reward_open": mean([r for r, c in zip(batch.rewards, parts, strict=True) if c.query_type == "open"]),
        "reward_closed": mean([r for r, c in zip(batch.rewards, parts, strict=True)
                               if c.query_type == "closed"]),
        "words": mean([len(word_tokens(t)) for t in side.texts]),
        "repetition_penalty": mean([c.repetition_penalty for c in parts]),
        "relevance": mean(relevance),
        "copy_share": mean([float(o >= copy_threshold) for o in overlaps]),
        "copy_overlap": mean(overlaps),
        "empty_share": mean([float(not t) for t in side.texts]),
        "truncated_share": mean([float(t) for t in side.truncated]),
    }
    for name, other in side.scored.items():
        if name != backend:
            figures[f"reward[{name}]"] = mean(other.rewards)
    return figures


def paired(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean of after - before over the same prompts, and its standard error."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def render(cfg: TrainConfig, checkpoint: str, records: list[Record], before: Side, after: Side,
           backends: list[str], shown: int) -> tuple[str, dict[str, Any]]:
    main = backends[0]
    figures = {side.name: side_figures(side, records, main, cfg.copy_threshold) for side in (before, after)}
    diffs = {name: paired(before.scored[name].rewards, after.scored[name].rewards) for name in backends}
    lines = [f"# Before / after PPO: {cfg.model_name_or_path}, backend `{main}`", "",
             f"{len(records)} held-out prompts (dev split of `{cfg.data_path}`, seed {cfg.seed}), one sample "
             f"each at temperature {cfg.temperature:g}, {cfg.max_new_tokens} new tokens at most, the same "
             f"seed on both sides. After = `{checkpoint}`.", "",
             "| figure | before | after |", "|---|---|---|"]
    for key in figures["before"]:
        lines.append(f"| {key} | {figures['before'][key]:.3f} | {figures['after'][key]:.3f} |")
    lines += ["", "| backend | after - before (paired mean) | standard error |", "|---|---|---|"]
    lines += [f"| {name} | {d:+.3f} | {se:.3f} |" for name, (d, se) in diffs.items()]
    lines += ["", "## Responses side by side", ""]
    for i in range(min(shown, len(records))):
        r = records[i]
        lines += [f"### {i + 1}. ({r.query_type or '?'}) {r.query}", ""]
        for side in (before, after):
            lines += [f"**{side.name}** (reward {side.scored[main].rewards[i]:.3f}): "
                      f"{side.texts[i] or '(empty)'}", ""]
    data = {"checkpoint": checkpoint, "backends": backends, "figures": figures,
            "paired": {k: {"mean": d, "stderr": se} for k, (d, se) in diffs.items()},
            "samples": [{"query": r.query, "query_type": r.query_type, "before": b, "after": a,
                         "reward_before": before.scored[main].rewards[i],
                         "reward_after": after.scored[main].rewards[i]}
                        for i, (r, b, a) in enumerate(zip(records, before.texts, after.texts, strict=True))]}
    return "\n".join(lines) + "\n", data


def score_all(cfg: TrainConfig, records: list[Record], texts: list[str],
              backends: list[str]) -> dict[str, ScoredBatch]:
    items: list[RewardItem] = reward_items(records, texts)
    key = os.environ.get("R3_API_KEY")
    with RewardClient(cfg.reward_url, timeout=cfg.reward_timeout_s, api_key=key) as client:
        return {name: client.score(items, backend=name, return_components=True) for name in backends}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_trainer.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory of this config's run")
    parser.add_argument("--out", required=True, type=Path,
                        help="writes report.md, report.json and base-responses.jsonl here")
    parser.add_argument("--also", action="append", default=[], help="another backend to score with")
    parser.add_argument("--show", type=int, default=5, help="responses shown side by side")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    accelerator = Accelerator()
    tokenizer = load_tokenizer(cfg)
    policy = build_policy(cfg, tokenizer)
    scorer = reward_scorer(cfg)
    maker = RolloutMaker(cfg, accelerator, tokenizer, policy, scorer)
    _, records = split_dev(load_records(cfg.data_path), cfg.dev_size, cfg.seed)
    backends = [cfg.reward_backend or "r3", *args.also]
    seed = cfg.seed + 20_000
    with policy.lm.disable_adapter():
        before = Side("before", *sample(maker, records, seed, cfg.batch_size), {})
    load_weights(Path(args.checkpoint), policy, accelerator.device)
    after = Side("after", *sample(maker, records, seed, cfg.batch_size), {})
    for side in (before, after):
        side.scored = score_all(cfg, records, side.texts, backends)
    scorer.close()
    markdown, data = render(cfg, args.checkpoint, records, before, after, backends, args.show)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown)
    (args.out / "report.json").write_text(json.dumps(data, indent=1))
    # The base model's answers as an r3-audit data set: real responses with distinct references.
    with (args.out / "base-responses.jsonl").open("w") as f:
        for record, text in zip(records, before.texts, strict=True):
            f.write(json.dumps({"query": record.query, "response": text, "reference": record.reference,
                                "query_type": record.query_type}) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
