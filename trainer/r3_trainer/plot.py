"""Curves of a training log (JSONL, one record per step) as one PNG.

The reward breakdown panel is the one to read for reward hacking: a reward that rises while the
repetition penalty falls (repeating itself) or relevance falls (copying, rambling) is being gamed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            xs.append(record["step"])
            ys.append(float(value))
    return xs, ys


def _lines(ax: Any, records: list[dict[str, Any]], title: str, *series: tuple[str, str]) -> None:
    for key, label in series:
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, label=label)
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot_log(log_path: str | Path, out_path: str | Path, title: str | None = None) -> Path:
    """Eight panels: reward (+ dev), reward per query type, R3 components, KL and its coefficient,
    hack signals, losses, length/entropy, time per step by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        raise ValueError(f"{log_path}: no records to plot")
    fig, axes = plt.subplots(2, 4, figsize=(21, 8.5))
    (ax_reward, ax_types, ax_parts, ax_kl), (ax_hacks, ax_loss, ax_len, ax_time) = axes

    steps, mean = _series(records, "reward/mean")
    _, std = _series(records, "reward/std")
    ax_reward.plot(steps, mean, label="train reward (raw mean)", color="C0")
    if len(std) == len(mean):
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax_reward.fill_between(steps, low, high, color="C0", alpha=0.15, label="± std")
    eval_steps, eval_mean = _series(records, "eval/reward/mean")
    if eval_steps:
        ax_reward.plot(eval_steps, eval_mean, "o-", color="C3", label="dev reward (mean)")
    ax_reward.set_title("reward")
    ax_reward.legend(fontsize=8)

    _lines(ax_types, records, "reward per query type (a batch's mix moves the mean)",
           ("reward/open_mean", "open queries"), ("reward/closed_mean", "closed queries"),
           ("eval/reward/open_mean", "dev, open"), ("eval/reward/closed_mean", "dev, closed"))

    _lines(ax_hacks, records, "hack signals (shares of responses)",
           ("hack/copy_share", "copying the query"), ("hack/empty_share", "empty"),
           ("hack/truncated_share", "cut at max_new_tokens"), ("hack/copy_overlap", "mean copy overlap"))
    ax_hacks.set_ylim(-0.03, 1.03)
    for record in records:
        if record.get("warnings"):
            ax_hacks.axvline(record["step"], color="red", alpha=0.15)

    # LI and S on their own scale (left); RP and the closed-branch fraction live in [0, 1] (right).
    _lines(ax_parts, records, "reward breakdown (means)",
           ("components/length_incentive", "length incentive (LI)"), ("components/relevance", "relevance S"))
    twin = ax_parts.twinx()
    for key, label, color in (("components/repetition_penalty", "repetition penalty (RP)", "C3"),
                              ("components/closed_branch", "closed-branch fraction", "C2")):
        twin.plot(*_series(records, key), color=color, linestyle="--", label=label)
    twin.set_ylim(-0.03, 1.03)
    twin.set_ylabel("RP, closed fraction")
    ax_parts.legend(handles=ax_parts.get_lines() + twin.get_lines(), fontsize=8)

    xs, ys = _series(records, "kl")
    ax_kl.plot(xs, ys, color="C1", label="KL(policy || ref), per sequence")
    ax_kl.set_ylabel("KL (nats)")
    twin = ax_kl.twinx()
    xs, ys = _series(records, "kl_coef")
    twin.plot(xs, ys, color="C2", linestyle="--", label="KL coefficient")
    twin.set_ylabel("coefficient")
    ax_kl.set_title("KL")
    ax_kl.legend(handles=ax_kl.get_lines() + twin.get_lines(), fontsize=8)

    _lines(ax_loss, records, "losses", ("loss/policy", "policy loss"), ("loss/value", "value loss"))

    ax_len.plot(*_series(records, "response/length_tokens"), color="C4", label="response length (tokens)")
    ax_len.plot(*_series(records, "response/words"), color="C6", label="length (words, as LI counts)")
    ax_len.set_ylabel("tokens")
    twin = ax_len.twinx()
    twin.plot(*_series(records, "policy/entropy"), color="C5", linestyle="--", label="entropy (nats/token)")
    ax_len.set_title("responses")
    ax_len.legend(handles=ax_len.get_lines() + twin.get_lines(), fontsize=8)

    _lines(ax_time, records, "seconds per step",
           ("time/generation", "generation"), ("time/rollout_forward", "rollout forward"),
           ("time/reward_wait", "waiting for rewards"), ("reward/latency_s", "reward latency"),
           ("time/update", "PPO update"))

    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"r3 PPO: {Path(log_path).name}")
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
