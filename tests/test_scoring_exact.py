"""The served rewards equal R3 computed independently from the spec (to 1e-4 relative).

The oracle uses sentence-transformers' own pipeline for E (mean pooling + normalisation, as the
packaged MiniLM is published) and NLTK's wordpunct tokenizer for LI/RP: none of the service's code.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from nltk.tokenize import wordpunct_tokenize

from r3_service.models.base import resolve_model_path
from r3_service.settings import DEFAULT_MODEL

OUT_HI = 512 / 100
IN_LO, IN_HI = 0.311, 3.622  # the packaged model's closed-branch range (README, r3-calibrate)


@pytest.fixture(scope="module")
def oracle_encoder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(DEFAULT_MODEL), device="cpu")


def oracle_r3(encoder, query: str, response: str, reference: str | None, query_type: str) -> dict:
    tokens = wordpunct_tokenize(response.strip())
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    rp = len(set(trigrams)) / len(trigrams) if trigrams else 1.0
    li = len(tokens) / 100
    closed = query_type == "closed" and reference is not None
    other = reference if closed else query
    e_other, e_response = encoder.encode([other, response.strip()], normalize_embeddings=False)
    s = float(np.dot(e_other, e_response))
    reward = (s - IN_LO) / (IN_HI - IN_LO) * OUT_HI * rp if closed else li * s * rp
    return {"reward": reward, "li": li, "rp": rp, "s": s}


def short_enough(encoder, *texts: str) -> bool:
    """The oracle truncates on the right, the service on the left: compare where neither cuts."""
    return all(len(encoder.tokenizer(t)["input_ids"]) <= 256 for t in texts)


def test_reward_matches_the_spec_on_alpacafarm(server_url: str, dataset: list[dict], oracle_encoder) -> None:
    rows = [r for r in dataset[:80] if short_enough(oracle_encoder, r["input"], r["output"])][:40]
    assert len(rows) >= 30
    items, expected = [], []
    for i, row in enumerate(rows):
        query_type = "closed" if row["qtype"] == "CONSTRAINED" else "open"
        # Responses: the reference itself, another row's answer, and a repetitive one.
        response = [row["output"], rows[(i + 1) % len(rows)]["output"],
                    "the same words again " * 5][i % 3]
        items.append({"query": row["input"], "response": response, "reference": row["output"],
                      "query_type": query_type})
        expected.append(oracle_r3(oracle_encoder, row["input"], response, row["output"], query_type))
    got = httpx.post(f"{server_url}/reward", json={"items": items, "return_components": True},
                     timeout=120).json()
    assert got["backend"] == "r3"
    for reward, component, want in zip(got["rewards"], got["components"], expected, strict=True):
        assert reward == pytest.approx(want["reward"], rel=1e-4, abs=1e-6)
        assert component["relevance"] == pytest.approx(want["s"], rel=1e-4, abs=1e-6)
        assert component["length_incentive"] == pytest.approx(want["li"])
        assert component["repetition_penalty"] == pytest.approx(want["rp"])
    assert {c["relevance_target"] for c in got["components"]} == {"query", "reference"}


def test_get_reward_matches_the_spec(server_url: str, dataset: list[dict], oracle_encoder) -> None:
    rows = [r for r in dataset[:30] if short_enough(oracle_encoder, r["input"], r["output"])][:10]
    system = "A chat between a curious user and an artificial intelligence assistant. "
    prompts = [f"{system}USER: {r['input']} ASSISTANT:" for r in rows]
    responses = [f" {r['output']}</s>USER: thanks! ASSISTANT: more text" for r in rows]
    labels = [{"reference": r["output"], "query_type": r["qtype"]} for r in rows]
    body = {"query": [p + resp for p, resp in zip(prompts, responses, strict=True)],
            "prompts": prompts, "labels": labels}
    got = httpx.post(f"{server_url}/get_reward", json=body, timeout=120).json()
    for i, row in enumerate(rows):
        query_type = "closed" if row["qtype"] == "CONSTRAINED" else "open"
        # The response is cut at the template's "</s>"/"USER:" and the query is the user's words.
        want = oracle_r3(oracle_encoder, " ".join(row["input"].split()), row["output"], row["output"],
                         query_type)
        assert got["rewards"][i] == pytest.approx(want["reward"], rel=1e-4, abs=1e-6)
        assert got["scores"][i] == got["rewards"][i]
        assert got["extra_logs"]["length_incentive"][i] == pytest.approx(want["li"])
        assert got["extra_logs"]["relevance"][i] == pytest.approx(want["s"], rel=1e-4, abs=1e-6)
        assert got["extra_logs"]["closed_branch"][i] == float(query_type == "closed")


def test_left_truncation_keeps_the_end_of_long_texts(embedding_model) -> None:
    """Two texts that differ only before their last 254 tokens embed identically; same start
    with a different end does not: the model sees the end of the text, as the reference does."""
    assert embedding_model.max_length == 256
    tail = " ".join(f"ending{i} word" for i in range(200))  # far more than 254 tokens
    a, b, tail_alone = embedding_model.embed(["trains and weather " * 300 + tail,
                                              "medieval poetry forms " * 300 + tail, tail])
    assert np.allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert np.allclose(a.numpy(), tail_alone.numpy(), atol=1e-6)
    c, d = embedding_model.embed([tail + " and then a different ending entirely",
                                  tail + " while this one closes on another note"])
    assert not np.allclose(c.numpy(), d.numpy(), atol=1e-3)


def test_batch_composition_does_not_change_a_score(server_url: str) -> None:
    item = {"query": "Explain photosynthesis.", "response": "Plants turn light into chemical energy."}
    alone = httpx.post(f"{server_url}/reward", json={"items": [item]}, timeout=30).json()["rewards"][0]
    others = [{"query": f"Question {i}?", "response": "word " * (i * 40)} for i in range(1, 12)]
    mixed = httpx.post(f"{server_url}/reward", json={"items": [*others, item, *others]},
                       timeout=60).json()["rewards"]
    assert mixed[len(others)] == pytest.approx(alone, rel=1e-5)
