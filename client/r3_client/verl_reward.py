"""verl entry point: `reward.custom_reward_function.path=<this file>`.

verl loads a reward file by path, outside any package, so relative imports would fail there;
this file re-exports the adapters with absolute imports. `name=compute_score` (per sample) or
`compute_score_batch` (batch reward manager) are synchronous; `name=compute_score_async` is the
coroutine for verl's reward loop. Set `R3_URL` (and optionally `R3_BACKEND`, `R3_BACKENDS`,
`R3_API_KEY`, `R3_DEADLINE_S`) in the workers' environment.
"""

from r3_client.adapters import compute_score, compute_score_async, compute_score_batch

__all__ = ["compute_score", "compute_score_async", "compute_score_batch"]
