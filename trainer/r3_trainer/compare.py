"""Runs side by side: each run's held-out evaluations over training, and its latest against its
start, paired over the same prompts.

    python -m r3_trainer.compare bench/results/learning/r3 bench/results/learning/r3-guarded \\
        --out bench/results/learning

A run directory holds `eval/step-NNNNNN.jsonl` (the trainer writes one per evaluation, step 0
with `eval_at_start`) and `log.jsonl`. Writes compare.md (the tables and answers side by side),
compare.json and curves.png (every held-out figure's change since the start, paired over prompts,
± one standard error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from r3_trainer import evaluation
from r3_trainer.evaluation import Table


def load_evals(run: Path) -> dict[int, Table]:
    """step -> that evaluation's rows, in step order."""
    found = sorted((run / "eval").glob("step-*.jsonl"))
    return {int(p.stem.split("-")[1]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in found}


def run_summary(name: str, evals: dict[int, Table]) -> dict[str, Any]:
    steps = sorted(evals)
    first, last = evals[steps[0]], evals[steps[-1]]
    return {
        "run": name, "backend": next(iter(first[0]["reward"])), "steps": steps,
        "curves": {step: evaluation.summary(evals[step]) for step in steps},
        "changes": {step: evaluation.paired(first, evals[step]) for step in steps},
        "start": evaluation.summary(first), "latest": evaluation.summary(last),
        "paired": evaluation.paired(first, last),
    }


def _cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f} ± {stats['se']:.3f}"


def render(summaries: list[dict[str, Any]], evals: dict[str, dict[int, Table]], shown: int) -> str:
    lines = ["# Learning runs side by side", "",
             "Held-out prompts answered at each evaluation with one fixed seed; ± is a standard error; "
             "\"change\" is latest − start paired over prompts, and its ratio to its standard error.", ""]
    for s in summaries:
        latest = s["steps"][-1]
        lines += [f"## Trained against `{s['backend']}` ({s['run']}): step 0 → step {latest}", "",
                  "| figure | start | latest | change | change / SE |", "|---|--:|--:|--:|--:|"]
        for name, d in s["paired"].items():
            if "/open" in name or "/closed" in name or not d["n"]:  # not recorded at one end
                continue
            z = f"{d['mean'] / d['se']:+.1f}" if d["se"] else "–"
            lines.append(f"| {name} | {_cell(s['start'][name])} | {_cell(s['latest'][name])} "
                         f"| {d['mean']:+.3f} ± {d['se']:.3f} | {z} |")
        lines.append("")
    lines += ["## Answers side by side (the first held-out prompts)", ""]
    first_run = next(iter(evals.values()))
    start = first_run[min(first_run)]
    for i in range(min(shown, len(start))):
        lines += [f"### ({start[i]['query_type']}) {start[i]['query']}", "",
                  f"**start**: {start[i]['text'] or '(empty)'}", ""]
        for name, run in evals.items():
            row = run[max(run)][i]
            rewards = ", ".join(f"{b} {v:.3f}" for b, v in row["reward"].items())
            lines += [f"**{name}, step {max(run)}** ({rewards}): {row['text'] or '(empty)'}", ""]
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summaries[0]["start"] if "/open" not in n and "/closed" not in n]
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for s in summaries:
            steps = s["steps"]
            means = [s["changes"][t][name]["mean"] for t in steps]
            ses = [s["changes"][t][name]["se"] for t in steps]
            ax.errorbar(steps, means, yerr=ses, marker="o", ms=3, capsize=2,
                        label=f"trained on {s['backend']}")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(f"{name}: change since step 0", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_trainer.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run (or results) directories holding eval/")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--show", type=int, default=6, help="answers shown side by side")
    args = parser.parse_args(argv)
    evals = {run.name: load_evals(run) for run in args.runs}
    empty = [name for name, e in evals.items() if not e]
    if empty:
        parser.error(f"no eval/step-*.jsonl in {', '.join(empty)}")
    summaries = [run_summary(name, e) for name, e in evals.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(render(summaries, evals, args.show))
    (args.out / "compare.json").write_text(json.dumps(summaries, indent=1))
    plot(summaries, args.out / "curves.png")
    print((args.out / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
