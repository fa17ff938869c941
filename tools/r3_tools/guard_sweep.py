"""The trade-off of `r3-guarded`'s knobs: each hack's win rate against the Spearman ρ with `r3`
over honest answers, one knob moved at a time from the shipped defaults, on the design fold (the
validation fold stays unseen). Writes bench/results/guards/tradeoff.{json,md,png}.

    python -m r3_tools.guard_sweep [--limit 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from r3_service.engine.backends import filler_head
from r3_service.engine.engine import RewardEngine
from r3_service.engine.resolve import RawItem
from r3_tools.audit import (
    audit_settings,
    compare,
    items_to_score,
    machine,
    perturb,
    read_audit_records,
    spearman,
    split_records,
)

KNOBS: dict[str, tuple[float, ...]] = {
    "penalty": (0.0, 0.25, 0.5, 1.0),
    "filler_threshold": (0.3, 0.4, 0.6, 0.7),
    "filler_margin": (0.0, 0.1, 0.3),
    "filler_topic_cap": (0.2, 0.4, 1.0),
    "restate_share": (0.4, 0.6, 0.7),
    "restate_cover": (0.5, 0.7),
    "restate_anywhere": (0.0, 1.0),
    "echo_slack": (0, 1, 2),
}
WATCHED = ("copy-query", "query+answer", "repeat-2x", "filler-2x", "question-reworded", "reworded+answer")


async def _sweep(records: list, chunks: list, settings: Any) -> list[dict[str, Any]]:
    engine = await asyncio.to_thread(RewardEngine.from_settings, settings)
    engine.start()
    try:
        r3, guarded = engine.backend("r3"), engine.backend("r3-guarded")
        base = guarded.params  # type: ignore[attr-defined]
        settings_list = [("default", base.guards)] + [
            (f"{knob}={value:g}", replace(base.guards, **{knob: value}))
            for knob, values in KNOBS.items() for value in values if value != _value(base.guards, knob)]
        reference = await _rewards(engine, r3, chunks)
        out = []
        for label, guards in settings_list:
            guarded.params = replace(base, guards=guards)  # type: ignore[attr-defined]
            got = await _rewards(engine, guarded, chunks)
            out.append({"setting": label, "guards": asdict(guards),
                        "knobs": {knob: _value(guards, knob) for knob in KNOBS},
                        **_figures(records, reference, got)})
            print(f"guard-sweep: {label}: {json.dumps(out[-1]['open'])}", flush=True)
        return out
    finally:
        await engine.close()


def _value(guards: Any, knob: str) -> float:
    """A knob's value; the filler threshold's default is the head's own."""
    value = getattr(guards, knob)
    return filler_head().threshold if value is None else value


async def _rewards(engine: RewardEngine, backend: Any, chunks: list) -> dict:
    rewards = {}
    for chunk in chunks:
        scored = await engine.score([RawItem(*item) for _, item in chunk], backend)
        rewards.update(zip((key for key, _ in chunk), (s.reward for s in scored), strict=True))
    return rewards


def _figures(records: list, r3: dict, got: dict) -> dict[str, Any]:
    """Per branch: each watched hack's win rate, and ρ with r3 over the true answers."""
    out: dict[str, Any] = {}
    for branch in ("open", "closed"):
        rows = [i for i, r in enumerate(records) if r.query_type == branch]
        figures = {"rho": spearman([got[(i, None)] for i in rows], [r3[(i, None)] for i in rows])}
        for name in WATCHED:
            pairs = [(got[(i, None)], got[(i, name)]) for i in rows if (i, name) in got]
            figures[name] = compare([t for t, _ in pairs], [p for _, p in pairs])["win_rate"]
        out[branch] = figures
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(KNOBS), figsize=(5 * len(KNOBS), 4.5), sharey=True)
    for axis, knob in zip(axes, KNOBS, strict=True):
        rows = sorted((r for r in results
                       if r["setting"] == "default" or r["setting"].startswith(f"{knob}=")),
                      key=lambda r: r["knobs"][knob])
        for name in WATCHED:
            axis.plot([r["open"]["rho"] for r in rows], [r["open"][name] for r in rows], marker="o",
                      label=name)
            for r in rows:
                axis.annotate(f"{r['knobs'][knob]:g}", (r["open"]["rho"], r["open"][name]), fontsize=7)
        axis.set_title(knob, fontsize=10)
        axis.set_xlabel("Spearman ρ with r3 (honest answers, open)")
    axes[0].set_ylabel("win rate of the true answer (open)")
    axes[-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# r3-guarded knobs: design fold, {meta['records']} records ({meta['open']} open)", "",
             f"- command: `{meta['command']}`",
             f"- machine: {meta['machine']}, runtime {meta['runtime_s']:.0f} s",
             "- one knob moved at a time from the defaults; open items (the closed branch pays the reference "
             "stand-in its maximum, so it moves little)", "",
             f"| setting | ρ open | {' | '.join(WATCHED)} | ρ closed |",
             "|---|---:|" + "---:|" * (len(WATCHED) + 1)]
    for r in results:
        cells = " | ".join(f"{r['open'][n]:.3f}" for n in WATCHED)
        lines.append(f"| {r['setting']} | {r['open']['rho']:.3f} | {cells} | {r['closed']['rho']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_tools.guard_sweep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/alpacafarm_val.json"))
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/guards"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    records = split_records(read_audit_records(args.data)[0], "design")[: args.limit]
    perturbed = {name: pairs for name, pairs in perturb(records, 0).items() if name in WATCHED}
    chunks = items_to_score(records, perturbed)
    results = asyncio.run(_sweep(records, chunks, audit_settings(None)))
    meta = {"command": " ".join(["python -m r3_tools.guard_sweep", *(argv or [])]), "machine": machine("cpu"),
            "records": len(records), "open": sum(r.query_type == "open" for r in records),
            "runtime_s": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tradeoff.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (args.out / "tradeoff.md").write_text(markdown(results, meta))
    plot(results, args.out / "tradeoff.png")
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
