"""PPO trainer that takes its rollout rewards from the r3 service (built in a later issue)."""

__version__ = "0.1.0"
