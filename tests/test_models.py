"""Models other than the packaged MiniLM: a local path without a sentence-transformers config
(as Contriever ships) gets Contriever's defaults; settings parse from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import in_process, save_tiny_bert
from r3_service.engine.engine import RewardEngine
from r3_service.models import base
from r3_service.models.embedding import EmbeddingModel
from r3_service.settings import DEFAULT_MODEL, Settings


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_local_model_without_sentence_transformers_config(tiny_bert: Path) -> None:
    model = EmbeddingModel(str(tiny_bert), device="cpu")
    assert model.normalize is False and model.max_length == 512 and model.info.dim == 32
    texts = ["a short text", "a somewhat longer text with more words in it"]
    embeddings = model.embed(texts)
    # Mean pooling over real tokens, computed here by hand one text at a time (no padding).
    for text, embedding in zip(texts, embeddings, strict=True):
        batch = model.tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            hidden = model.model(**batch).last_hidden_state[0]
        assert torch.allclose(embedding, hidden.mean(dim=0), atol=1e-5)
    assert not torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-3)  # not normalised


def test_unnormalised_model_defaults_to_contriever_ranges(tiny_bert: Path) -> None:
    settings = Settings(model=str(tiny_bert), device="cpu")
    engine = RewardEngine.from_settings(settings)
    info = engine.info()["backends"]["r3"]
    assert info["normalize"] is False and info["relevance_in_range"] == [0.0, 3.5]
    assert info["relevance_out_range"] == [0.0, 5.12] and info["max_length"] == 512


def test_ranges_and_normalisation_are_configurable(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_MODEL", str(tiny_bert))
    monkeypatch.setenv("R3_NORMALIZE", "true")
    monkeypatch.setenv("R3_RELEVANCE_IN_RANGE", "[-1, 1]")
    monkeypatch.setenv("R3_MAX_ROLLOUT_TOKENS", "768")
    monkeypatch.setenv("R3_DEVICE", "cpu")
    engine = RewardEngine.from_settings(Settings())
    info = engine.info()["backends"]["r3"]
    assert info["normalize"] is True
    assert info["relevance_in_range"] == [-1.0, 1.0]
    assert info["relevance_out_range"] == [0.0, 7.68]
    scheduler = engine.pool.embedding(str(tiny_bert), True)  # the r3 backends' model, already loaded
    assert torch.allclose(scheduler.model.embed(["x y z"]).norm(dim=-1), torch.ones(1), atol=1e-5)


def test_layers_view_shares_the_weights_and_ends_with_the_sentence_embedding(embedding_model) -> None:
    layers = embedding_model.view("layers")
    assert layers.model is embedding_model.model and layers.tokenizer is embedding_model.tokenizer
    assert embedding_model.view("mean") is embedding_model and embedding_model.pooling == "mean"
    texts = ["Write a poem about the sea.", "What is 2 + 2?"]
    mean, stacked = embedding_model.embed(texts), layers.embed(texts)
    config = embedding_model.model.config
    assert stacked.shape == (2, config.hidden_size * config.num_hidden_layers) == (2, layers.info.dim)
    blocks = stacked.view(2, config.num_hidden_layers, config.hidden_size)
    assert torch.allclose(blocks.norm(dim=-1), torch.ones(2, config.num_hidden_layers), atol=1e-5)
    assert torch.allclose(blocks[:, -1], torch.nn.functional.normalize(mean, dim=-1), atol=1e-5)
    assert not torch.allclose(blocks[:, 0], blocks[:, -1], atol=1e-2)  # lower layers differ
    with pytest.raises(ValueError, match="valid: mean, layers"):
        embedding_model.view("max")


def test_word_vectors_are_the_mean_of_the_texts_word_piece_rows(embedding_model) -> None:
    texts = ["I hope this helps!", "", "Paris"]
    rows = embedding_model.word_vectors(texts)
    table = embedding_model.model.get_input_embeddings().weight
    ids = embedding_model.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4 and rows.shape == (3, table.shape[1])
    assert torch.allclose(rows[0], table[ids].float().mean(0), atol=1e-6)
    assert torch.all(rows[1] == 0)  # nothing to average
    assert not torch.allclose(rows[0], rows[2])


@pytest.mark.slow  # builds a whole engine (both queues measured at start-up)
def test_the_classifier_reads_its_view_through_a_queue_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_DEVICE", "cpu")
    engine = RewardEngine.from_settings(Settings())
    models = {m["pooling"]: m for m in engine.models()}
    assert set(models) == {"mean", "layers"} and models["layers"]["embedding_dim"] == 6 * 384
    mean = engine.pool.embedding(DEFAULT_MODEL, None)
    layers = engine.pool.embedding(DEFAULT_MODEL, None, "layers")
    assert layers is not mean and layers.model.model is mean.model.model  # one copy of the weights
    # Admission charges the backend's own queue; what the classifier embeds is counted there.
    admission = engine.admit({"What is 2+2?", "Four."}, engine.backends["r3"])
    assert mean.held == admission.tokens > 0 and layers.held == 0
    admission.release()
    assert mean.held == 0


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_embeddings(embedding_model) -> None:
    compiled = EmbeddingModel(DEFAULT_MODEL, device="cpu", compile=True)
    assert compiled.info.compiled and not embedding_model.info.compiled
    texts = ["short", "a somewhat longer text " * 5, "and a third one of another length " * 12]
    assert torch.allclose(compiled.embed(texts), embedding_model.embed(texts), atol=1e-5)


@pytest.mark.parametrize("env,needle", [
    ({"R3_RELEVANCE_IN_RANGE": "[1, 1]"}, "lo < hi"),
    ({"R3_DEFAULT_QUERY_TYPE": "sometimes"}, "unknown query type"),
    ({"R3_MAX_ITEMS": "0"}, "greater than 0"),
])
def test_invalid_settings_are_named(env: dict, needle: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=needle):
        Settings()


def cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or torch.cpu.get_capabilities()["architecture"]
                    not in ("x86", "x86_64"), reason="reads x86 Linux CPU flags")
def test_native_bf16_is_detected_from_the_cpu_not_assumed() -> None:
    """The CPU's own flags (the kernel's view) agree with what `auto` reads through torch."""
    flags = cpuinfo_flags()
    assert set(base.native_bf16_cpu_features()) == {"avx512_bf16", "amx_bf16"} & flags
    auto = base.pick_dtype("auto", torch.device("cpu"))
    assert auto.dtype == (torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32)


def test_the_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(base, "native_bf16_cpu_features", lambda: [])
    assert base.pick_dtype("auto", cpu).dtype == torch.float32  # emulated bf16 is slower than fp32
    monkeypatch.setattr(base, "native_bf16_cpu_features", lambda: ["amx_bf16"])
    choice = base.pick_dtype("auto", cpu)
    assert choice.dtype == torch.bfloat16 and "amx_bf16" in choice.reason
    assert base.pick_dtype("float32", cpu) == base.DtypeChoice(torch.float32, "as set")  # exact mode
    assert EmbeddingModel.__init__.__kwdefaults__["dtype"] == "float32"  # tools and heads stay exact


def test_info_shows_the_dtype_auto_chose_and_why() -> None:
    with in_process(dtype="auto") as client:
        backend = client.get("/v1/info").json()["backends"]["r3"]
    expected = base.pick_dtype("auto", torch.device("cpu"))
    assert backend["dtype"] == str(expected.dtype).removeprefix("torch.")
    assert backend["dtype_reason"] == expected.reason and backend["dtype_reason"].startswith("auto:")
