"""`r3-calibrate`: propose an embedding model's relevance input range for R3's closed branch.

The closed branch pays f(S(ŷ, y))·RP(y), the open branch LI(y)·S(x, y)·RP(y); f maps the input
range linearly onto [0, max_rollout_tokens / 100]. Contriever's [0, 3.5] (spec) puts the two on
one scale; any other model needs its own range. This tool picks the range whose map sends two
quantiles of the closed branch's S onto the same quantiles of the open branch's reward.

Responses come from the dataset's `response` field when it has one (e.g. SFT samples: the best
calibration). Without it, each reference answer stands in for a good response: the open branch
scores LI(ŷ)·S(x, ŷ)·RP(ŷ), and the closed branch's S(ŷ, y) is approximated by S(x, ŷ), the
relevance of an answer to its own query.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from r3_service.models.embedding import EmbeddingModel
from r3_service.rule.datasets import RecordError, iter_json_values, parse_record
from r3_service.rule.features import features
from r3_service.settings import DEFAULT_MODEL

SHOWN_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


@dataclass(frozen=True)
class Example:
    query: str
    reference: str
    response: str | None
    closed: bool


@dataclass(frozen=True)
class Calibration:
    relevance_in_range: tuple[float, float]
    quantiles: tuple[float, float]
    closed_relevance: torch.Tensor  # S on the closed branch's sample
    open_rewards: torch.Tensor  # LI·S·RP on the open branch's sample
    closed_rp: torch.Tensor
    out_hi: float
    responses: bool

    def closed_rewards(self, in_range: tuple[float, float]) -> torch.Tensor:
        lo, hi = in_range
        return (self.closed_relevance - lo) / (hi - lo) * self.out_hi * self.closed_rp


def read_examples(path: Path) -> tuple[list[Example], int]:
    """Records with a reference answer (others cannot calibrate anything); also the skipped count."""
    examples: list[Example] = []
    skipped = 0
    for line, value in iter_json_values(path.read_text(encoding="utf-8")):
        try:
            if isinstance(value, Exception):
                raise RecordError(str(value))
            query, record = parse_record(value, line)
        except RecordError:
            skipped += 1
            continue
        response = value.get("response") if isinstance(value, dict) else None
        if record.reference is None or (response is not None and not isinstance(response, str)):
            skipped += 1
            continue
        examples.append(Example(query, record.reference, response, record.query_type == "closed"))
    return examples, skipped


def relevance(model: EmbeddingModel, left: list[str], right: list[str]) -> torch.Tensor:
    return (model.embed(left) * model.embed(right)).sum(dim=-1)


def calibrate(model: EmbeddingModel, examples: list[Example], *, max_rollout_tokens: int = 512,
              quantiles: tuple[float, float] = (0.1, 0.9)) -> Calibration:
    with_responses = all(e.response is not None for e in examples)
    opened = [e for e in examples if not e.closed] or examples
    closed = [e for e in examples if e.closed] or examples
    if with_responses:
        open_y = [e.response or "" for e in opened]
        closed_s = relevance(model, [e.reference for e in closed], [e.response or "" for e in closed])
        closed_rp = torch.tensor([features(e.response or "").repetition_penalty for e in closed])
    else:
        open_y = [e.reference for e in opened]
        closed_s = relevance(model, [e.query for e in closed], [e.reference for e in closed])
        closed_rp = torch.tensor([features(e.reference).repetition_penalty for e in closed])
    open_f = [features(y) for y in open_y]
    open_s = relevance(model, [e.query for e in opened], open_y)
    open_r = torch.tensor([f.length_incentive * f.repetition_penalty for f in open_f]) * open_s
    out_hi = max_rollout_tokens / 100.0
    s_lo, s_hi = (float(torch.quantile(closed_s, q)) for q in quantiles)
    r_lo, r_hi = (float(torch.quantile(open_r, q)) for q in quantiles)
    if not (s_hi > s_lo and r_hi > r_lo):
        raise ValueError("the sample's quantiles coincide: use more (and more varied) records")
    span = (s_hi - s_lo) * out_hi / (r_hi - r_lo)  # f(s_lo) = r_lo and f(s_hi) = r_hi
    lo = s_lo - r_lo * span / out_hi
    return Calibration((lo, lo + span), quantiles, closed_s, open_r, closed_rp, out_hi, with_responses)


def report(result: Calibration, model: EmbeddingModel, default: tuple[float, float]) -> str:
    def row(name: str, values: torch.Tensor) -> str:
        cells = " | ".join(f"{float(torch.quantile(values, q)):.3f}" for q in SHOWN_QUANTILES)
        return f"| {name} | {cells} |"

    lo, hi = result.relevance_in_range
    header = " | ".join(f"q{round(q * 100):02d}" for q in SHOWN_QUANTILES)
    sample = ("the dataset's responses" if result.responses
              else "reference answers as responses; closed-branch S approximated by S(query, reference)")
    return "\n".join([
        f"model: {model.info.model} (normalize={model.normalize}); sample: {sample}",
        f"matched quantiles: {result.quantiles[0]:g} and {result.quantiles[1]:g}; "
        f"output range [0, {result.out_hi:g}]",
        "",
        f"| sample | {header} |",
        "|---|" + "---|" * len(SHOWN_QUANTILES),
        row(f"closed S ({len(result.closed_relevance)})", result.closed_relevance),
        row(f"open reward LI·S·RP ({len(result.open_rewards)})", result.open_rewards),
        row(f"closed reward, default range [{default[0]:g}, {default[1]:g}]", result.closed_rewards(default)),
        row(f"closed reward, proposed range [{lo:.3f}, {hi:.3f}]", result.closed_rewards((lo, hi))),
        "",
        "Proposed, for the backend in the deployment config:",
        f"    relevance_in_range: [{lo:.3f}, {hi:.3f}]",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r3-calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="JSON/JSONL records: query, reference, query type "
                                                "(and optionally response)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedding model: path or hub id")
    parser.add_argument("--normalize", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--max-rollout-tokens", type=int, default=512)
    parser.add_argument("--quantiles", default="0.1,0.9", help="the two quantiles to match")
    parser.add_argument("--limit", type=int, default=None, help="use the first N usable records")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the proposal as JSON only")
    args = parser.parse_args(argv)
    try:
        quantiles = tuple(float(q) for q in args.quantiles.split(","))
        if len(quantiles) != 2 or not 0 <= quantiles[0] < quantiles[1] <= 1:
            raise ValueError
    except ValueError:
        parser.error("--quantiles takes two increasing numbers in [0, 1], e.g. 0.1,0.9")
    if not args.data.is_file():
        parser.error(f"no such file: {args.data}")
    examples, skipped = read_examples(args.data)
    examples = examples[: args.limit]
    if len(examples) < 10:
        parser.error(f"{args.data}: {len(examples)} usable records (with a reference answer); "
                     "need 10 or more")
    normalize = None if args.normalize == "auto" else args.normalize == "true"
    model = EmbeddingModel(args.model, normalize=normalize, device=args.device)
    try:
        result = calibrate(model, examples, max_rollout_tokens=args.max_rollout_tokens,
                           quantiles=quantiles)  # type: ignore[arg-type]
    except ValueError as error:
        print(f"r3-calibrate: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"relevance_in_range": list(result.relevance_in_range), "records": len(examples)}))
        return 0
    default = (0.0, 1.0) if model.normalize else (0.0, 3.5)
    print(f"{len(examples)} records used, {skipped} skipped (no reference answer or invalid)")
    print(report(result, model, default))
    return 0


if __name__ == "__main__":
    sys.exit(main())
