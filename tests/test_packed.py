"""The padding-free forward (models/packed.py) gives the padded Hugging Face forward's numbers."""

from __future__ import annotations

import random

import pytest
import torch

from r3_service.models.embedding import EmbeddingModel
from r3_service.models.packed import PackedBert, supports_packing
from r3_service.settings import DEFAULT_MODEL

WORDS = ["the", "reward", "service", "scores", "answers", "to", "questions", "while", "a", "policy",
         "learns", "what", "pays", "and", "does", "not", "under", "bounded", "length", "incentive"]


def texts_of_mixed_lengths(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(1, 150))) for _ in range(count)] + ["", "a"]


@pytest.fixture(scope="module")
def padded() -> EmbeddingModel:
    return EmbeddingModel(DEFAULT_MODEL, device="cpu", dtype="float32", packing=False)


def test_the_default_encoder_runs_packed(embedding_model, padded) -> None:
    assert embedding_model.info.packed and embedding_model.packed is not None
    assert not padded.info.packed and padded.packed is None


def test_packed_equals_padded_at_fp32(embedding_model, padded) -> None:
    sequences = padded.tokenize(texts_of_mixed_lengths(40))
    sequences.sort(key=len, reverse=True)
    assert len(sequences[0]) > 3 * len(sequences[-1])  # a batch that is mostly padding
    packed, reference = embedding_model.forward(sequences), padded.forward(sequences)
    assert packed.shape == reference.shape == (len(sequences), embedding_model.info.dim)
    assert torch.allclose(packed, reference, atol=1e-6)


def test_packed_order_and_batch_composition_do_not_change_a_row(embedding_model) -> None:
    sequences = embedding_model.tokenize(texts_of_mixed_lengths(12, seed=1))
    together = embedding_model.forward(sequences)
    alone = torch.cat([embedding_model.forward([s]) for s in sequences])
    reversed_ = embedding_model.forward(sequences[::-1]).flip(0)
    assert torch.allclose(together, alone, atol=1e-6)
    assert torch.allclose(together, reversed_, atol=1e-6)


def test_packed_every_layer_pooling_equals_padded(embedding_model, padded) -> None:
    sequences = padded.tokenize(texts_of_mixed_lengths(10, seed=2))
    packed = embedding_model.view("layers").forward(sequences)
    reference = padded.view("layers").forward(sequences)
    layers = int(padded.model.config.num_hidden_layers)
    assert packed.shape == reference.shape == (len(sequences), layers * padded.info.dim)
    assert torch.allclose(packed, reference, atol=1e-6)


def test_packed_bf16_stays_close_to_fp32(padded) -> None:
    bf16 = EmbeddingModel(DEFAULT_MODEL, device="cpu", dtype="bfloat16")
    assert bf16.info.packed and bf16.info.dtype == "bfloat16"
    texts = texts_of_mixed_lengths(16, seed=3)
    cosine = torch.nn.functional.cosine_similarity(bf16.embed(texts), padded.embed(texts))
    assert cosine.min() > 0.99


def test_only_plain_bert_encoders_are_packed(padded) -> None:
    assert supports_packing(padded.model)
    padded.model.config.position_embedding_type = "relative_key"
    try:
        assert not supports_packing(padded.model)
        with pytest.raises(ValueError, match="not a plain BERT encoder"):
            PackedBert(padded.model)
    finally:
        padded.model.config.position_embedding_type = "absolute"
    assert not supports_packing(torch.nn.Linear(2, 2))
