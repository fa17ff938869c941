"""The PPO update over one rollout: shaped scores -> KL-penalised token rewards -> whitened GAE
advantages -> `ppo_epochs` passes of clipped policy and value losses in micro-batches.

Each epoch is one optimizer step: the rollout is `gradient_accumulation_steps` micro-batches of
`batch_size`, and under DDP gradients are all-reduced only on the last of them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator

from r3_trainer import ppo
from r3_trainer.config import TrainConfig
from r3_trainer.model import response_logprobs
from r3_trainer.rollout import Rollout

LOSS_KEYS = ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "value/clipfrac")


def minibatch(rollout: Rollout, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx`, with columns that are padding in every row cut off (less compute)."""
    prompt_mask = rollout.prompt_mask[idx]
    response_mask = rollout.response_mask[idx]
    p0 = int((prompt_mask.sum(0) > 0).nonzero()[0])
    r1 = int(response_mask.sum(1).max())
    return {
        "ids": torch.cat([rollout.prompt_ids[idx, p0:], rollout.response_ids[idx, :r1]], dim=1),
        "mask": torch.cat([prompt_mask[:, p0:], response_mask[:, :r1].long()], dim=1),
        "response_ids": rollout.response_ids[idx, :r1],
        "response_mask": response_mask[:, :r1],
        "old_logprobs": rollout.logprobs[idx, :r1],
    }


class PPOUpdate:
    """Owns what persists between updates: the KL controller and the running score statistics."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> None:
        self.cfg, self.accelerator, self.model, self.optimizer = cfg, accelerator, model, optimizer
        kl_cls = ppo.AdaptiveKLController if cfg.adaptive_kl else ppo.FixedKLController
        self.kl_ctl = kl_cls(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.shaper = ppo.ScoreShaper(cfg.use_score_scaling, cfg.use_score_norm, cfg.score_clip,
                                      cfg.reward_baseline)

    def __call__(self, rollout: Rollout, rewards: list[float]) -> dict[str, float]:
        """Train on `rollout` whose raw rewards are `rewards`; returns the step's stats."""
        acc, cfg, mask = self.accelerator, self.cfg, rollout.response_mask
        raw = torch.tensor(rewards, dtype=torch.float32, device=acc.device)
        shaped = self.shaper(raw, acc.gather(raw))
        kl_coef = self.kl_ctl.value
        token_rewards, kl = ppo.kl_penalized_rewards(shaped, rollout.logprobs, rollout.ref_logprobs, mask,
                                                     kl_coef)
        advantages, returns = ppo.gae(token_rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = ppo.masked_whiten(advantages, mask) * mask
        losses = self._epochs(rollout, advantages, returns)
        seq_kl = acc.gather(kl.sum(1)).mean().item()
        self.kl_ctl.update(seq_kl, cfg.rollout_batch_size * acc.num_processes)
        stats = {key: acc.reduce(torch.tensor(value, device=acc.device), "mean").item()
                 for key, value in losses.items()}
        stats.update({"kl": seq_kl, "kl_coef": kl_coef, "kl_coef_next": self.kl_ctl.value,
                      "reward/shaped_mean": acc.gather(shaped).mean().item()})
        value_sum = acc.reduce(torch.stack([(rollout.values * mask).sum(), mask.sum()]).double(), "sum")
        stats["value/mean"] = (value_sum[0] / value_sum[1]).item()
        return stats

    def _epochs(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """All epochs' micro-batches; returns this process's mean of each loss statistic."""
        cfg = self.cfg
        self.model.train()
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        count = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rollout.response_ids.shape[0], device=self.accelerator.device)
            for k in range(cfg.gradient_accumulation_steps):
                idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
                sync = k == cfg.gradient_accumulation_steps - 1
                values = self._micro_step(rollout, idx, advantages, returns, sync)
                for key, value in zip(LOSS_KEYS, values, strict=True):
                    sums[key] += value
                count += 1
        return {key: value / count for key, value in sums.items()}

    def _micro_step(self, rollout: Rollout, idx: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor, sync: bool) -> list[float]:
        """Forward and backward on rows `idx`; an optimizer step when `sync`. Returns LOSS_KEYS' values."""
        cfg, acc = self.cfg, self.accelerator
        mb = minibatch(rollout, idx)
        r1, m = mb["response_ids"].shape[1], mb["response_mask"]
        # DDP: gradients are all-reduced only on the last micro-batch of an accumulation.
        with nullcontext() if sync else acc.no_sync(self.model):
            with acc.autocast():
                logprobs, values, _ = response_logprobs(self.model, mb["ids"], mb["mask"], mb["response_ids"])
                pg_loss, pg_clipfrac, approx_kl = ppo.policy_loss(
                    logprobs, mb["old_logprobs"], advantages[idx, :r1], m, cfg.cliprange)
                vf_loss, vf_clipfrac = ppo.value_loss(
                    values, rollout.values[idx, :r1], returns[idx, :r1], m, cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
            acc.backward(loss / cfg.gradient_accumulation_steps)
        if sync:
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return [float(v.detach()) for v in (pg_loss, vf_loss, pg_clipfrac, approx_kl, vf_clipfrac)]
