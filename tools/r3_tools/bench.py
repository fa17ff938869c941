"""`r3-bench`: R3 scoring throughput and latency, four ways, on the same pairs in one run.

1. reference-style scorer: 8 pairs per forward, target and response padded together, fp32,
   unsorted, no dedup (how the paper's code scores);
2. sentence-transformers `encode` in-process on the same pairs;
3. the engine in-process (the batching scheduler, no HTTP);
4. the service over HTTP (`r3-serve` in its own process): N concurrent clients sending requests
   of k items, with GRPO-style groups (8 responses per prompt) and without.

Pairs are real AlpacaFarm prompts, reference answers and query types; a closed query's pair is
(reference, response), an open one's (query, response), exactly what R3 embeds. The embedding
cache is off for (3) and (4) (the run cycles over the same pairs): only dedup of work in flight
counts. Writes JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r3_service.engine.engine import RewardEngine
from r3_service.engine.resolve import RawItem
from r3_service.models.base import resolve_model_path
from r3_service.models.embedding import EmbeddingModel
from r3_service.settings import DEFAULT_MODEL, Settings
from r3_tools import fidelity, peers
from r3_tools.loadgen import (
    DATA,
    Pair,
    Target,
    Workload,
    closed_loop,
    make_pairs,
    open_loop,
    percentiles,
    scrape,
    start_server,
)


@dataclass
class Result:
    method: str
    grouped: bool
    pairs_per_s: float
    concurrency: int = 1
    items: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    mean_batch: float | None = None
    errors: int = 0
    x_default: float | None = None  # another backend's: median of its rate / the default's, per round


def timed(run: Callable[[], object], pairs: int) -> float:
    run()  # warm-up
    started = time.perf_counter()
    run()
    return pairs / (time.perf_counter() - started)


def reference_style(model: EmbeddingModel, pairs: list[Pair]) -> Callable[[], list[float]]:
    """8 pairs a forward, target and response padded together, fp32, in arrival order."""
    tokenizer, encoder = model.tokenizer, model.model

    @torch.inference_mode()
    def run() -> list[float]:
        scores = []
        for start in range(0, len(pairs), 8):
            chunk = pairs[start : start + 8]
            batch = tokenizer([p.target for p in chunk] + [p.response for p in chunk], padding=True,
                              truncation=True, max_length=model.max_length, return_tensors="pt")
            batch = {k: v.to(model.device) for k, v in batch.items()}
            hidden = encoder(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            scores += (pooled[: len(chunk)] * pooled[len(chunk) :]).sum(-1).tolist()
        return scores

    return run


def sentence_transformers_style(model_path: str, device: str, pairs: list[Pair]) -> Callable[[], object]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_path, device=device)
    if device.startswith("cuda"):
        st.half()

    def run() -> object:
        embeddings = st.encode([p.target for p in pairs] + [p.response for p in pairs],
                               batch_size=32, convert_to_tensor=True)
        return (embeddings[: len(pairs)] * embeddings[len(pairs) :]).sum(-1).tolist()

    return run


def engine_in_process(settings: Settings, pairs: list[Pair], items: int, concurrency: int,
                      backend_name: str | None = None) -> float:
    async def main() -> float:
        engine = await asyncio.to_thread(RewardEngine.from_settings, settings)
        engine.start()
        chunks = [[RawItem(p.query, p.response, p.reference, p.query_type)  # type: ignore[arg-type]
                   for p in pairs[i : i + items]] for i in range(0, len(pairs), items)]
        semaphore = asyncio.Semaphore(concurrency)
        backend = engine.backend(backend_name)

        async def one(chunk: list[RawItem]) -> None:
            async with semaphore:
                await engine.score(chunk, backend)

        await asyncio.gather(*(one(c) for c in chunks[: max(1, len(chunks) // 4)]))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        elapsed = time.perf_counter() - started
        await engine.close()
        return len(pairs) / elapsed

    return asyncio.run(main())


COST_ROUNDS = 3


def backend_cost(settings: Settings, pairs: list[Pair], name: str) -> tuple[float, float]:
    """Another backend's throughput as a share of the default's: measured in rounds that alternate
    the two, so a machine whose speed drifts (a shared CPU) weighs on both alike; the median of
    the rounds' ratios, and of the backend's rates."""
    rounds = [(engine_in_process(settings, pairs, items=64, concurrency=16),
               engine_in_process(settings, pairs, items=64, concurrency=16, backend_name=name))
              for _ in range(COST_ROUNDS)]
    return statistics.median(o / d for d, o in rounds), statistics.median(o for _, o in rounds)


def http_load(url: str, pairs: list[Pair], items: int, concurrency: int,
              duration: float) -> tuple[int, list[float], int]:
    """Closed loop: `concurrency` clients, each sending the next `items` pairs as soon as its
    previous request returns. Adjacent pairs (a GRPO group) are in flight together."""
    run = asyncio.run(closed_loop(Target(url), Workload.fixed(pairs, items), concurrency, duration))
    return int(run.items_ok / run.elapsed), run.latencies, run.errors


PEER_WORKLOADS = ((64, 1, False), (16, 8, True))  # (clients, pairs per request, GRPO groups)
PEER_ROUNDS = 2


def tagged(pairs: list[Pair], tag: str) -> list[Pair]:
    """The pairs with `tag` in every text, so that no cache on either side remembers a round."""
    return [Pair(f"{p.query} [{tag}]", f"{p.response} [{tag}]", p.reference and f"{p.reference} [{tag}]",
                 p.query_type) for p in pairs]


def peer_rounds(url: str, peer: str, dtype: str, settings: Settings, data: Path, duration: float,
                port: int, log: Path) -> list[Result]:
    """r3-serve and the peer (its weights in `dtype`) on the same workloads, alternated round by
    round with fresh texts; the median of the rounds for each, and the peer's rate as a share of
    r3-serve's."""
    model_path = resolve_model_path(settings.model)
    server = peers.start_infinity(model_path, port, log, dtype)
    rule = peers.ClientSideR3(settings)
    peer_url = f"http://127.0.0.1:{port}"
    results = []
    try:
        for clients, items, grouped in PEER_WORKLOADS:
            pool = make_pairs(data, 2 * clients * items * 8, grouped)
            peers.peer_load(peer_url, tagged(pool, "warm-up"), items, clients, 1.0, rule)
            r3_rates, peer_rates = [], []
            for round_ in range(PEER_ROUNDS):
                fresh = tagged(pool, f"r3 round {round_}")
                r3_rates.append(http_load(url, fresh, items, clients, duration)[0])
                peer_rates.append(peers.peer_load(peer_url, tagged(pool, f"peer round {round_}"), items,
                                                  clients, duration, rule))
            r3_rate, peer_rate = statistics.median(r3_rates), statistics.median(peer_rates)
            results.append(Result(f"peer:{peer} {dtype}", grouped, peer_rate, clients, items,
                                  x_default=peer_rate / r3_rate if r3_rate else None))
            print(f"peer {peer} {dtype}, {clients} clients x {items} pairs (groups={grouped}): "
                  f"{peer_rate:.1f} pairs/s against r3-serve's {r3_rate:.1f} "
                  f"(median of {PEER_ROUNDS} alternated rounds)",
                  flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return results


def random_bert_base(directory: Path) -> str:
    """facebook/contriever's architecture (bert-base, 768-d) with random weights: speed only."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    tokenizer.model_max_length = 512
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def full_batch_seconds(model: EmbeddingModel, settings: Settings, pairs: list[Pair]) -> float:
    """Time of one forward at the token budget, on this text."""
    from r3_service.engine.pool import batch_limits

    limits = batch_limits(settings, model)
    sequences = model.tokenize([p.response for p in pairs])
    sequences.sort(key=len, reverse=True)
    size = max(1, min(limits.max_size, limits.max_tokens // len(sequences[0])))
    batch = (sequences * (size // len(sequences) + 1))[:size]
    model.forward(batch)
    started = time.perf_counter()
    model.forward(batch)
    return time.perf_counter() - started


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (+{os.cpu_count()} CPU cores)"
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(results: list[Result], reference: dict[bool, float], st: dict[bool, float]) -> str:
    lines = [f"{'method':<22}{'groups':>7}{'conc':>6}{'items':>6}{'pairs/s':>10}{'x ref':>8}{'x ST':>8}"
             f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}{'err':>5}"]
    for r in results:
        lat = r.latency_ms
        lines.append(
            f"{r.method:<22}{'8/grp' if r.grouped else 'none':>7}{r.concurrency:>6}{r.items or '-':>6}"
            f"{r.pairs_per_s:>10.0f}{r.pairs_per_s / reference[r.grouped]:>8.2f}"
            f"{r.pairs_per_s / st[r.grouped]:>8.2f}"
            + "".join(f"{lat[k]:>9.1f}" if k in lat else f"{'-':>9}" for k in ("p50", "p95", "p99"))
            + (f"{r.mean_batch:>7.1f}" if r.mean_batch else f"{'-':>7}") + f"{r.errors:>5}")
    return "\n".join(lines)


def markdown(results: list[Result], reference: dict[bool, float], st: dict[bool, float]) -> str:
    """The same table as Markdown, for the README."""
    rows = ["| method | GRPO groups | clients | items/request | pairs/s | × reference | × ST "
            "| × default backend (a peer: × r3-serve) | p50 ms | p99 ms | mean batch |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        lat = r.latency_ms
        rows.append(f"| {r.method} | {'yes' if r.grouped else 'no'} | {r.concurrency} | {r.items or '-'} "
                    f"| {r.pairs_per_s:.0f} | {r.pairs_per_s / reference[r.grouped]:.2f} "
                    f"| {r.pairs_per_s / st[r.grouped]:.2f} "
                    f"| {'-' if r.x_default is None else f'{r.x_default:.2f}'} "
                    f"| {lat.get('p50', 0):.0f} | {lat.get('p99', 0):.0f} "
                    f"| {r.mean_batch or 0:.1f} |".replace("| 0 | 0 | 0.0 |", "| - | - | - |"))
    return "\n".join(rows)


def plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    http = [r for r in results if r.method == "service-http"]
    for grouped in (False, True):
        for items in sorted({r.items for r in http}):
            series = sorted((r for r in http if r.grouped == grouped and r.items == items),
                            key=lambda r: r.concurrency)
            if not series:
                continue
            label = f"{items} items/request{', GRPO groups' if grouped else ''}"
            style = "-" if grouped else "--"
            left.plot([r.concurrency for r in series], [r.pairs_per_s for r in series], style,
                      marker="o", label=label)
            right.plot([r.concurrency for r in series], [r.latency_ms.get("p99", 0) for r in series],
                       style, marker="o", label=label)
    for method, color in (("reference-style", "grey"), ("sentence-transformers", "black")):
        for r in results:
            if r.method == method:
                left.axhline(r.pairs_per_s, color=color, linestyle=":" if r.grouped else "-.",
                             linewidth=1, label=f"{method}{' (groups)' if r.grouped else ''}")
    for axis, ylabel in ((left, "pairs/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r3-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--random-bert-base", action="store_true",
                        help="use a randomly initialised bert-base (Contriever's architecture)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the engine's and service's dtype (the baselines stay as specified)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the engine's encoder")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--pairs", type=int, default=512, help="pairs per in-process measurement")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--items", default="1,8,64")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per HTTP scenario")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--url", help="measure the service already running here (e.g. a Ray Serve "
                                      "ingress started with R3_EMBEDDING_CACHE_SIZE=0 and "
                                      "R3_MAX_QUEUE_TOKENS=1000000000) instead of starting r3-serve")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--backend", action="append",
                        help="also measure the engine in process with this backend (repeatable), e.g. "
                             "r3-guarded: its throughput beside the default backend's")
    parser.add_argument("--peer", choices=["infinity"],
                        help=f"also measure infinity-emb {peers.INFINITY_VERSION} serving the same model (R3 "
                             "computed client-side) on two HTTP workloads, alternated with r3-serve")
    parser.add_argument("--peer-dtype", default="float32", metavar="DTYPE[,DTYPE]",
                        help="with --peer: the peer's weights' dtype(s), each measured in its own rounds "
                             "(float32, bfloat16, float16)")
    parser.add_argument("--fidelity", metavar="DTYPE[,DTYPE]",
                        help="instead of speed: what each dtype does to the rewards of GRPO groups "
                             "against fp32 (order, best answer, advantages); writes OUT.json and OUT.md")
    parser.add_argument("--groups", type=int, default=40, help="with --fidelity: groups of 8 of each kind")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest"),
                        help="writes OUT.json and OUT.png")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.fidelity:
        settings = Settings(model=args.model, device=args.device, embedding_cache_size=0,
                            max_queue_tokens=10**9)
        fidelity.run(settings, args.fidelity.split(","), args.data, args.groups,
                     (args.backend or [None])[0], args.out, machine())
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        model_name = random_bert_base(Path(scratch)) if args.random_bert_base else args.model
        env = {"R3_MODEL": model_name, "R3_DEVICE": args.device, "R3_DTYPE": args.dtype,
               "R3_COMPILE": str(args.compile).lower(),
               "R3_EMBEDDING_CACHE_SIZE": "0", "R3_MAX_QUEUE_TOKENS": str(10**9)}
        settings = Settings(model=model_name, device=args.device, dtype=args.dtype, compile=args.compile,
                            embedding_cache_size=0, max_queue_tokens=10**9)
        model = EmbeddingModel(model_name, device=args.device, dtype="float32")
        device = str(model.device)
        results: list[Result] = []
        reference: dict[bool, float] = {}
        st: dict[bool, float] = {}
        pair_sets = {grouped: make_pairs(args.data, args.pairs, grouped) for grouped in (False, True)}
        for grouped, pairs in pair_sets.items():
            reference[grouped] = timed(reference_style(model, pairs), len(pairs))
            results.append(Result("reference-style", grouped, reference[grouped]))
            path = model_name if args.random_bert_base else resolve_model_path(model_name)
            st[grouped] = timed(sentence_transformers_style(path, device, pairs), len(pairs))
            results.append(Result("sentence-transformers", grouped, st[grouped]))
            rate = engine_in_process(settings, pairs, items=64, concurrency=16)
            results.append(Result("engine-in-process", grouped, rate, concurrency=16, items=64))
            for name in args.backend or ():  # the same measurement on other backends, for their cost
                ratio, other = backend_cost(settings, pairs, name)
                results.append(Result(f"engine-in-process[{name}]", grouped, other, concurrency=16, items=64,
                                      x_default=ratio))
                print(f"in-process, groups={grouped}, backend {name}: {other:.0f} pairs/s "
                      f"({ratio:.2f} x the default backend's, median of {COST_ROUNDS} alternated rounds)",
                      flush=True)
            print(f"in-process, groups={grouped}: ref {reference[grouped]:.0f}, ST {st[grouped]:.0f}, "
                  f"engine {rate:.0f} pairs/s", flush=True)
        engine_model = EmbeddingModel(model_name, device=args.device, dtype=args.dtype)
        batch_s = full_batch_seconds(engine_model, settings, pair_sets[False])
        engine_dtype = engine_model.info.dtype
        del model, engine_model

        half_load: dict[str, float] = {}
        concurrencies = [int(x) for x in args.concurrency.split(",")]
        sizes = [int(x) for x in args.items.split(",")]
        # Twice what can be in flight at once: a request never meets its own texts again.
        http_pairs = {grouped: make_pairs(args.data, max(args.pairs, 2 * max(concurrencies) * max(sizes)),
                                          grouped) for grouped in (False, True)}
        if not args.skip_http:
            url = args.url or f"http://127.0.0.1:{args.port}"
            server = None if args.url else start_server(env, args.port)
            try:
                peak64 = 0.0
                for grouped, pairs in http_pairs.items():
                    for items in sizes:
                        for concurrency in concurrencies:
                            http_load(url, pairs, items, concurrency, 1.0)  # warm-up
                            before = scrape(url)
                            rate, latencies, errors = http_load(url, pairs, items, concurrency, args.duration)
                            after = scrape(url)
                            batches = after["r3_batch_size_count"] - before["r3_batch_size_count"]
                            sequences = after["r3_batch_size_sum"] - before["r3_batch_size_sum"]
                            result = Result("service-http", grouped, rate, concurrency, items,
                                            percentiles(latencies),
                                            sequences / batches if batches else None, errors)
                            results.append(result)
                            if items == 64 and not grouped:
                                peak64 = max(peak64, rate)
                            print(f"http groups={grouped} items={items} conc={concurrency}: {rate} pairs/s "
                                  f"p99 {result.latency_ms.get('p99', 0):.0f} ms", flush=True)
                for peer_dtype in args.peer_dtype.split(",") if args.peer else []:
                    results += peer_rounds(url, args.peer, peer_dtype, settings, args.data, args.duration,
                                           args.port + 1, args.out.with_suffix(f".peer-{peer_dtype}.log"))
                if peak64:
                    half = asyncio.run(open_loop(Target(url), Workload.fixed(http_pairs[False], 64),
                                                      0.5 * peak64 / 64, args.duration * 2))
                    latencies, errors = half.latencies, half.errors
                    half_load = {"rate_pairs_per_s": 0.5 * peak64, **percentiles(latencies),
                                 "errors": errors, "full_batch_ms": batch_s * 1000}
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(30)

    name = "bert-base (random)" if args.random_bert_base else model_name
    title = f"r3-bench: {name}, engine {engine_dtype}{' compiled' if args.compile else ''}, on {machine()}"
    print("\n" + title)
    print(table(results, reference, st))
    if half_load:
        print(f"\nhalf of peak (64-item requests, open loop at {half_load['rate_pairs_per_s']:.0f} pairs/s): "
              f"p99 {half_load.get('p99', 0):.0f} ms vs one full batch {half_load['full_batch_ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "model": "bert-base (random)" if args.random_bert_base else model_name,
              "device": device, "dtype": engine_dtype, "compiled": args.compile, "pairs": args.pairs,
              "duration_s": args.duration,
              "results": [asdict(r) for r in results], "half_load": half_load,
              "full_batch_ms": batch_s * 1000, "date": time.strftime("%Y-%m-%d")}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    plot(results, args.out.with_suffix(".png"), title)
    args.out.with_suffix(".md").write_text(f"{title}\n\n{markdown(results, reference, st)}\n")
    print(f"\nwrote {args.out}.json, .png and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
