"""Where the service's memory is: RSS by component at ready (measured here, in a process that
builds the engine as `r3-serve` does, step by step) and under a soak's load (from the memory
samples of `scripts/soak.sh`'s report). Writes OUT.json and OUT.md (the table in
docs/operations/memory.md).

    python -m r3_tools.memory_table --soak bench/results/soak.json --out bench/results/memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

MIB = 1 << 20


def rss_mib() -> float:
    return _status("VmRSS")


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_of(work) -> float:
    """MiB the resident set rose above its level before `work` at its highest (Linux: the
    high-water mark reset through /proc/self/clear_refs)."""
    before = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")
    work()
    return max(0.0, _status("VmHWM") - before)


def tensor_mib(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def measure_ready() -> list[tuple[str, float, str]]:
    """(component, MiB, how) at ready, in this process."""
    rows: list[tuple[str, float, str]] = []
    import torch
    from transformers import AutoTokenizer

    from r3_service import allocator
    from r3_service.engine.engine import RewardEngine
    from r3_service.models.base import resolve_model_path
    from r3_service.models.embedding import EmbeddingModel
    from r3_service.settings import DEFAULT_MODEL, Settings

    libraries = rss_mib()
    rows.append(("interpreter and libraries (torch, transformers, FastAPI)", libraries, "RSS after imports"))
    before = rss_mib()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    tokenizer_mib = rss_mib() - before
    settings = Settings()
    allocator.tune(settings.malloc_arena_max)
    before = rss_mib()
    engine = RewardEngine.from_settings(settings)
    engine_mib = rss_mib() - before
    models = {id(s.model.model): s.model for s in engine.pool.schedulers.values()
              if isinstance(s.model, EmbeddingModel)}
    weights = sum(tensor_mib(*m.model.parameters()) for m in models.values())
    packed = sum(tensor_mib(*(t for pair in m.packed.qkv for t in pair)) for m in models.values() if m.packed)
    heads = 0.0
    if engine.classifier is not None and hasattr(engine.classifier, "head"):
        heads += tensor_mib(engine.classifier.head.embedding_weights)
    for backend in engine.backends.values():
        filler = getattr(backend, "filler", None)
        if filler is not None:
            heads += tensor_mib(*(v for v in vars(filler.head).values() if isinstance(v, torch.Tensor)))
    dtype = next(iter(models.values())).info.dtype if models else "?"
    rows += [
        (f"embedding weights ({len(models)} model, {dtype})", weights, "parameter bytes"),
        ("fused query/key/value copies (packed forward)", packed, "tensor bytes"),
        ("heads (query type, filler)", heads, "tensor bytes"),
        ("tokenizer (one per model)", tokenizer_mib * len(models), "RSS of loading one"),
        ("rest of the engine (modules, configs, allocator slack)",
         engine_mib - weights - packed - heads - tokenizer_mib * len(models),
         "RSS of the engine, less the above"),
    ]
    del tokenizer
    scheduler = next(s for s in engine.pool.schedulers.values() if isinstance(s.model, EmbeddingModel))
    model = scheduler.model
    length = min(128, model.info.max_length)
    batch = [[101] + [2000 + (i * 7 + j) % 20000 for j in range(length - 2)] + [102]
             for i in range(max(1, scheduler.limits.max_tokens // length))]
    allocator.trim()  # free pages out of the way, so the forward's own pages show
    with torch.inference_mode():
        activations = peak_of(lambda: model.forward(batch))
    rows.append((f"the largest batch's forward ({len(batch)} × {length} tokens: activations, its "
                 "shapes' primitives)", activations, "peak RSS above the level before it"))
    heap = allocator.heap()
    rows.append(("allocator: free inside glibc's arenas", heap.get("free", 0) / MIB, "mallinfo2"))
    rows.append(("total at ready (this process)", rss_mib(), "RSS"))
    return rows


def under_load(soak: dict) -> dict[str, float]:
    """Medians over the last 75% of a soak: RSS, the caches and the allocator's account."""
    duration = soak["config"]["duration"]
    samples = [s for s in soak["memory_samples"] if s["t"] >= duration / 4]
    caches = {name: statistics.median(s["caches"].get(name, 0.0) for s in samples)
              for name in samples[0]["caches"]}
    allocator = {kind: statistics.median(s["allocator"].get(kind, 0.0) for s in samples)
                 for kind in samples[0]["allocator"]}
    return {"rss": statistics.median(s["rss"] for s in samples), "caches": caches,
            "allocator": allocator,
            "ready_rss": soak["memory_at_ready"]["rss"],
            "ready_in_use": soak["memory_at_ready"]["allocator"].get("in_use", 0.0),
            "ready_free": soak["memory_at_ready"]["allocator"].get("free", 0.0)}


def markdown(rows: list[tuple[str, float, str]], load: dict | None, machine: str) -> str:
    lines = [f"Measured on {machine}.", "", "| component | at ready, MiB | how |", "|---|--:|---|"]
    lines += [f"| {name} | {mib:.0f} | {how} |" for name, mib, how in rows]
    if load:
        caches = sum(load["caches"].values())
        in_use = load["allocator"].get("in_use", 0.0)
        workspace = in_use - load["ready_in_use"] - caches
        lines += ["", "Under the soak's load (medians over its last 75%):", "",
                  "| component | MiB | from |", "|---|--:|---|",
                  f"| RSS at ready (the soaked service) | {load['ready_rss']:.0f} | /metrics |",
                  *(f"| cache `{name}` | {mib:.1f} | r3_cache_bytes |"
                    for name, mib in load["caches"].items()),
                  f"| model workspace (oneDNN primitives per shape, tensors in flight) | {workspace:.0f} "
                  "| malloc in use, less at ready and the caches |",
                  f"| allocator: free inside arenas | {load['allocator'].get('free', 0.0):.0f} "
                  f"(at ready {load['ready_free']:.0f}) | mallinfo2 |",
                  f"| RSS under load | {load['rss']:.0f} (× {load['rss'] / load['ready_rss']:.2f} of ready) "
                  "| /metrics |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r3_tools.memory_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", type=Path, help="a soak report (OUT.json of scripts/soak.sh)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/memory"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = measure_ready()
    load = under_load(json.loads(args.soak.read_text())) if args.soak else None
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    table = markdown(rows, load, machine)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "ready": rows, "load": load},
                                                        indent=1))
    args.out.with_suffix(".md").write_text("# Where the memory is\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
