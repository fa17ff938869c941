"""What the engine reports of each scored request, for operators watching for reward hacking:
the reward's parts (in `Scored`), how much of each response is copied from its query, how many
responses were empty, and what the hack detectors (`rule.guards`) mark. Read off the resolved
items: clean query, cleaned response, each response split once."""

from __future__ import annotations

from collections.abc import Sequence

from r3_service.metrics import Metrics
from r3_service.rule.copying import copy_shares
from r3_service.rule.guards import REASONS, Tokenised, detect, tokenise
from r3_service.rule.reward import ResolvedItem, Scored


def observe(metrics: Metrics, backend: str, items: Sequence[ResolvedItem], results: Sequence[Scored]) -> None:
    """Record one scored request of `backend` (`items` as resolved, before a preset's `prepare`)."""
    texts = [tokenise(item.response) for item in items]
    overlaps = copy_shares((item.query, text.tokens) for item, text in zip(items, texts, strict=True))
    tokens = 0
    unpaid = dict.fromkeys(REASONS, 0)
    flagged = dict.fromkeys(REASONS, 0)
    for item, scored, text in zip(items, results, texts, strict=True):
        counts = marked(item, text, scored) if text.tokens else {}
        tokens += len(text.tokens)
        for reason, count in counts.items():
            unpaid[reason] += count
            flagged[reason] += count > 0
    metrics.observe_scores(backend, results, overlaps, sum(not item.response for item in items))
    metrics.observe_detections(backend, tokens, unpaid, flagged)


def marked(item: ResolvedItem, text: Tokenised, scored: Scored) -> dict[str, int]:
    """Tokens per reason: a guarded backend's own detection (filler included), else the
    pure-Python detectors run here."""
    shares = scored.unpaid
    if shares is None:
        shares = detect(item.query, text, item.reference if item.query_type == "closed" else None).shares
    return {reason: round(share * len(text.tokens)) for reason, share in shares.items()}
