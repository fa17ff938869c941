"""Prompts: dataset records, response clean-up and the sampling order.

Records are read by the service's own dataset reader, prompts written by its chat templates and
rollouts cut at its stop strings (template role prefixes plus the generic ones), so the text the
trainer pays for is cut exactly where the service would cut it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from r3_service.rule.datasets import read_records
from r3_service.rule.features import GENERIC_STOP_STRINGS, clean_response
from r3_service.rule.querytypes import QueryType
from r3_service.rule.templates import TEMPLATES


@dataclass(frozen=True)
class Record:
    """One dataset row: the raw query, its reference answer and query type (both optional)."""

    query: str
    reference: str | None
    query_type: QueryType | None


def load_records(path: str | Path) -> list[Record]:
    """A JSON array or JSONL of objects with `input` (or `instruction`, `query`), optional `output`
    (or `reference`) and `qtype`; any malformed record is an error, not a skipped prompt."""
    rows, errors = read_records(Path(path), allow_bare=True)
    if errors:
        raise ValueError(f"{path}: {len(errors)} malformed record(s): {'; '.join(errors[:3])}")
    if not rows:
        raise ValueError(f"{path}: no records")
    return [Record(query, row.reference, row.query_type) for query, row in rows]


def split_dev(records: list[Record], dev_size: int, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded shuffle; the first `dev_size` records are the dev set, the rest the train set."""
    if dev_size >= len(records):
        raise ValueError(f"dev_size {dev_size} leaves no training records out of {len(records)}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [records[i] for i in order]
    return shuffled[dev_size:], shuffled[:dev_size]


def stop_strings(template: str) -> tuple[str, ...]:
    """The service's role prefixes for `template` plus its generic stop strings."""
    return TEMPLATES[template].stop_strings + GENERIC_STOP_STRINGS


def clean_rollout(text: str, stops: Sequence[str]) -> str:
    """A decoded rollout as the reward sees it: stripped, cut at the first stop string."""
    return clean_response(text, stops)


@dataclass(frozen=True)
class PromptFormat:
    """How a query becomes a prompt, and where a rollout ends."""

    render: Callable[[str], str]
    stops: tuple[str, ...]


def prompt_format(template: str, system: str | None, tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """A named template of the service's, or "model": the tokenizer's own chat template, whose role
    markers are recognised by rendering one prompt (ChatML's for SmolLM2, Qwen, ...)."""
    if template != "model":
        chat = TEMPLATES[template]
        return PromptFormat(lambda query: chat.prompt(query, system), stop_strings(template))
    if not tokenizer.chat_template:
        raise ValueError("chat_template: model: this tokenizer has no chat template; name one instead")

    def render(query: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": query}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    sample = render("Hello?")
    known = tuple(stop for chat in TEMPLATES.values() if chat.detect.search(sample)
                  for stop in chat.stop_strings)
    return PromptFormat(render, (*dict.fromkeys((*known, tokenizer.eos_token)), *GENERIC_STOP_STRINGS))


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
