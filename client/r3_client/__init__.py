"""Light client for the r3 reward service (stdlib + httpx only; no torch needed).

    from r3_client import RewardClient
    with RewardClient("http://127.0.0.1:8000") as client:
        rewards = client.score([("What is 2+2?", "4")])

Trainer adapters (TRL reward functions, verl `compute_score`) live in `r3_client.adapters`.
"""

from ._async import AsyncRewardClient
from ._core import (
    DEFAULT_BASE_URL,
    RETRY_STATUSES,
    Components,
    R3ClientError,
    R3HTTPError,
    RetryPolicy,
    RewardItem,
    ScoredBatch,
    __version__,
    parse_retry_after,
)
from ._sync import RewardClient

__all__ = [
    "DEFAULT_BASE_URL",
    "RETRY_STATUSES",
    "AsyncRewardClient",
    "Components",
    "R3ClientError",
    "R3HTTPError",
    "RetryPolicy",
    "RewardClient",
    "RewardItem",
    "ScoredBatch",
    "__version__",
    "parse_retry_after",
]
