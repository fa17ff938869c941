"""What the engine reports of each scored request, for operators watching for reward hacking:
the reward's parts (in `Scored`), how much of each response is copied from its query, and how
many responses were empty. Read off the resolved items: clean query, cleaned response."""

from __future__ import annotations

from collections.abc import Sequence

from r3_service.metrics import Metrics
from r3_service.rule.copying import copy_overlaps
from r3_service.rule.reward import ResolvedItem, Scored


def observe(metrics: Metrics, backend: str, items: Sequence[ResolvedItem], results: Sequence[Scored]) -> None:
    """Record one scored request of `backend` (`items` as resolved, before a preset's `prepare`)."""
    overlaps = copy_overlaps((item.query, item.response) for item in items)
    metrics.observe_scores(backend, results, overlaps, sum(not item.response for item in items))
