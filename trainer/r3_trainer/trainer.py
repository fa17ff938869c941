"""The PPO loop: rollouts -> rewards from the r3 service -> KL-penalised GAE -> clipped PPO epochs.

The parts are apart, as in OpenRLHF: `rollout` makes experience (samples, log-probs, values,
reward requests), `update` trains on it, `checkpoint` saves and restores, `stats` logs.

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
import random
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft import get_peft_model_state_dict
from tqdm.auto import tqdm

from r3_trainer import checkpoint, evaluation
from r3_trainer.checkpoint import latest_checkpoint
from r3_trainer.config import TrainConfig
from r3_trainer.data import PromptOrder, load_records, split_dev
from r3_trainer.model import PolicyWithValueHead, build_policy, load_tokenizer
from r3_trainer.rewards import RewardServiceError, ScoredRewards
from r3_trainer.rollout import Rollout, RolloutMaker, RolloutPipeline, reward_scorer
from r3_trainer.stats import HackWatch, StepLog, finite, reward_stats, rollout_stats, text_signals
from r3_trainer.update import PPOUpdate


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
        policy = build_policy(cfg, self.tokenizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = acc.prepare(policy, optimizer)

        train, self.dev = split_dev(load_records(cfg.data_path), cfg.dev_size, cfg.seed)
        self.train_records = train[: cfg.train_size] if cfg.train_size else train
        self.order = PromptOrder(len(self.train_records), cfg.seed)
        self.scorer = reward_scorer(cfg)
        self.maker = RolloutMaker(cfg, acc, self.tokenizer, self.model, self.scorer)
        self.ppo = PPOUpdate(cfg, acc, self.model, self.optimizer)
        self.log = StepLog(cfg.log_path, acc.is_main_process)
        self.watch = HackWatch(cfg.hack_bounds)
        self.step = 0
        self.position = 0  # prompts trained on so far, all processes together
        self.best_dev: float | None = None
        self._resume_or_start_fresh(resume)

    def _resume_or_start_fresh(self, resume: bool) -> None:
        latest = latest_checkpoint(self.output_dir)
        if resume:
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir}")
            self.load_checkpoint(latest)
        elif latest is not None:
            raise FileExistsError(f"{self.output_dir} already holds {latest.name}: pass --resume to "
                                  "continue that run, or choose another output_dir")

    @property
    def policy(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_prompts(self) -> int:
        """Prompts a step takes from the order, all processes together."""
        return self.cfg.prompts_per_step * self.accelerator.num_processes

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run until `steps`; returns the logged records. On a reward-service failure a checkpoint
        is written first and `RewardServiceError` (with `.checkpoint`) is raised."""
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log.start(self.step)
        history: list[dict[str, Any]] = []
        if self.step == 0 and cfg.eval_at_start:
            self.log.write(finite({"step": 0, "samples": 0, **self._evaluate_and_keep_best()}))
        rollouts = RolloutPipeline(self.make_rollout, self.position, self.global_prompts,
                                   cfg.overlap_generation)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="r3 ppo", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and self.accelerator.is_main_process))
        try:
            while self.step < cfg.steps:
                record = self._train_step(rollouts)
                history.append(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward/mean']:.3f}", kl=f"{record['kl']:.2f}")
        except RewardServiceError as exc:
            self._checkpoint_before_raising(exc)
            raise
        finally:
            bar.close()
            rollouts.cancel()
        if cfg.plot and self.accelerator.is_main_process and cfg.log_path.exists():
            from r3_trainer.plot import plot_log

            plot_log(cfg.log_path, cfg.log_path.with_suffix(".png"))
        return history

    def _train_step(self, rollouts: RolloutPipeline) -> dict[str, Any]:
        """One update on the next rollout, then evaluation and checkpoint when due; the logged record."""
        cfg = self.cfg
        t0 = time.perf_counter()
        current, generated = rollouts.next(more=self.step + 1 < cfg.steps)
        t1 = time.perf_counter()
        assert current.rewards is not None
        scored = self.maker.await_rewards(current.rewards)
        t2 = time.perf_counter()
        stats = self.update(current, scored)
        t3 = time.perf_counter()
        self.step += 1
        self.position = current.position + self.global_prompts
        record = self._step_record(current, scored, generated, stats)
        record.update({"time/rollout": t1 - t0, "time/reward_wait": t2 - t1, "time/update": t3 - t2,
                       "lr": self.optimizer.param_groups[0]["lr"]})
        if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
            try:
                record.update(self._evaluate_and_keep_best())
            except RewardServiceError:
                self.log.write(finite(record))  # the update did happen
                raise
        if self.step % cfg.save_every == 0 or self.step == cfg.steps:
            self.save_checkpoint()
        record["time/step"] = time.perf_counter() - t0
        record = finite(record)
        self.log.write(record)
        return record

    def _checkpoint_before_raising(self, exc: RewardServiceError) -> None:
        exc.checkpoint = str(self.save_checkpoint())
        exc.args = (f"{exc.args[0]}; checkpoint of step {self.step} written to {exc.checkpoint} "
                    f"(continue with --resume)",)

    # ------------------------------------------------------------------ rollouts and updates

    def make_rollout(self, position: int) -> Rollout:
        """Sample this process's share of the prompts at `position` (each `group_size` times) and
        send the samples to be scored."""
        n, rank = self.cfg.prompts_per_step, self.accelerator.process_index
        mine = self.order.indices(position, self.global_prompts)[rank * n:(rank + 1) * n]
        # A prompt's group_size samples sit next to each other: group_advantages relies on it.
        records = [self.train_records[i] for i in mine for _ in range(self.cfg.group_size)]
        return self.maker.make(records, position, self.step)

    def update(self, rollout: Rollout, scored: ScoredRewards) -> dict[str, float]:
        """KL-penalised rewards -> GAE -> `ppo_epochs` passes of clipped PPO; returns the stats."""
        return self.ppo(rollout, scored.batch.rewards)

    def _step_record(self, rollout: Rollout, scored: ScoredRewards, generated: list[Rollout],
                     stats: dict[str, float]) -> dict[str, Any]:
        record: dict[str, Any] = {"step": self.step, "samples": self.position * self.cfg.group_size}
        record.update(reward_stats(self.accelerator, [scored], rollout.n_tokens, ""))
        record.update(stats)
        record.update(rollout_stats(rollout, generated, scored, self.step))
        record.update(text_signals(self.accelerator, [r.query for r in rollout.records], rollout.texts,
                                   self.cfg.copy_threshold, ""))
        warnings = self.watch.check(record)
        if warnings:
            record["warnings"] = warnings
            if self.accelerator.is_main_process:
                for warning in warnings:
                    tqdm.write(f"step {self.step}: WARNING reward hacking? {warning}")
        return record

    # ------------------------------------------------------------------ evaluation

    @property
    def eval_backends(self) -> list[str]:
        return list(dict.fromkeys([self.cfg.reward_backend or "r3", *self.cfg.eval_backends]))

    def evaluate(self) -> dict[str, float]:
        """The dev set answered with a fixed seed (training RNG untouched) and scored under every
        eval backend (`evaluation`); the per-prompt rows go to <output_dir>/eval/step-NNNNNN.jsonl."""
        acc = self.accelerator
        mine = self.dev[acc.process_index::acc.num_processes]
        seed = self.cfg.seed + evaluation.SEED_OFFSET + acc.process_index
        table = evaluation.evaluate(self.maker, self.scorer, mine, seed, self.eval_backends)
        table = [row for part in gather_object([table]) for row in part]
        if acc.is_main_process:
            path = self.output_dir / "eval" / f"step-{self.step:06d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in table))
        stats = evaluation.flat(evaluation.summary(table))
        main = self.eval_backends[0]  # the trained-on backend's figures under their usual names
        for key, suffix in (("mean", ""), ("open_mean", "/open"), ("closed_mean", "/closed")):
            stats[f"eval/reward/{key}"] = stats[f"eval/reward[{main}]{suffix}"]
        return stats

    def _evaluate_and_keep_best(self) -> dict[str, float]:
        """The paper's rule: evaluate every `eval_every` steps, keep the best dev mean reward."""
        stats = self.evaluate()
        value = stats["eval/reward/mean"]
        if self.best_dev is None or value > self.best_dev:
            self.best_dev = value
            self.save_checkpoint(self.output_dir / "best", extra={"eval": stats})
        stats["eval/best_reward_mean"] = self.best_dev
        return stats

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: Path | None = None, extra: dict[str, Any] | None = None) -> Path:
        """Adapters + value head + optimizer + KL controller + score stats + step + position + RNG;
        without `directory`, a numbered checkpoint (older ones beyond keep_checkpoints pruned)."""
        target = directory or checkpoint.checkpoint_dir(self.output_dir, self.step)
        state = {
            "step": self.step, "position": self.position, "best_dev": self.best_dev,
            "kl_ctl": self.ppo.kl_ctl.state_dict(), "score_stats": self.ppo.shaper.running.state_dict(),
            "optimizer": self.optimizer.state_dict(), "num_processes": self.accelerator.num_processes,
            **(extra or {}),
        }
        keep = self.cfg.keep_checkpoints if directory is None else None
        checkpoint.save_checkpoint(self.accelerator, target, self.policy, self.tokenizer, self.cfg.to_dict(),
                                   state, keep)
        return target

    def load_checkpoint(self, directory: Path) -> None:
        checkpoint.load_weights(directory, self.policy, self.accelerator.device)
        state = checkpoint.load_state(directory)
        self.optimizer.load_state_dict(state["optimizer"])
        self.ppo.kl_ctl.load_state_dict(state["kl_ctl"])
        self.ppo.shaper.running.load_state_dict(checkpoint.moments_state(state["score_stats"]))
        self.step, self.position, self.best_dev = state["step"], state["position"], state["best_dev"]
        checkpoint.load_rng(directory / f"rng-{self.accelerator.process_index}.pt")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights (LoRA + value head), detached copies; for tests and inspection."""
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.policy.lm).items()}
        head = self.policy.value_head.state_dict()
        state.update({f"value_head.{k}": v.detach().clone() for k, v in head.items()})
        return state

    def close(self) -> None:
        self.scorer.close()
