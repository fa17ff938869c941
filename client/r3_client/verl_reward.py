"""verl entry point: `reward.custom_reward_function.path=<this file>`.

verl loads a reward file by path, outside any package, so relative imports would fail there;
this file re-exports the adapters with absolute imports. Set `R3_URL` (and optionally
`R3_BACKEND`, `R3_API_KEY`) in the workers' environment.
"""

from r3_client.adapters import compute_score, compute_score_batch

__all__ = ["compute_score", "compute_score_batch"]
