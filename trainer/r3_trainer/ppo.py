"""PPO arithmetic, free of models and I/O: KL control, score shaping, GAE, the clipped losses.

The formulas follow the reference trainer the paper used (the old TRL `PPOTrainer`), so a run
here is comparable with the paper's: per-token KL penalty with the score added on the last
response token, GAE over the response, whitened advantages, clipped policy and value losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r3_service.rule.moments import RunningMoments


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over the unmasked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return masked_mean((values - mean) ** 2, mask) * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the unmasked entries (masked entries are left meaningless)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    return (values - mean) * torch.rsqrt(var + eps)


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the policy's KL drifts toward `target`.

    coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon, where n_steps is the
    number of rollouts the KL was measured on.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(AdaptiveKLController):
    """A constant coefficient (`adaptive_kl: false`)."""

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclass
class ScoreShaper:
    """raw score -> minus reward_baseline -> running scaling (and normalisation) -> clip.

    The service returns raw R3; shaping is the trainer's side (spec, "The reward"). The running
    moments are the service's own (an ensemble's `running` standardisation uses them too).
    """

    use_scaling: bool = True
    use_norm: bool = True
    clip: float | None = 10.0
    baseline: float = 0.0

    def __post_init__(self) -> None:
        self.running = RunningMoments()

    def __call__(self, scores: torch.Tensor, all_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Shape `scores`; `all_scores` (every process's batch) updates the running moments."""
        scores = scores.double() - self.baseline
        if self.use_scaling:
            batch = scores if all_scores is None else all_scores.double() - self.baseline
            self.running.update(batch.tolist())
            scale = self.running.sample_std + torch.finfo(torch.float32).eps  # TRL's: Bessel-corrected
            scores = (scores - self.running.mean) / scale if self.use_norm else scores / scale
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores.float()


def kl_penalized_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - ref_logp) on every token, + score on the last one.

    Returns (rewards, per-token kl), both zero on masked tokens. Every row needs >= 1 token.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(dim=1) == mask.sum(dim=1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.float() * scores[:, None]
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses -> (advantages, returns).

    The value after the last real token is 0 (the episode ends there).
    """
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate -> (loss, clip fraction, approx KL old->new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2) -> (loss, clip fraction)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    losses = (values - returns) ** 2
    clipped_losses = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, clipped_losses), mask)
    clipfrac = masked_mean((clipped_losses > losses).float(), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits), in nats."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al., 2024): each reward minus its group's mean, over the group's standard
    deviation; rows are grouped consecutively. A group whose samples tie gets advantage 0."""
    groups = rewards.double().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).view(-1).float()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1 with d = ref - policy (Schulman's
    k3): unbiased on samples from the policy, never negative, and differentiable for the loss."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0
