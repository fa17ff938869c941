"""Issue 25's eval gap: was the report's "after" (0.08 below the trainer's own dev evaluation of
the same checkpoint) a difference of method or of luck? The two old paths differed only in the
seed (trainer: seed + 10000, report: seed + 20000) and the batch the prompts were answered in
(16 vs 8). This answers the 100 dev prompts of trainer/configs/smollm2-cpu.yaml (64 new tokens)
with the base SmolLM2 under five seeds at each batch size, through the one evaluation path both
use now, and writes eval_gap.md: how far the dev mean moves with the seed alone.

    HF_HUB_OFFLINE=1 r3-serve --port 8000 &   # then, from the repository root:
    python bench/results/learning/eval_gap.py
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from accelerate import Accelerator

from r3_trainer import evaluation
from r3_trainer.config import load_config
from r3_trainer.data import load_records, split_dev
from r3_trainer.model import build_policy, load_tokenizer
from r3_trainer.rollout import RolloutMaker, reward_scorer

HERE = Path(__file__).resolve().parent
SEEDS = (10_000, 20_000, 30_000, 40_000, 50_000)
BATCHES = (16, 8)


def main() -> int:
    rows = []
    for batch in BATCHES:
        cfg = load_config("trainer/configs/smollm2-cpu.yaml", [f"eval_batch_size={batch}", *sys.argv[1:]])
        tokenizer = load_tokenizer(cfg)
        policy = build_policy(cfg, tokenizer)
        scorer = reward_scorer(cfg)
        maker = RolloutMaker(cfg, Accelerator(cpu=True), tokenizer, policy, scorer)
        _, dev = split_dev(load_records(cfg.data_path), cfg.dev_size, cfg.seed)
        for seed in SEEDS:
            table = evaluation.evaluate(maker, scorer, dev, cfg.seed + seed, ["r3"])
            stats = evaluation.summary(table)["reward[r3]"]
            rows.append({"batch": batch, "seed": seed, "mean": stats["mean"], "se": stats["se"]})
            print(rows[-1], flush=True)
        scorer.close()
    means = [r["mean"] for r in rows]
    by_batch = {b: [r["mean"] for r in rows if r["batch"] == b] for b in BATCHES}
    same_seed = [a["mean"] - b["mean"] for a in rows for b in rows
                 if a["batch"] == 16 and b["batch"] == 8 and a["seed"] == b["seed"]]
    lines = ["# The eval gap: the dev mean of one model under different seeds and batch sizes", "",
             "Base SmolLM2-135M-Instruct, trainer/configs/smollm2-cpu.yaml (64 new tokens, T 0.7), the 100 "
             "dev prompts, backend r3, `r3_trainer.evaluation` (the one path the trainer and the report "
             "share).", "", "| batch | seed offset | dev mean reward | its standard error |",
             "|--:|--:|--:|--:|"]
    lines += [f"| {r['batch']} | {r['seed']} | {r['mean']:.3f} | {r['se']:.3f} |" for r in rows]
    spread = statistics.stdev(means)
    lines += ["", f"- Standard deviation of the dev mean over the {len(rows)} evaluations: **{spread:.3f}**; "
              f"range {min(means):.3f} – {max(means):.3f}.",
              f"- Mean by batch size: 16 → {statistics.mean(by_batch[16]):.3f}, "
              f"8 → {statistics.mean(by_batch[8]):.3f}; same seed, batch 16 − batch 8: "
              + ", ".join(f"{d:+.3f}" for d in same_seed) + ".",
              f"- Two independent evaluations differ by ~N(0, {spread * math.sqrt(2):.3f}²): the old "
              f"0.08 gap is {0.08 / (spread * math.sqrt(2)):.1f} of those standard deviations."]
    (HERE / "eval_gap.md").write_text("\n".join(lines) + "\n")
    (HERE / "eval_gap.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
