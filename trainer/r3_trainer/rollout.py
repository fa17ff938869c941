"""Experience making: prompts -> sampled responses -> rewards sent off -> log-probs and values.

A rollout's rewards are requested as soon as its texts are decoded, so the service scores them
while the behaviour and reference log-probs are computed. `RolloutPipeline` goes one step further
when asked (`overlap_generation`): it samples batch t+1 before batch t is trained on.
"""

from __future__ import annotations

import copy
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


@dataclass
class Sampled:
    """What generation returns: prompts left-padded, responses right-padded with the pad token."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # float, 1 on generated tokens (eos included)
    logprobs: torch.Tensor | None = None  # those the tokens were sampled with, when kept
    entropy: float = float("nan")

    def as_batch(self) -> Batch:
        return Batch(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask,
                     torch.zeros_like(self.response_mask))


@dataclass
class Batch:
    """The tensors `minibatch` cuts rows from (a Rollout has them too)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor


def length_sorted_chunks(response_mask: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in chunks of `size`, longest responses first: a chunk is padded only to its own
    longest row, so the forward pass computes far less padding than over rows in sampling order."""
    order = torch.argsort(response_mask.sum(1), descending=True, stable=True)
    return [order[start:start + size] for start in range(0, len(order), size)]


def minibatch(rollout: Batch | Rollout, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx`, with columns that are padding in every row cut off (less compute)."""
    prompt_mask = rollout.prompt_mask[idx]
    response_mask = rollout.response_mask[idx]
    p0 = int((prompt_mask.sum(0) > 0).nonzero()[0])
    r1 = max(int(response_mask.sum(1).max()), 1)
    return {
        "ids": torch.cat([rollout.prompt_ids[idx, p0:], rollout.response_ids[idx, :r1]], dim=1),
        "mask": torch.cat([prompt_mask[:, p0:], response_mask[:, :r1].long()], dim=1),
        "response_ids": rollout.response_ids[idx, :r1],
        "response_mask": response_mask[:, :r1],
        "old_logprobs": rollout.logprobs[idx, :r1],
    }


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
        self.generation_config.return_dict_in_generate = True
        self._keeping_logits = copy.deepcopy(self.generation_config)
        self._keeping_logits.output_logits = True

    @property
    def policy(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    def make(self, records: list[Record], position: int, policy_step: int) -> Rollout:
        """Sample `records`' responses, send them to be scored, then compute what PPO needs.

        With grpo the behaviour log-probs are those generation sampled from (no second forward
        pass: there is no value head to evaluate); with gae a forward pass gives them and the values.
        """
        t0 = time.perf_counter()
        grpo = self.cfg.advantage_estimator == "grpo"
        sampled = self.generate(records, keep_logprobs=grpo)
        t1 = time.perf_counter()
        texts = self.decode(sampled.response_ids, sampled.response_mask)
        pending = self.scorer.submit(reward_items(records, texts))
        logprobs, ref_logprobs, values, entropy = self._forward(sampled)
        lengths = sampled.response_mask.sum(1)
        return Rollout(
            records=records, position=position, prompt_ids=sampled.prompt_ids,
            prompt_mask=sampled.prompt_mask, response_ids=sampled.response_ids,
            response_mask=sampled.response_mask, texts=texts, logprobs=logprobs,
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
    def generate(self, records: list[Record], keep_logprobs: bool = False) -> Sampled:
        """One sample per record; `keep_logprobs`: with the log-probs and entropy it was drawn with."""
        policy = self.policy
        policy.eval()
        prompt_ids, prompt_mask = self.encode_prompts(records)
        with self.accelerator.autocast():
            out = policy.lm.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, tokenizer=self.tokenizer,
                generation_config=self._keeping_logits if keep_logprobs else self.generation_config,
            )
        response_ids = out.sequences[:, prompt_ids.shape[1]:]
        # The pad token is suppressed while sampling, so it marks exactly the tokens after the end.
        response_mask = (response_ids != self.tokenizer.pad_token_id).float()
        sampled = Sampled(prompt_ids, prompt_mask, response_ids, response_mask)
        if keep_logprobs:
            sampled.logprobs, sampled.entropy = self._sampling_logprobs(out.logits, response_ids,
                                                                        response_mask)
        return sampled

    def _sampling_logprobs(self, step_logits: tuple[torch.Tensor, ...], response_ids: torch.Tensor,
                           response_mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Log-probs of the sampled tokens under the distribution they were drawn from (the raw
        logits over the temperature, pad excluded: what `PolicyWithValueHead` computes), and the
        mean entropy; one generation step at a time, so the vocabulary-wide tensors stay small."""
        logprobs, entropies = [], []
        for t, logits in enumerate(step_logits):
            logits = logits.float() / self.cfg.temperature
            logits[:, self.tokenizer.pad_token_id] = torch.finfo(logits.dtype).min
            logprobs.append(torch.log_softmax(logits, -1).gather(-1, response_ids[:, t, None]).squeeze(-1))
            entropies.append(ppo.entropy_from_logits(logits))
        entropy = ppo.masked_mean(torch.stack(entropies, 1), response_mask).item()
        return torch.stack(logprobs, 1) * response_mask, entropy

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        rows = [ids[: int(n)].tolist() for ids, n in zip(response_ids, response_mask.sum(1), strict=True)]
        raw = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [clean_rollout(text, self.format.stops) for text in raw]

    @torch.no_grad()
    def _forward(self, sampled: Sampled) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Behaviour log-probs, reference log-probs (adapters off), values and mean entropy; rows
        go through in micro-batches of similar length (less padding), the results in row order."""
        policy = self.policy
        policy.eval()
        rollout_like = sampled.as_batch()
        shape = sampled.response_ids.shape
        logprobs, ref_logprobs, values = (torch.zeros(shape, device=sampled.response_ids.device)
                                          for _ in range(3))
        entropy_sum = torch.zeros((), dtype=torch.float64)
        for idx in length_sorted_chunks(sampled.response_mask, self.cfg.batch_size):
            mb = minibatch(rollout_like, idx)
            batch, width = (mb["ids"], mb["mask"], mb["response_ids"]), mb["response_ids"].shape[1]
            with self.accelerator.autocast():
                if sampled.logprobs is None:
                    lp, v, logits = response_logprobs(policy, *batch)
                    logprobs[idx, :width], values[idx, :width] = lp, v
                    entropy_sum += (ppo.entropy_from_logits(logits) * mb["response_mask"]).sum().double()
                with policy.lm.disable_adapter():
                    ref_logprobs[idx, :width] = response_logprobs(policy, *batch)[0]
        mask = sampled.response_mask
        if sampled.logprobs is not None:
            return sampled.logprobs, ref_logprobs * mask, values, sampled.entropy
        entropy = (entropy_sum / mask.sum()).item()
        return logprobs * mask, ref_logprobs * mask, values * mask, entropy

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
