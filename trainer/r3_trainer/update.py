"""The update over one rollout, then `ppo_epochs` passes of the clipped losses in micro-batches.

- gae (the paper's PPO): shaped scores -> KL-penalised token rewards -> whitened GAE advantages;
  clipped policy and value losses.
- grpo: each reward standardised within its prompt's group is the advantage of every token of its
  response; clipped policy loss plus init_kl_coef x the k3 KL to the reference; no critic.

Each epoch is one optimizer step: the rollout is `gradient_accumulation_steps` micro-batches of
`batch_size` rows of similar length, and under DDP gradients are all-reduced only on the last.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator

from r3_trainer import ppo
from r3_trainer.config import TrainConfig
from r3_trainer.model import response_logprobs
from r3_trainer.rollout import Rollout, length_sorted_chunks, minibatch

LOSS_KEYS = {
    "gae": ("loss/policy", "loss/value", "policy/clipfrac", "policy/approx_kl", "value/clipfrac"),
    "grpo": ("loss/policy", "loss/kl", "policy/clipfrac", "policy/approx_kl"),
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
        kl_coef = self.kl_ctl.value
        kl = (rollout.logprobs - rollout.ref_logprobs) * mask
        if cfg.advantage_estimator == "grpo":
            shaped = ppo.group_advantages(raw, cfg.group_size)
            advantages, returns = shaped[:, None] * mask, torch.zeros_like(mask)
        else:
            shaped = self.shaper(raw, acc.gather(raw))
            token_rewards, _ = ppo.kl_penalized_rewards(shaped, rollout.logprobs, rollout.ref_logprobs,
                                                        mask, kl_coef)
            advantages, returns = ppo.gae(token_rewards, rollout.values, mask, cfg.gamma, cfg.lam)
            advantages = ppo.masked_whiten(advantages, mask) * mask
        losses = self._epochs(rollout, advantages, returns, kl_coef)
        seq_kl = acc.gather(kl.sum(1)).mean().item()
        self.kl_ctl.update(seq_kl, cfg.rollout_batch_size * acc.num_processes)
        stats = {key: acc.reduce(torch.tensor(value, device=acc.device), "mean").item()
                 for key, value in losses.items()}
        stats.update({"kl": seq_kl, "kl_coef": kl_coef, "kl_coef_next": self.kl_ctl.value,
                      "reward/shaped_mean": acc.gather(shaped).mean().item()})
        if cfg.advantage_estimator == "gae":
            value_sum = acc.reduce(torch.stack([(rollout.values * mask).sum(), mask.sum()]).double(), "sum")
            stats["value/mean"] = (value_sum[0] / value_sum[1]).item()
        else:
            stats["reward/zero_advantage_share"] = acc.gather((shaped == 0).float()).mean().item()
        return stats

    def _epochs(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                kl_coef: float) -> dict[str, float]:
        """All epochs' micro-batches (rows of similar length together: the gradient of an epoch is
        their sum, so grouping by length changes nothing but the padding computed); returns this
        process's mean of each loss statistic."""
        cfg = self.cfg
        self.model.train()
        keys = LOSS_KEYS[cfg.advantage_estimator]
        sums = dict.fromkeys(keys, 0.0)
        count = 0
        chunks = length_sorted_chunks(rollout.response_mask, cfg.batch_size)
        for _ in range(cfg.ppo_epochs):
            for k, idx in enumerate(chunks):
                sync = k == len(chunks) - 1
                values = self._micro_step(rollout, idx, advantages, returns, kl_coef, sync)
                for key, value in zip(keys, values, strict=True):
                    sums[key] += value
                count += 1
        return {key: value / count for key, value in sums.items()}

    def _micro_step(self, rollout: Rollout, idx: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor, kl_coef: float, sync: bool) -> list[float]:
        """Forward and backward on rows `idx`; an optimizer step when `sync`. Returns LOSS_KEYS' values."""
        cfg, acc = self.cfg, self.accelerator
        mb = minibatch(rollout, idx)
        r1, m = mb["response_ids"].shape[1], mb["response_mask"]
        # DDP: gradients are all-reduced only on the last micro-batch of an accumulation.
        with nullcontext() if sync else acc.no_sync(self.model):
            with acc.autocast():
                logprobs, values, _ = response_logprobs(self.model, mb["ids"], mb["mask"], mb["response_ids"])
                # Padding is 0 in the stored log-probs too (its own is ~ -3e38, which overflows exp).
                logprobs = logprobs.masked_fill(m == 0, 0.0)
                pg_loss, pg_clipfrac, approx_kl = ppo.policy_loss(
                    logprobs, mb["old_logprobs"], advantages[idx, :r1], m, cfg.cliprange)
                if cfg.advantage_estimator == "grpo":
                    second = ppo.masked_mean(ppo.kl_k3(logprobs, rollout.ref_logprobs[idx, :r1]), m)
                    loss, extra = pg_loss + kl_coef * second, []
                else:
                    second, vf_clipfrac = ppo.value_loss(
                        values, rollout.values[idx, :r1], returns[idx, :r1], m, cfg.cliprange_value)
                    loss, extra = pg_loss + cfg.vf_coef * second, [vf_clipfrac]
            # Each micro-batch's loss is a mean over its own tokens, weighted by its share of rows.
            acc.backward(loss * len(idx) / rollout.response_ids.shape[0])
        if sync:
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return [float(v.detach()) for v in (pg_loss, second, pg_clipfrac, approx_kl, *extra)]
