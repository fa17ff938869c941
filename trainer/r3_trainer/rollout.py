"""Experience making: prompts -> sampled responses -> rewards sent off -> log-probs and values.

A rollout's rewards are requested as soon as its texts are decoded, so the service scores them
while the behaviour and reference log-probs are computed. `RolloutPipeline` goes one step further
when asked (`overlap_generation`): it samples batch t+1 before batch t is trained on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from r3_client import RewardItem
from r3_trainer import ppo
from r3_trainer.config import TrainConfig
from r3_trainer.data import Record, clean_rollout, prompt_format
from r3_trainer.model import PolicyWithValueHead, end_token_ids, generation_config, response_logprobs
from r3_trainer.rewards import PendingRewards, RewardScorer, RewardServiceError, ScoredRewards


@dataclass
class Rollout:
    """One step's samples, with everything PPO needs from the policy that sampled them."""

    records: list[Record]
    position: int  # where this batch starts in the prompt order (all processes together)
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, R) right-padded with the pad token
    response_mask: torch.Tensor  # float, 1 on generated tokens (eos included)
    texts: list[str]  # cleaned responses, as scored
    logprobs: torch.Tensor  # (B, R) behaviour policy
    ref_logprobs: torch.Tensor  # (B, R) adapters off
    values: torch.Tensor  # (B, R)
    entropy: float
    ended: float  # fraction that stopped before max_new_tokens (eos or stop string)
    policy_step: int  # the update count of the policy that sampled it
    generation_s: float
    forward_s: float
    rewards: PendingRewards | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.response_mask.sum().item())


def reward_scorer(cfg: TrainConfig) -> RewardScorer:
    return RewardScorer(
        cfg.reward_url, backend=cfg.reward_backend, deadline_s=cfg.reward_deadline_s,
        timeout_s=cfg.reward_timeout_s, max_retries=cfg.reward_max_retries,
        backoff_s=cfg.reward_backoff_s, max_backoff_s=cfg.reward_max_backoff_s,
        chunk_size=cfg.reward_chunk_size, max_concurrency=cfg.reward_max_concurrency,
        api_key=os.environ.get("R3_API_KEY"),  # a secret: from the environment, never the config
    )


def reward_items(records: list[Record], texts: list[str]) -> list[RewardItem]:
    return [RewardItem(r.query, text, r.reference, r.query_type)
            for r, text in zip(records, texts, strict=True)]


