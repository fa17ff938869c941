"""OpenRLHF entry point: `--reward.remote_url <this file>` (older releases: `--remote_rm_url`).

OpenRLHF loads a reward file by path (`importlib.util.spec_from_file_location`, see
openrlhf/utils/agent.py) and calls `reward_func(queries, prompts, labels)`; this file re-exports
the adapter with absolute imports. Set `R3_URL` (and optionally `R3_BACKEND`, `R3_API_KEY`,
`R3_ON_FAILURE=raise|none`, `R3_DEADLINE_S`) in the workers' environment.
"""

from r3_client.adapters import openrlhf_reward_func as reward_func

__all__ = ["reward_func"]
