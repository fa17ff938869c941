"""Checkpoints: adapters, value head, tokenizer, config, the trainer's state and each process's RNG.

A checkpoint is written to `<name>.tmp` and renamed when complete, so a directory holding
`trainer_state.pt` is always a whole one (an interrupted write leaves only a .tmp behind).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from r3_trainer.model import PolicyWithValueHead

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"{CHECKPOINT_PREFIX}{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (an interrupted write has no state file)."""
    candidates = [p for p in Path(output_dir).glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).exists()]
    return max(candidates, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the `keep` latest numbered checkpoints (`best/` is not one of them)."""
    found = sorted(output_dir.glob(CHECKPOINT_PREFIX + "*"), key=lambda p: p.name)
    for old in [p for p in found if not p.name.endswith(".tmp")][:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, target: Path, policy: PolicyWithValueHead,
                    tokenizer: PreTrainedTokenizerBase, config: dict[str, Any], state: dict[str, Any],
                    keep: int | None = None) -> None:
    """Every process writes its RNG state, the main one the rest; `keep`: prune older checkpoints."""
    acc = accelerator
    tmp = target.with_name(target.name + ".tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_rng(tmp / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        policy.lm.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in policy.value_head.state_dict().items()},
                  tmp / "value_head.safetensors")
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if keep is not None:
            prune_checkpoints(target.parent, keep)
    acc.wait_for_everyone()


def load_weights(directory: Path, policy: PolicyWithValueHead, device: torch.device) -> None:
    """The adapters and the value head, checked to fit `policy`."""
    adapters = load_file(directory / "adapter_model.safetensors", device=str(device))
    result = set_peft_model_state_dict(policy.lm, adapters)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{directory}: adapters do not fit this model: {result.unexpected_keys[:5]}")
    policy.value_head.load_state_dict(load_file(directory / "value_head.safetensors", device=str(device)))


def load_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def moments_state(state: dict[str, float]) -> dict[str, float]:
    """Score statistics as `RunningMoments` keeps them; checkpoints written before it was shared
    with the service held TRL's (mean, population var, count) instead."""
    if "m2" in state:
        return state
    count = round(state["count"])
    return {"count": count, "mean": state["mean"], "m2": state["var"] * count}


def save_rng(path: Path) -> None:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path)


def load_rng(path: Path) -> None:
    """Restore a process's RNG state, when the checkpoint has one for it (same process count)."""
    if not path.exists():
        return
    rng = torch.load(path, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
