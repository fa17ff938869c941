"""The PPO loop: rollouts -> rewards from the r3 service -> KL-penalised GAE -> clipped PPO epochs.

Pipelining (`overlap_generation: true`): batch t+1 is generated (and its log-probs and values
computed) while batch t's rewards are in flight, then the policy is updated on batch t. Batch
t+1 was therefore sampled by the policy *before* update t: it is one update stale when it is
trained on. PPO stays correct because its importance ratio divides by the log-probs recorded at
rollout time (the behaviour policy's), and the value clip is relative to the values recorded then;
the staleness is what the clipped ratio is built to absorb. Without overlap every batch is on-policy.

A step's prompts are a function of a position in a seeded order, so a checkpoint (adapters, value
head, optimizer, KL controller, score statistics, step, position, RNG) resumes exactly where
training stopped. Rollouts already generated but not trained on are regenerated after a resume.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from r3_client import RewardItem
from r3_trainer import ppo
from r3_trainer.config import TrainConfig
from r3_trainer.data import (
    PromptOrder,
    Record,
    clean_rollout,
    format_prompt,
    load_records,
    split_dev,
    stop_strings,
)
from r3_trainer.model import (
    PolicyWithValueHead,
    build_policy,
    end_token_ids,
    generation_config,
    load_tokenizer,
)
from r3_trainer.rewards import PendingRewards, RewardScorer, RewardServiceError, ScoredRewards

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"


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


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (an interrupted write has no state file)."""
    candidates = [p for p in Path(output_dir).glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).exists()]
    return max(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


class PPOTrainer:
    """`PPOTrainer(cfg).train()`; `resume=True` continues from the latest checkpoint in output_dir."""

    def __init__(
        self, cfg: TrainConfig, *, resume: bool = False, accelerator: Accelerator | None = None
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
        acc = self.accelerator
        torch.manual_seed(cfg.seed + acc.process_index)
        random.seed(cfg.seed + acc.process_index)
        self.output_dir = Path(cfg.output_dir)

        self.tokenizer = load_tokenizer(cfg)
        self.stops = stop_strings(cfg.chat_template)
        eos_ids = end_token_ids(self.tokenizer, self.stops)
        self.generation_config = generation_config(cfg, self.tokenizer, eos_ids)
        # Multi-token stop strings end a rollout too (single-token ones are already eos ids).
        vocab = self.tokenizer.get_vocab()
        self.generation_config.stop_strings = [s for s in self.stops if vocab.get(s) not in eos_ids] or None
        policy = build_policy(cfg, self.tokenizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = acc.prepare(policy, optimizer)

        train, self.dev = split_dev(load_records(cfg.data_path), cfg.dev_size, cfg.seed)
        self.train_records = train[: cfg.train_size] if cfg.train_size else train
        self.order = PromptOrder(len(self.train_records), cfg.seed)

        kl_cls = ppo.AdaptiveKLController if cfg.adaptive_kl else ppo.FixedKLController
        self.kl_ctl = kl_cls(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.shaper = ppo.ScoreShaper(cfg.use_score_scaling, cfg.use_score_norm, cfg.score_clip,
                                      cfg.reward_baseline)
        self.scorer = RewardScorer(
            cfg.reward_url, backend=cfg.reward_backend, deadline_s=cfg.reward_deadline_s,
            timeout_s=cfg.reward_timeout_s, max_retries=cfg.reward_max_retries,
            backoff_s=cfg.reward_backoff_s, max_backoff_s=cfg.reward_max_backoff_s,
            chunk_size=cfg.reward_chunk_size, max_concurrency=cfg.reward_max_concurrency,
            api_key=os.environ.get("R3_API_KEY"),  # a secret: from the environment, never the config
        )
        self.step = 0
        self.position = 0  # prompts trained on so far, all processes together
        self.best_dev: float | None = None
        checkpoint = latest_checkpoint(self.output_dir)
        if resume:
            if checkpoint is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir}")
            self.load_checkpoint(checkpoint)
        elif checkpoint is not None:
            raise FileExistsError(f"{self.output_dir} already holds {checkpoint.name}: pass --resume to "
                                  "continue that run, or choose another output_dir")

    # ------------------------------------------------------------------ helpers

    @property
    def policy(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_batch(self) -> int:
        return self.cfg.rollout_batch_size * self.accelerator.num_processes

    def _encode_prompts(self, records: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the templated prompts, BOS first, left-truncated and left-padded."""
        texts = [format_prompt(self.cfg.chat_template, r.query, self.cfg.system_prompt) for r in records]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_token_type_ids=False)["input_ids"]
        bos_id = self.tokenizer.bos_token_id
        bos = [bos_id] if self.cfg.add_bos and bos_id is not None else []
        keep = self.cfg.max_prompt_tokens - len(bos)
        rows = [bos + ids[-keep:] for ids in encoded]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        return ids.to(self.accelerator.device), mask.to(self.accelerator.device)

    def _reward_items(self, records: list[Record], texts: list[str]) -> list[RewardItem]:
        return [RewardItem(r.query, text, r.reference, r.query_type)
                for r, text in zip(records, texts, strict=True)]

    @torch.no_grad()
    def _generate(self, records: list[Record]) -> tuple[torch.Tensor, ...]:
        policy = self.policy
        policy.eval()
        prompt_ids, prompt_mask = self._encode_prompts(records)
        with self.accelerator.autocast():
            out = policy.lm.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config,
                tokenizer=self.tokenizer,
            )
        response_ids = out[:, prompt_ids.shape[1]:]
        # The pad token is suppressed while sampling, so it marks exactly the tokens after the end.
        response_mask = (response_ids != self.tokenizer.pad_token_id).float()
        return prompt_ids, prompt_mask, response_ids, response_mask

    def _forward_logprobs(
        self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, response_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs of the response tokens, values, logits) for prompt+response `ids`."""
        logits, values = model(ids, mask, response_ids.shape[1])
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)
        return logprobs, values, logits

    @torch.no_grad()
    def _score_rollout(self, prompt_ids, prompt_mask, response_ids, response_mask):
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
                lp, v, logits = self._forward_logprobs(policy, *batch)
                entropies.append(ppo.entropy_from_logits(logits))
                with policy.lm.disable_adapter():
                    ref_lp, _, _ = self._forward_logprobs(policy, *batch)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(ref_lp)
        entropy = ppo.masked_mean(torch.cat(entropies), response_mask).item()
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values), entropy

    def make_rollout(self, position: int) -> Rollout:
        """Sample this process's share of the batch at `position` and send it to be scored."""
        n = self.cfg.rollout_batch_size
        indices = self.order.indices(position, self.global_batch)
        mine = indices[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]
        records = [self.train_records[i] for i in mine]
        t0 = time.perf_counter()
        prompt_ids, prompt_mask, response_ids, response_mask = self._generate(records)
        t1 = time.perf_counter()
        texts = self._decode(response_ids, response_mask)
        pending = self.scorer.submit(self._reward_items(records, texts))
        logprobs, ref_logprobs, values, entropy = self._score_rollout(prompt_ids, prompt_mask, response_ids,
                                                                      response_mask)
        lengths = response_mask.sum(1)
        return Rollout(
            records=records, position=position, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            response_ids=response_ids, response_mask=response_mask, texts=texts, logprobs=logprobs,
            ref_logprobs=ref_logprobs, values=values, entropy=entropy,
            ended=(lengths < self.cfg.max_new_tokens).float().mean().item(), policy_step=self.step,
            generation_s=t1 - t0, forward_s=time.perf_counter() - t1, rewards=pending,
        )

    def _decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        rows = [ids[: int(n)].tolist() for ids, n in zip(response_ids, response_mask.sum(1), strict=True)]
        raw = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return [clean_rollout(text, self.cfg.chat_template) for text in raw]

    def _await_rewards(self, pending: PendingRewards) -> ScoredRewards:
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

    # ------------------------------------------------------------------ the update

    def _minibatch(self, rollout: Rollout, idx: torch.Tensor) -> dict[str, torch.Tensor]:
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

    def update(self, rollout: Rollout, scored: ScoredRewards) -> dict[str, float]:
        """KL-penalised rewards -> GAE -> `ppo_epochs` passes of clipped PPO; returns the stats."""
        cfg, acc = self.cfg, self.accelerator
        device = acc.device
        raw = torch.tensor(scored.batch.rewards, dtype=torch.float32, device=device)
        all_raw = acc.gather(raw)
        shaped = self.shaper(raw, all_raw)
        mask = rollout.response_mask
        kl_coef = self.kl_ctl.value
        token_rewards, kl = ppo.kl_penalized_rewards(shaped, rollout.logprobs, rollout.ref_logprobs, mask,
                                                     kl_coef)
        advantages, returns = ppo.gae(token_rewards, rollout.values, mask, cfg.gamma, cfg.lam)
        advantages = ppo.masked_whiten(advantages, mask) * mask

        self.model.train()
        sums: dict[str, float] = {}
        count = 0
        n = rollout.response_ids.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, device=device)
            for k in range(cfg.gradient_accumulation_steps):
                idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
                mb = self._minibatch(rollout, idx)
                r1 = mb["response_ids"].shape[1]
                sync = k == cfg.gradient_accumulation_steps - 1
                # DDP: gradients are all-reduced only on the last micro-batch of an accumulation.
                with nullcontext() if sync else acc.no_sync(self.model):
                    with acc.autocast():
                        logprobs, values, _ = self._forward_logprobs(
                            self.model, mb["ids"], mb["mask"], mb["response_ids"])
                        m = mb["response_mask"]
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
                for key, value in (("loss/policy", pg_loss), ("loss/value", vf_loss),
                                   ("policy/clipfrac", pg_clipfrac), ("policy/approx_kl", approx_kl),
                                   ("value/clipfrac", vf_clipfrac)):
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                count += 1

        seq_kl = acc.gather(kl.sum(1)).mean().item()
        self.kl_ctl.update(seq_kl, self.global_batch)
        stats = {key: acc.reduce(torch.tensor(value / count, device=device), "mean").item()
                 for key, value in sums.items()}
        stats.update({"kl": seq_kl, "kl_coef": kl_coef, "kl_coef_next": self.kl_ctl.value,
                      "reward/shaped_mean": acc.gather(shaped).mean().item()})
        value_sum = acc.reduce(torch.stack([(rollout.values * mask).sum(), mask.sum()]).double(), "sum")
        stats["value/mean"] = (value_sum[0] / value_sum[1]).item()
        return stats

    # ------------------------------------------------------------------ stats

    def _reward_stats(self, scored: list[ScoredRewards], tokens: int, prefix: str) -> dict[str, float]:
        """Raw reward mean/std and each R3 component's mean, over all processes."""
        acc, device = self.accelerator, self.accelerator.device
        rewards = [r for s in scored for r in s.batch.rewards]
        components = [c for s in scored for c in s.batch.components]
        relevance = [c.relevance for c in components if c.relevance is not None]
        local = torch.tensor([
            sum(rewards), sum(r * r for r in rewards), len(rewards),
            sum(c.length_incentive for c in components), sum(c.repetition_penalty for c in components),
            sum(relevance), len(relevance), sum(c.relevance_target == "reference" for c in components),
            tokens,
        ], dtype=torch.float64, device=device)
        (total, squares, n, li, rp, rel, n_rel, closed, tokens) = acc.reduce(local, "sum").tolist()
        mean = total / n
        return {
            f"{prefix}reward/mean": mean,
            f"{prefix}reward/std": math.sqrt(max(squares / n - mean * mean, 0.0) * n / max(n - 1, 1)),
            f"{prefix}components/length_incentive": li / n,
            f"{prefix}components/repetition_penalty": rp / n,
            f"{prefix}components/relevance": rel / n_rel if n_rel else float("nan"),
            f"{prefix}components/closed_branch": closed / n,
            f"{prefix}response/length_tokens": tokens / n,
        }

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Mean raw reward of sampled responses on the dev set (fixed seed, training RNG untouched)."""
        acc = self.accelerator
        mine = self.dev[acc.process_index::acc.num_processes]
        items: list[RewardItem] = []
        tokens = 0
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + 10_000 + acc.process_index)
            for start in range(0, len(mine), self.cfg.rollout_batch_size):
                records = mine[start:start + self.cfg.rollout_batch_size]
                _, _, response_ids, response_mask = self._generate(records)
                items += self._reward_items(records, self._decode(response_ids, response_mask))
                tokens += int(response_mask.sum().item())
        # One request per process (the client chunks it), awaited together with the other processes.
        scored = [self._await_rewards(self.scorer.submit(items))]
        return self._reward_stats(scored, tokens, "eval/")

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: Path | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Adapters + value head + optimizer + KL controller + score stats + step + position + RNG."""
        acc = self.accelerator
        target = directory or self.output_dir / f"{CHECKPOINT_PREFIX}{self.step:06d}"
        tmp = target.with_name(target.name + ".tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            policy = self.policy
            policy.lm.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in policy.value_head.state_dict().items()},
                      tmp / "value_head.safetensors")
            self.tokenizer.save_pretrained(tmp)
            (tmp / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            state = {
                "step": self.step, "position": self.position, "best_dev": self.best_dev,
                "kl_ctl": self.kl_ctl.state_dict(), "score_stats": self.shaper.running.state_dict(),
                "optimizer": self.optimizer.state_dict(), "num_processes": acc.num_processes, **(extra or {}),
            }
            torch.save(state, tmp / STATE_FILE)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            if directory is None:
                self._prune_checkpoints()
        acc.wait_for_everyone()
        return target

    def _prune_checkpoints(self) -> None:
        found = sorted(self.output_dir.glob(CHECKPOINT_PREFIX + "*"), key=lambda p: p.name)
        for old in [p for p in found if not p.name.endswith(".tmp")][: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, directory: Path) -> None:
        policy = self.policy
        adapters = load_file(directory / "adapter_model.safetensors", device=str(self.accelerator.device))
        result = set_peft_model_state_dict(policy.lm, adapters)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{directory}: adapters do not fit this model: {result.unexpected_keys[:5]}")
        policy.value_head.load_state_dict(load_file(directory / "value_head.safetensors",
                                                    device=str(self.accelerator.device)))
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.shaper.running.load_state_dict(state["score_stats"])
        self.step, self.position, self.best_dev = state["step"], state["position"], state["best_dev"]
        rng_file = directory / f"rng-{self.accelerator.process_index}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights (LoRA + value head), detached copies; for tests and inspection."""
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.policy.lm).items()}
        head = self.policy.value_head.state_dict()
        state.update({f"value_head.{k}": v.detach().clone() for k, v in head.items()})
        return state

    # ------------------------------------------------------------------ the loop

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            path = self.cfg.log_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_log(self) -> None:
        """On resume, drop log lines of steps after the checkpoint: they are about to be redone."""
        path = self.cfg.log_path
        if not self.accelerator.is_main_process or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

    def train(self) -> list[dict[str, Any]]:
        """Run until `steps`; returns the logged records. On a reward-service failure a checkpoint
        is written first and `RewardServiceError` (with `.checkpoint`) is raised."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.step == 0 and self.position == 0 and self.accelerator.is_main_process:
            cfg.log_path.unlink(missing_ok=True)
        self._trim_log()
        history: list[dict[str, Any]] = []
        pending: Rollout | None = None
        next_position = self.position
        bar = tqdm(total=cfg.steps, initial=self.step, desc="r3 ppo", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and self.accelerator.is_main_process))
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                generated: list[Rollout] = []
                if pending is None:
                    pending = self.make_rollout(next_position)
                    next_position += self.global_batch
                    generated.append(pending)
                current, pending = pending, None
                if cfg.overlap_generation and self.step + 1 < cfg.steps:
                    pending = self.make_rollout(next_position)  # while `current` is being scored
                    next_position += self.global_batch
                    generated.append(pending)
                t1 = time.perf_counter()
                assert current.rewards is not None
                scored = self._await_rewards(current.rewards)
                t2 = time.perf_counter()
                stats = self.update(current, scored)
                t3 = time.perf_counter()
                self.step += 1
                self.position = current.position + self.global_batch
                record = self._step_record(current, scored, generated, stats, t1 - t0, t2 - t1, t3 - t2)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    try:
                        record.update(self._evaluate_and_keep_best())
                    except RewardServiceError:
                        self._log({k: _finite(v) for k, v in record.items()})  # the update did happen
                        raise
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                record["time/step"] = time.perf_counter() - t0
                record = {k: _finite(v) for k, v in record.items()}  # NaN (no relevance) -> null
                self._log(record)
                history.append(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{record['kl']:.2f}")
        except RewardServiceError as exc:
            exc.checkpoint = str(self.save_checkpoint())
            exc.args = (f"{exc.args[0]}; checkpoint of step {self.step} written to {exc.checkpoint} "
                        f"(continue with --resume)",)
            raise
        finally:
            bar.close()
            if pending is not None and pending.rewards is not None:
                pending.rewards.cancel()
        if cfg.plot and self.accelerator.is_main_process and cfg.log_path.exists():
            from r3_trainer.plot import plot_log

            plot_log(cfg.log_path, cfg.log_path.with_suffix(".png"))
        return history

    def _step_record(self, rollout: Rollout, scored: ScoredRewards, generated: list[Rollout],
                     stats: dict[str, float], gen_s: float, wait_s: float, update_s: float) -> dict[str, Any]:
        generation = sum(r.generation_s for r in generated)
        tokens = sum(r.n_tokens for r in generated)
        record: dict[str, Any] = {"step": self.step, "samples": self.position}
        record.update(self._reward_stats([scored], rollout.n_tokens, ""))
        record.update(stats)
        record.update({
            "policy/entropy": rollout.entropy,
            "response/ended": rollout.ended,
            "staleness": self.step - 1 - rollout.policy_step,
            "reward/latency_s": scored.latency_s,
            "speed/tokens_per_s": tokens / generation if generation > 0 else float("nan"),
            "time/generation": generation,
            "time/rollout_forward": sum(r.forward_s for r in generated),
            "time/rollout": gen_s,
            "time/reward_wait": wait_s,
            "time/update": update_s,
            "lr": self.optimizer.param_groups[0]["lr"],
        })
        return record

    def _evaluate_and_keep_best(self) -> dict[str, float]:
        """The paper's rule: evaluate every `eval_every` steps, keep the best dev mean reward."""
        stats = self.evaluate()
        value = stats["eval/reward/mean"]
        if self.best_dev is None or value > self.best_dev:
            self.best_dev = value
            self.save_checkpoint(self.output_dir / "best", extra={"eval": stats})
        stats["eval/best_reward_mean"] = self.best_dev
        return stats

    def close(self) -> None:
        self.scorer.close()
