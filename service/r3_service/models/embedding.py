"""The embedding model: a `transformers` encoder, mean pooling over real tokens, left truncation.

Two poolings of one forward pass: `mean` (the sentence embedding relevance uses) and `layers`
(every layer's mean, each unit-normalised, side by side: what the query-type head reads, since the
lower layers keep the form of a request, a question or an imperative, that the last one blurs).
A `view` of a loaded model with another pooling shares its weights and tokenizer.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from r3_service.models.base import ModelInfo, pad_right, pick_device, pick_dtype, resolve_model_path
from r3_service.models.packed import PackedBert, mean_pool, supports_packing

log = logging.getLogger(__name__)

_HARD_MAX_LENGTH = 512

Pooling = Literal["mean", "layers"]
POOLINGS: tuple[Pooling, ...] = ("mean", "layers")


def _local_file(model_path: str, name: str) -> Path | None:
    """A file of a local model folder, or of a hub id already in the local cache (never fetched)."""
    candidate = Path(model_path) / name
    if candidate.is_file():
        return candidate
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, name)
    except Exception:  # not a valid repo id, no cache: the model simply has no such file
        return None
    return Path(cached) if isinstance(cached, str) else None


def sentence_transformers_settings(model_path: str) -> tuple[int | None, bool]:
    """(max_seq_length, normalises) from the model's sentence-transformers config, if it has one."""
    max_seq_length = None
    config = _local_file(model_path, "sentence_bert_config.json")
    if config is not None:
        max_seq_length = json.loads(config.read_text()).get("max_seq_length")
    normalises = False
    modules = _local_file(model_path, "modules.json")
    if modules is not None:
        normalises = any(m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text()))
    return max_seq_length, normalises


class EmbeddingModel:
    """Owns one encoder. `forward` is not thread-safe: one scheduler thread calls it;
    `tokenize` may run on other threads (the Rust tokenizer releases the GIL)."""

    def __init__(self, model: str, *, normalize: bool | None = None, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32, compile: bool = False,
                 packing: bool = True) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(model)
        st_max_length, st_normalises = sentence_transformers_settings(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.truncation_side = "left"  # keep the end of long texts, as the reference does
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.device = pick_device(device)
        precision = pick_dtype(dtype, self.device)
        self.dtype = precision.dtype
        self.model = AutoModel.from_pretrained(path).to(self.device, self.dtype).eval()
        self.normalize = st_normalises if normalize is None else normalize
        self.max_length = st_max_length or min(self.tokenizer.model_max_length, _HARD_MAX_LENGTH)
        self.batch_size = batch_size
        self.pooling: Pooling = "mean"
        # On a GPU padding is cheap and one launch per op is not: there the padded forward runs.
        pack = packing and self.device.type == "cpu" and supports_packing(self.model)
        self.packed = PackedBert(self.model) if pack else None
        self.info = ModelInfo(
            model=model, path=path, normalize=self.normalize, max_length=self.max_length,
            special_tokens=self.tokenizer.num_special_tokens_to_add(pair=False),
            dim=int(self.model.config.hidden_size), device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), dtype_reason=precision.reason,
            compiled=compile, packed=self.packed is not None,
        )
        if compile:
            # Dynamic shapes: one compilation serves every batch shape; pay it now, not on a request.
            if self.packed is not None:
                self.packed.compile()
            else:
                self.model = torch.compile(self.model, dynamic=True)
            self.forward(self.tokenize(["warm-up text for the compiler", "a second, longer warm-up text"]))
        log.info("embedding model %s on %s, %s (max_length=%d, normalize=%s)",
                 model, self.device, self.info.dtype, self.max_length, self.normalize)

    def view(self, pooling: Pooling) -> EmbeddingModel:
        """This model with another pooling: the same weights and tokenizer, a wider row for
        `layers` (hidden size × layers)."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        if pooling == self.pooling:
            return self
        other = copy.copy(self)
        other.pooling = pooling
        hidden = int(self.model.config.hidden_size)
        layers = int(self.model.config.num_hidden_layers)
        other.info = replace(self.info, dim=hidden * layers if pooling == "layers" else hidden)
        return other

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, cut on the left to the model's limit."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                                 return_attention_mask=False, return_token_type_ids=False)
        return encoded["input_ids"]

    @torch.inference_mode()
    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Mean-pooled embeddings (len, dim), float32 on the CPU, of one batch."""
        every_layer = self.pooling == "layers"
        if self.packed is not None:  # real tokens only (models/packed.py): the same numbers
            states, layout = self.packed.hidden_states(sequences, self.device, every_layer=every_layer)
            # (the filler sequence packing adds is the last row: dropped)
            means = [mean_pool(state, layout)[: len(sequences)]
                     for state in states[1 if every_layer else 0 :]]
        else:
            means = self._padded_means(sequences, every_layer)
        if every_layer:
            return torch.cat([torch.nn.functional.normalize(m, dim=-1) for m in means], dim=-1).cpu()
        pooled = means[-1]
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.cpu()

    def _padded_means(self, sequences: list[list[int]], every_layer: bool) -> list[torch.Tensor]:
        """Each layer's mean over real tokens (`every_layer`), else the last layer's, computed on
        one right-padded batch by the Hugging Face forward."""
        ids, mask = pad_right(sequences, self.pad_id)
        if self.device.type == "cuda":
            ids, mask = ids.pin_memory(), mask.pin_memory()
        ids = ids.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        weights = mask.unsqueeze(-1).float()
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=every_layer)
        states = out.hidden_states[1:] if every_layer else [out.last_hidden_state]  # [0]: input embedding
        return [_mean(state.float(), weights) for state in states]

    @torch.inference_mode()
    def word_vectors(self, texts: list[str]) -> torch.Tensor:
        """The mean of each text's input word-piece vectors (the encoder's embedding table, no
        encoder pass: a lookup), float32 on the CPU; zeros for a text without word pieces. Safe
        beside `forward`: it only reads the table."""
        table = self.model.get_input_embeddings().weight
        encoded = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length,
                                 return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        out = torch.zeros(len(texts), table.shape[1], dtype=torch.float32)
        for row, ids in enumerate(encoded):
            if ids:
                out[row] = table[torch.tensor(ids, device=table.device)].float().mean(0).cpu()
        return out

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of `texts` in order, in length-sorted batches (for tools and tests)."""
        sequences = self.tokenize(texts)
        order = sorted(range(len(texts)), key=lambda i: len(sequences[i]), reverse=True)
        out = torch.empty(len(texts), self.info.dim, dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self.forward([sequences[i] for i in chunk])
        return out


def _mean(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: (batch, tokens, dim) → (batch, dim)."""
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
