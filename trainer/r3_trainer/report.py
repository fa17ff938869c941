"""Before and after: the base model and a trained checkpoint answer the same held-out prompts
(the config's dev set, never trained on) through `evaluation`, the path the trainer's own
evaluation takes (same seed, same batches: the "after" side of the final checkpoint is the
trainer's last evaluation), and the live service scores both under every backend asked for.

    python -m r3_trainer.report --config trainer/configs/smollm2-cpu.yaml \\
        --checkpoint runs/smollm2-cpu/checkpoint-000032 --out bench/results/smollm2-cpu

Reported per side: the mean reward under each backend (all, open, closed), ROUGE-L against the
reference on closed prompts, length, the share cut at max_new_tokens, and the share of answers
each hack detector flags; the after - before difference of each, paired over the prompts, with
its standard error; and a few answers side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from r3_trainer import evaluation
from r3_trainer.checkpoint import load_weights
from r3_trainer.config import TrainConfig, load_config
from r3_trainer.data import load_records, split_dev
from r3_trainer.model import build_policy, load_tokenizer
from r3_trainer.rollout import RolloutMaker, reward_scorer

Table = evaluation.Table


def render(cfg: TrainConfig, checkpoint: str, before: Table, after: Table,
           shown: int) -> tuple[str, dict[str, Any]]:
    main = next(iter(before[0]["reward"]))
    b_stats, a_stats = evaluation.summary(before), evaluation.summary(after)
    diffs = evaluation.paired(before, after)
    lines = [f"# Before / after: {cfg.model_name_or_path}, trained against `{main}`", "",
             f"{len(before)} held-out prompts (dev split of `{cfg.data_path}`, seed {cfg.seed}), one sample "
             f"each at temperature {cfg.temperature:g}, {cfg.max_new_tokens} new tokens at most, the same "
             f"seed on both sides. After = `{checkpoint}`. ± is a standard error; the difference is "
             "paired over prompts.", "",
             "| figure | before | after | after − before |", "|---|--:|--:|--:|"]
    for name, d in diffs.items():
        b, a = b_stats[name], a_stats[name]
        lines.append(f"| {name} | {b['mean']:.3f} ± {b['se']:.3f} | {a['mean']:.3f} ± {a['se']:.3f} "
                     f"| {d['mean']:+.3f} ± {d['se']:.3f} |")
    lines += ["", "## Answers side by side", ""]
    for b, a in list(zip(before, after, strict=True))[:shown]:
        lines += [f"### ({b['query_type']}) {b['query']}", ""]
        for name, row in (("before", b), ("after", a)):
            lines += [f"**{name}** (reward {row['reward'][main]:.3f}): {row['text'] or '(empty)'}", ""]
    data = {"checkpoint": checkpoint, "backend": main, "before": b_stats, "after": a_stats, "paired": diffs}
    return "\n".join(lines) + "\n", data


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
    backends = list(dict.fromkeys([cfg.reward_backend or "r3", *cfg.eval_backends, *args.also]))
    seed = cfg.seed + evaluation.SEED_OFFSET
    try:
        with policy.lm.disable_adapter():
            before = evaluation.evaluate(maker, scorer, records, seed, backends)
        load_weights(Path(args.checkpoint), policy, accelerator.device)
        after = evaluation.evaluate(maker, scorer, records, seed, backends)
    finally:
        scorer.close()
    markdown, data = render(cfg, args.checkpoint, before, after, args.show)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown)
    (args.out / "report.json").write_text(json.dumps(data, indent=1))
    for name, rows in (("before", before), ("after", after)):
        (args.out / f"eval-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The base model's answers as an r3-audit data set: real responses with distinct references.
    with (args.out / "base-responses.jsonl").open("w") as f:
        for record, row in zip(records, before, strict=True):
            f.write(json.dumps({"query": record.query, "response": row["text"], "reference": record.reference,
                                "query_type": record.query_type}) + "\n")
    print(markdown)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
