"""A padding-free forward pass for BERT-family encoders (MiniLM, Contriever, BGE, E5, ...).

A padded batch computes every Linear, LayerNorm and GELU on its padding too; on a CPU that is
pure waste (16% of the tokens computed under the GRPO load test). Here the batch is one row of
real tokens: the per-token parts of each layer run on exactly those, and attention, which
mixes tokens within a sequence, runs per block of equal-length sequences (no padding either).
It reads the Hugging Face model's own weights, so the numbers are the padded forward's to float
rounding (tests/test_packed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import torch
from torch.nn import functional as F


def supports_packing(model: torch.nn.Module) -> bool:
    """A plain BERT encoder: absolute positions, no decoder or cross-attention, GELU."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "model_type", None) == "bert"
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and not getattr(config, "add_cross_attention", False)
        and getattr(config, "hidden_act", None) == "gelu"
        and getattr(config, "chunk_size_feed_forward", 0) == 0
    )


@dataclass(frozen=True)
class Layout:
    """Where each real token sits: its sequence and its position in it. Tokens are packed
    sequence after sequence, so `runs` (count, length) of consecutive equal-length sequences are
    contiguous blocks of rows: a scheduler's length-sorted batch is a few runs."""

    lengths: torch.Tensor  # (batch,)
    sequence: torch.Tensor  # (tokens,) sequence of each token
    position: torch.Tensor  # (tokens,) position of each token within its sequence
    runs: list[tuple[int, int]]

    @staticmethod
    def of(sequences: list[list[int]], device: torch.device) -> Layout:
        sizes = [len(s) for s in sequences]
        lengths = torch.tensor(sizes, dtype=torch.long)
        sequence = torch.repeat_interleave(torch.arange(len(sizes)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(int(lengths.sum())) - starts[sequence]
        runs = [(len(list(group)), size) for size, group in groupby(sizes)]
        return Layout(lengths.to(device), sequence.to(device), position.to(device), runs)


# Token rows come in multiples of this: the matrix products meet a few dozen shapes instead of
# one per batch. oneDNN keeps a primitive (and, in bf16, a reordered copy of the weights) per
# shape: per batch size that was ~0.7 MB a shape, 1,024 of them, and a new primitive every batch.
ROW_BUCKET = 64


class PackedBert:
    """Runs a Hugging Face `BertModel` on packed tokens. Returns hidden states (tokens, hidden)
    after every layer, the input embeddings first, as `output_hidden_states` would."""

    def __init__(self, model: torch.nn.Module) -> None:
        if not supports_packing(model):
            raise ValueError(f"{type(model).__name__} is not a plain BERT encoder")
        self.model = model
        self.heads = int(model.config.num_attention_heads)
        # One Linear for query, key and value: one matrix product per layer instead of three.
        self.qkv = [
            (torch.cat([a.query.weight, a.key.weight, a.value.weight]),
             torch.cat([a.query.bias, a.key.bias, a.value.bias]))
            for a in (layer.attention.self for layer in model.encoder.layer)
        ]

    def compile(self) -> None:
        """torch.compile each layer's body (dynamic shapes: one graph for every token count)."""
        self._layer = torch.compile(self._layer, dynamic=True)

    def hidden_states(self, sequences: list[list[int]], device: torch.device,
                      every_layer: bool = False) -> tuple[list[torch.Tensor], Layout]:
        """(hidden states, layout): the last layer's only, or every layer's with `every_layer`.
        The rows are padded to a multiple of ROW_BUCKET by one filler sequence after the others
        (its own attention block, so theirs are untouched): pooled, it is the last row, to drop."""
        filler = -sum(map(len, sequences)) % ROW_BUCKET
        rows = [*sequences, [0] * filler] if filler else sequences
        layout = Layout.of(rows, device)
        ids = torch.tensor([t for s in rows for t in s], dtype=torch.long, device=device)
        embeddings = self.model.embeddings
        hidden = (embeddings.word_embeddings(ids) + embeddings.position_embeddings(layout.position)
                  + embeddings.token_type_embeddings.weight[0])
        hidden = embeddings.LayerNorm(hidden)
        states = [hidden]
        for layer, qkv in zip(self.model.encoder.layer, self.qkv, strict=True):
            hidden = self._layer(layer, qkv, hidden, layout)
            if every_layer:
                states.append(hidden)
        return (states if every_layer else [hidden]), layout

    def _layer(self, layer: torch.nn.Module, qkv: tuple[torch.Tensor, torch.Tensor],
               hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
        attended = self._attend(F.linear(hidden, *qkv), layout)
        attention_out = layer.attention.output
        hidden = attention_out.LayerNorm(attention_out.dense(attended) + hidden)
        inner = F.gelu(layer.intermediate.dense(hidden))
        return layer.output.LayerNorm(layer.output.dense(inner) + hidden)

    def _attend(self, qkv: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Scaled dot-product attention within each sequence: one call per run of equal-length
        sequences, so no padding and no mask (a masked call is slower on a CPU than several
        unmasked ones). In fp32 whatever the weights' dtype: faster on a CPU, and exact."""
        width = qkv.shape[1] // 3
        head_width = width // self.heads
        rows = qkv.float()
        out, start = [], 0
        for count, length in layout.runs:
            block = rows[start : start + count * length].view(count, length, 3, self.heads, head_width)
            query, key, value = block.permute(2, 0, 3, 1, 4).unbind(0)
            attended = F.scaled_dot_product_attention(query, key, value)
            out.append(attended.transpose(1, 2).reshape(count * length, width))
            start += count * length
        return torch.cat(out).to(qkv.dtype)


def mean_pool(hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Mean over each sequence's tokens, in float32: (tokens, dim) → (batch, dim)."""
    sums = hidden.new_zeros(layout.lengths.shape[0], hidden.shape[1], dtype=torch.float32)
    sums.index_add_(0, layout.sequence, hidden.float())
    return sums / layout.lengths[:, None].clamp(min=1).float()
