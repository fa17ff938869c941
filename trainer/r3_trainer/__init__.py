"""PPO trainer (transformers + peft + accelerate) whose rollout rewards come from an r3 service.

    from r3_trainer import PPOTrainer, load_config
    trainer = PPOTrainer(load_config("trainer/configs/tiny-cpu.yaml"), resume=False)
    history = trainer.train()  # one dict per step, also in <output_dir>/log.jsonl
    trainer.close()

or `r3-train --config CONFIG.yaml [--resume]`. Names are imported lazily, so `r3-train --plot`
and config checks do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from r3_client import __version__

_EXPORTS = {
    "TrainConfig": "r3_trainer.config",
    "ConfigError": "r3_trainer.config",
    "load_config": "r3_trainer.config",
    "PPOTrainer": "r3_trainer.trainer",
    "latest_checkpoint": "r3_trainer.checkpoint",
    "RewardServiceError": "r3_trainer.rewards",
    "RewardScorer": "r3_trainer.rewards",
    "plot_log": "r3_trainer.plot",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'r3_trainer' has no attribute {name!r}")