class RolloutMaker:
    """Samples from the policy and scores what it sampled; `model` is the accelerate-prepared policy."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, tokenizer: PreTrainedTokenizerBase,
                 model: torch.nn.Module, scorer: RewardScorer) -> None:
        self.cfg, self.accelerator, self.tokenizer = cfg, accelerator, tokenizer
        self.model, self.scorer = model, scorer
        self.format = prompt_format(cfg.chat_template, cfg.system_prompt, tokenizer)
        stops = self.format.stops
        eos_ids = end_token_ids(tokenizer, stops)
        self.generation_config = generation_config(cfg, tokenizer, eos_ids)
        # Multi-token stop strings end a rollout too (single-token ones are already eos ids).
        vocab = tokenizer.get_vocab()
        self.generation_config.stop_strings = [s for s in stops if vocab.get(s) not in eos_ids] or None

    @property
    def policy(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    def make(self, records: list[Record], position: int, policy_step: int) -> Rollout:
        """Sample `records`' responses, send them to be scored, then compute what PPO needs."""
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, response_ids, response_mask = self.generate(records)
        t1 = time.perf_counter()
        texts = self.decode(response_ids, response_mask)
        pending = self.scorer.submit(reward_items(records, texts))
        logprobs, ref_logprobs, values, entropy = self._forward(prompt_ids, prompt_mask, response_ids,
                                                                response_mask)
        lengths = response_mask.sum(1)
        return Rollout(
            records=records, position=position, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=response_ids, response_mask=response_mask, texts=texts, logprobs=logprobs,
            ref_logprobs=ref_logprobs, values=values, entropy=entropy,
            ended=(lengths < self.cfg.max_new_tokens).float().mean().item(), policy_step=policy_step,
            generation_s=t1 - t0, forward_s=time.perf_counter() - t1, rewards=pending,
        )

    def encode_prompts(self, records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the templated prompts, BOS first, left-truncated and left-padded."""
        texts = [self.format.render(r.query) for r in records]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_token_type_ids=False)["input_ids"]
        bos_id = self.tokenizer.bos_token_id
        # A chat template that starts with the BOS token (ChatML's <|im_start|>) has it already.
        bos = [bos_id] if self.cfg.add_bos and bos_id is not None and encoded[0][:1] != [bos_id] else []
        keep = self.cfg.max_prompt_tokens - len(bos)
        rows = [bos + ids[-keep:] for ids in encoded]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    @torch.no_grad()
    def generate(self, records: list[Record]) -> tuple[torch.Tensor, ...]:
        """(prompt ids, prompt mask, response ids, response mask) of one sample per record."""
        policy = self.policy
        policy.eval()
        prompt_ids, prompt_mask = self.encode_prompts(records)
        with self.accelerator.autocast():
            out = policy.lm.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config,
                tokenizer=self.tokenizer,
            )
        response_ids = out[:, prompt_ids.shape[1]:]
        # The pad token is suppressed while sampling, so it marks exactly the tokens after the end.
        response_mask = (response_ids != self.tokenizer.pad_token_id).float()
        return prompt_ids, prompt_mask, response_ids, response_mask

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        rows = [ids[: int(n)].tolist() for ids, n in zip(response_ids, response_mask.sum(1), strict=True)]
        raw = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [clean_rollout(text, self.format.stops) for text in raw]

    @torch.no_grad()
    def _forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Behaviour log-probs, reference log-probs (adapters off), values and mean entropy."""
        policy = self.policy
        policy.eval()
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
        logprobs, ref_logprobs, values, entropies = [], [], [], []
        for start in range(0, ids.shape[0], self.cfg.batch_size):
            chunk = slice(start, start + self.cfg.batch_size)
            batch = (ids[chunk], mask[chunk], response_ids[chunk])
            with self.accelerator.autocast():
                lp, v, logits = response_logprobs(policy, *batch)
                entropies.append(ppo.entropy_from_logits(logits))
                with policy.lm.disable_adapter():
                    ref_lp, _, _ = response_logprobs(policy, *batch)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(ref_lp)
        entropy = ppo.masked_mean(torch.cat(entropies), response_mask).item()
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values), entropy

    def await_rewards(self, pending: PendingRewards) -> ScoredRewards:
        """Every process gets its rewards or all stop: one failing rank must not hang the others."""
        error: RewardServiceError | None = None
        result = None
        try:
            result = pending.result()
        except RewardServiceError as exc:
            error = exc
        failed = self.accelerator.gather(torch.tensor([error is not None], device=self.accelerator.device))
        if error is not None:
            raise error
        if failed.any():
            raise RewardServiceError(self.cfg.reward_url, "another process's reward call failed", 0.0,
                                     self.cfg.reward_deadline_s, False)
        assert result is not None
        return result


class RolloutPipeline:
    """Hands out the rollouts of consecutive positions. With `overlap`, the next one is sampled (and
    its rewards requested) before the current one is returned for training, so it is one update
    stale; PPO's ratio divides by its rollout-time log-probs, which is what absorbs that."""

    def __init__(self, make: Callable[[int], Rollout], position: int, stride: int, overlap: bool) -> None:
        self._make, self._position, self._stride, self._overlap = make, position, stride, overlap
        self._pending: Rollout | None = None

    def _sample(self) -> Rollout:
        rollout = self._make(self._position)
        self._position += self._stride
        return rollout

    def next(self, more: bool) -> tuple[Rollout, list[Rollout]]:
        """(the rollout to train on, those sampled by this call); `more`: another step follows."""
        generated = [] if self._pending is not None else [self._sample()]
        current = self._pending if self._pending is not None else generated[0]
        self._pending = None
        if self._overlap and more:
            self._pending = self._sample()  # while `current` is being scored
            generated.append(self._pending)
        return current, generated

    def cancel(self) -> None:
        """Stop waiting for the rewards of a rollout that will not be trained on."""
        if self._pending is not None and self._pending.rewards is not None:
            self._pending.rewards.cancel()
