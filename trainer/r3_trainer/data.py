"""Prompts: AlpacaFarm-format records, chat-template formatting, response clean-up, sampling order.

The stop strings are the service's own (its template role prefixes plus the generic ones), so the
text the trainer pays for is cut exactly where the service would cut it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from r3_service.rule.features import GENERIC_STOP_STRINGS, clean_response
from r3_service.rule.templates import TEMPLATES

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class Record:
    """One dataset row: the raw query, its reference answer and query type (both optional)."""

    query: str
    reference: str | None
    query_type: str | None


def load_records(path: str | Path) -> list[Record]:
    """A JSON array or JSONL of objects with `input`, optional `output` and `qtype`."""
    text = Path(path).read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    records = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not row["input"].strip():
            raise ValueError(f"{path}: record {number} has no non-empty string `input`")
        reference = row.get("output")
        records.append(Record(row["input"], reference if isinstance(reference, str) and reference.strip()
                              else None, row.get("qtype")))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def split_dev(records: list[Record], dev_size: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded shuffle; the first `dev_size` records are the dev set, the rest the train set."""
    if dev_size >= len(records):
        raise ValueError(f"dev_size {dev_size} leaves no training records out of {len(records)}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [records[i] for i in order]
    return shuffled[dev_size:], shuffled[:dev_size]


def format_prompt(template: str, query: str, system: str | None = None) -> str:
    """The prompt text for one user turn, ending where the assistant's words begin."""
    if template == "vicuna":
        return f"{VICUNA_SYSTEM if system is None else system} USER: {query} ASSISTANT:"
    if template == "llama-2":
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"[INST] {sys_block}{query} [/INST]"
    if template == "chatml":
        sys_block = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_block}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    if template == "alpaca":
        preamble = ALPACA_SYSTEM if system is None else system
        return f"{preamble}\n\n### Instruction:\n{query}\n\n### Response:\n"
    raise ValueError(f"unknown chat template {template!r}")


def stop_strings(template: str) -> tuple[str, ...]:
    """The service's role prefixes for `template` plus its generic stop strings."""
    return TEMPLATES[template].stop_strings + GENERIC_STOP_STRINGS


def clean_rollout(text: str, template: str) -> str:
    """A decoded rollout as the reward sees it: stripped, cut at the first stop string."""
    return clean_response(text, stop_strings(template))


class PromptOrder:
    """Endless, reproducible order over the train set: epoch e is a permutation seeded by seed + e.

    A position (how many prompts have been handed out, over all processes) is all the state a
    checkpoint needs to continue the sequence.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._cache: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cache = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._cache[epoch]

    def indices(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            out.append(self._epoch(p // self.size)[p % self.size])
        return out
