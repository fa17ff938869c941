"""One failure policy for every trainer adapter: a failed reward is never a fake zero.

The client retries connect errors, timeouts, 429 (honouring `Retry-After`) and 5xx with
exponential backoff, within a total deadline per request (`R3_DEADLINE_S`, default 600 s). When
that is spent, an adapter either

- raises `RewardUnavailable` (`R3_ON_FAILURE=raise`, the default): the run stops loudly, with
  the service URL, the cause and the items' ids in the message; or
- returns its framework's "no reward" value (`R3_ON_FAILURE=none`): `None` for TRL (GRPOTrainer
  turns it into NaN and leaves the completion out) and for OpenRLHF's reward file. Frameworks
  without such a value (verl, AReaL) refuse `none` with a clear error instead of scoring 0.0.

A factory's `on_failure=` / `deadline_s=` argument wins over the environment. Every failed item is
counted (`failure_count()`, `failure_stats()`) and logged with `logging.warning`, naming its id
(its index in the batch, plus data_source / uid / index when the framework gives them).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from ._core import R3ClientError

ON_FAILURE_ENV = "R3_ON_FAILURE"
DEADLINE_ENV = "R3_DEADLINE_S"
DEFAULT_DEADLINE_S = 600.0
POLICIES = ("raise", "none")

OnFailure = Literal["raise", "none"]

logger = logging.getLogger("r3_client.adapters")


class RewardUnavailable(R3ClientError):
    """The service gave no reward for these items after every retry and the deadline."""

    def __init__(self, message: str, *, url: str, items: Sequence[str]) -> None:
        super().__init__(message)
        self.url = url
        self.items = list(items)


@dataclass
class FailureStats:
    """Failed calls and items since start (or the last `reset_failures`), per process."""

    calls: int = 0
    items: int = 0


_stats = FailureStats()
_lock = threading.Lock()


def failure_count() -> int:
    """Items that got no reward from the service in this process."""
    return _stats.items


def failure_stats() -> FailureStats:
    """A copy of this process's failure counters."""
    with _lock:
        return FailureStats(_stats.calls, _stats.items)


def reset_failures() -> None:
    with _lock:
        _stats.calls = _stats.items = 0


def on_failure_policy(value: str | None, framework: str, *, has_no_reward_value: bool) -> OnFailure:
    """The policy from `value` or `R3_ON_FAILURE` (default "raise"), checked for `framework`."""
    policy = (value or os.environ.get(ON_FAILURE_ENV) or "raise").strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"{ON_FAILURE_ENV} / on_failure must be one of {', '.join(POLICIES)}, "
                         f"got {policy!r}")
    if policy == "none" and not has_no_reward_value:
        raise ValueError(
            f"on_failure='none' ({ON_FAILURE_ENV}=none) is not possible with {framework}: it has no "
            "'no reward' value, and a 0.0 would be a fake reward. Use 'raise' (the default)")
    return policy  # type: ignore[return-value]


def deadline_s(value: float | str | None = None) -> float:
    """Seconds for all retries of one request: `value`, else `R3_DEADLINE_S`, else 600."""
    raw = value if value is not None else os.environ.get(DEADLINE_ENV) or DEFAULT_DEADLINE_S
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{DEADLINE_ENV} / deadline_s must be a number of seconds, got {raw!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{DEADLINE_ENV} / deadline_s must be > 0, got {raw!r}")
    return seconds


def record_failure(error: BaseException, *, framework: str, url: str, items: Sequence[str]) -> None:
    """Count and log a call whose items got no reward."""
    with _lock:
        _stats.calls += 1
        _stats.items += len(items)
    logger.warning("r3 %s: no reward from %s for %d item(s) %s: %s",
                   framework, url, len(items), _ids(items), error)


def fail(error: BaseException, *, framework: str, url: str, items: Sequence[str]) -> NoReturn:
    """Count, log and raise `RewardUnavailable` from `error`."""
    record_failure(error, framework=framework, url=url, items=items)
    raise RewardUnavailable(
        f"r3 {framework}: the reward service at {url} gave no reward for {len(items)} item(s) "
        f"{_ids(items)}: {error}", url=url, items=items) from error


def _ids(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"
