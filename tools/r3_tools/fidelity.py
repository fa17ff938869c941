"""`r3-bench --fidelity DTYPE[,DTYPE...]`: what a cheaper setting does to the reward, in the terms an
RL trainer sees it, against the exact fp32 scorer.

GRPO-style groups of 8 answers per prompt from the shipped data, of two kinds:
- `others`: 8 other rows' reference answers (the throughput benchmark's GRPO workload): rewards
  far apart, as between a policy's good and bad samples;
- `prefixes`: the prompt's own reference cut after 30%, 40%, ... 100% of its words: rewards close
  together, as between a policy's near-identical samples — the hard case for keeping the order.

Each group is scored in process by the engine at fp32 and at each setting. Reported per setting:
within-group pairwise order agreement (pairs fp32 ranks apart), agreement of the group's best
answer, the error of group-normalised advantages (reward minus the group mean, over the group's
standard deviation: the error is in standard deviations), and the largest absolute and relative
reward difference.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from r3_service.engine.engine import RewardEngine
from r3_service.engine.resolve import RawItem
from r3_service.models.base import pick_device, pick_dtype
from r3_service.settings import Settings
from r3_tools.loadgen import Pair, make_pairs

GROUP = 8
TIE = 1e-9  # fp32 rewards this close are a tie: no order to keep


def prefix_groups(data: Path, groups: int) -> list[list[Pair]]:
    """Each prompt's reference cut after 30% ... 100% of its words (prompts of >= 16 words)."""
    out: list[list[Pair]] = []
    for pair in make_pairs(data, groups * 20, grouped=False):
        words = (pair.reference or "").split()
        if len(words) < 16:
            continue
        cuts = [round(len(words) * (0.3 + 0.1 * k)) for k in range(GROUP)]
        out.append([Pair(pair.query, " ".join(words[:cut]), pair.reference, pair.query_type)
                    for cut in cuts])
        if len(out) == groups:
            break
    return out


def other_groups(data: Path, groups: int) -> list[list[Pair]]:
    pairs = make_pairs(data, groups * GROUP, grouped=True, group=GROUP)
    return [pairs[i:i + GROUP] for i in range(0, len(pairs), GROUP)]


def score(settings: Settings, groups: list[list[Pair]], backend: str | None) -> list[list[float]]:
    async def main() -> list[list[float]]:
        engine = await asyncio.to_thread(RewardEngine.from_settings, settings)
        engine.start()
        try:
            chosen = engine.backend(backend)
            out = []
            for group in groups:
                items = [RawItem(p.query, p.response, p.reference, p.query_type)  # type: ignore[arg-type]
                         for p in group]
                out.append([s.reward for s in await engine.score(items, chosen)])
            return out
        finally:
            await engine.close()

    return asyncio.run(main())


def advantages(rewards: Sequence[float]) -> list[float]:
    mean, sd = statistics.fmean(rewards), statistics.stdev(rewards)
    return [(r - mean) / sd if sd > 0 else 0.0 for r in rewards]


def compare(exact: list[list[float]], other: list[list[float]]) -> dict[str, float]:
    """The RL-facing agreement of `other` with `exact`, group by group."""
    agree = pairs = best = 0
    advantage_errors: list[float] = []
    abs_diff = rel_diff = 0.0
    for e, o in zip(exact, other, strict=True):
        for i, j in itertools.combinations(range(len(e)), 2):
            if abs(e[i] - e[j]) > TIE:
                pairs += 1
                agree += (e[i] - e[j]) * (o[i] - o[j]) > 0
        top = max(e)  # kept when the setting's best is one of fp32's best (ties included)
        best += e[max(range(len(o)), key=o.__getitem__)] >= top - TIE
        advantage_errors += [abs(a - b) for a, b in zip(advantages(e), advantages(o), strict=True)]
        for a, b in zip(e, o, strict=True):
            abs_diff = max(abs_diff, abs(a - b))
            if abs(a) > 1e-3:
                rel_diff = max(rel_diff, abs(a - b) / abs(a))
    return {"pairwise_order_agreement": agree / pairs if pairs else 1.0, "pairs": pairs,
            "best_answer_agreement": best / len(exact), "groups": len(exact),
            "advantage_error_mean_sd": statistics.fmean(advantage_errors),
            "advantage_error_max_sd": max(advantage_errors),
            "max_abs_reward_diff": abs_diff, "max_rel_reward_diff": rel_diff}


def resolved(dtype: str, device: str) -> str:
    """`auto` is shown with what it picks on this machine: `auto (bfloat16)`."""
    if dtype != "auto":
        return dtype
    return f"auto ({str(pick_dtype(dtype, pick_device(device)).dtype).removeprefix('torch.')})"


def run(settings: Settings, dtypes: Sequence[str], data: Path, groups: int, backend: str | None,
        out: Path, machine: str) -> list[dict[str, object]]:
    """Every dtype against fp32 on both kinds of group; writes OUT.json and OUT.md."""
    kinds = {"others": other_groups(data, groups), "prefixes": prefix_groups(data, groups)}
    fp32 = settings.model_copy(update={"dtype": "float32"})
    exact = {kind: score(fp32, g, backend) for kind, g in kinds.items()}
    rows: list[dict[str, object]] = []
    for dtype in dtypes:
        setting = settings.model_copy(update={"dtype": dtype})
        label = resolved(dtype, settings.device)
        for kind, g in kinds.items():
            row = {"dtype": label, "kind": kind, **compare(exact[kind], score(setting, g, backend))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"# Reward fidelity against fp32 ({settings.model}, device {settings.device}, backend "
             f"{backend or 'default'})", "", f"Machine: {machine}.", "",
             "| dtype | groups of 8 | pairwise order kept | best answer kept "
             "| advantage error, mean / max (SD) | max abs / rel reward difference |",
             "|---|---|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['groups']} {r['kind']} "
                     f"| {r['pairwise_order_agreement']:.4f} ({r['pairs']} pairs) "
                     f"| {r['best_answer_agreement']:.3f} | {r['advantage_error_mean_sd']:.4f} / "
                     f"{r['advantage_error_max_sd']:.4f} | {r['max_abs_reward_diff']:.4f} / "
                     f"{r['max_rel_reward_diff']:.2%} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows
