"""Backends chosen per deployment: the YAML config, the sequence-classification reward model
(a tiny randomly initialised one saved to disk: no hub here), ensembles, and model sharing."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError

from conftest import ROOT, in_process, save_tiny_bert
from r3_service.models.reward_model import RewardModel
from r3_service.rule.moments import RunningMoments
from r3_service.rule.templates import TEMPLATES
from r3_service.settings import DEFAULT_MODEL, EnsembleSpec, R3BackendSpec, RewardModelSpec, Settings

QUERY = "What is the capital of France?"
RESPONSES = ["Paris is the capital of France.", "I like turtles very much, they are green.",
             "The capital is Paris, a city on the Seine with about two million inhabitants."]


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sequence classifier with one logit; a wide init so different inputs score apart."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-rm"), "BertForSequenceClassification",
                          num_labels=1, initializer_range=0.5)


def direct_rewards(path: Path, inputs: list[dict[str, torch.Tensor]]) -> list[float]:
    """The model called the plain transformers way, one unpadded input at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.inference_mode():
        return [float(model(**encoded).logits[0, 0]) for encoded in inputs]


def test_reward_model_pairs_score_as_transformers_does(tiny_rm: Path) -> None:
    model = RewardModel(str(tiny_rm), device="cpu")
    rows = model.forward(model.tokenize([(QUERY, r) for r in RESPONSES]))  # one padded batch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_rm)
    expected = direct_rewards(tiny_rm, [tokenizer(QUERY, r, return_tensors="pt") for r in RESPONSES])
    assert rows.shape == (3, 1)
    assert rows[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == 3  # the check can tell the inputs apart


def test_reward_model_with_a_named_template(tiny_rm: Path) -> None:
    model = RewardModel(str(tiny_rm), input_format="vicuna", device="cpu")
    rows = model.forward(model.tokenize([(QUERY, r) for r in RESPONSES]))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_rm)
    texts = [f"USER: {QUERY} ASSISTANT: {r}" for r in RESPONSES]
    expected = direct_rewards(tiny_rm, [tokenizer(t, return_tensors="pt") for t in texts])
    assert rows[:, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_model_refuses_what_it_cannot_do(tiny_rm: Path) -> None:
    with pytest.raises(ValueError, match="chat template"):
        RewardModel(str(tiny_rm), input_format="chat", device="cpu")
    with pytest.raises(ValueError, match="1 labels; label 3"):
        RewardModel(str(tiny_rm), label=3, device="cpu")


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendered_exchanges_split_back_into_query_and_response(name: str) -> None:
    from r3_service.rule.templates import extract_query

    template = TEMPLATES[name]
    text = template.render(QUERY, RESPONSES[0])
    prompt, response = template.split(text) or ("", "")
    assert extract_query(text) == QUERY and RESPONSES[0] in response and QUERY in prompt


def test_running_moments_match_the_whole_sample() -> None:
    values = [0.3, -1.2, 4.0, 2.5, 2.5, 0.0, 7.25]
    moments = RunningMoments()
    for chunk in (values[:1], values[1:4], [], values[4:]):
        moments.update(chunk)
    assert moments.count == 7
    assert moments.mean == pytest.approx(statistics.fmean(values))
    assert moments.std == pytest.approx(statistics.pstdev(values))


def write_config(tmp: Path, config: dict) -> Path:
    path = tmp / "deploy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_file_declares_backends_and_env_overrides_it(tmp_path: Path, monkeypatch) -> None:
    path = write_config(tmp_path, {"default_backend": "quick", "max_rollout_tokens": 768, "backends": {
        "quick": {"kind": "r3", "preset": "li"},
        "rm": {"kind": "hf-reward-model", "model": "/models/rm"},
        "mix": {"kind": "ensemble", "members": [{"backend": "quick"}, {"backend": "rm", "weight": 0.5}]},
    }})
    settings = Settings(config=str(path))
    assert settings.default_backend == "quick" and settings.max_rollout_tokens == 768
    assert isinstance(settings.backends["quick"], R3BackendSpec)
    assert isinstance(settings.backends["rm"], RewardModelSpec)
    assert isinstance(settings.backends["mix"], EnsembleSpec)
    monkeypatch.setenv("R3_CONFIG", str(path))
    monkeypatch.setenv("R3_MAX_ROLLOUT_TOKENS", "1024")
    assert Settings().max_rollout_tokens == 1024


@pytest.mark.parametrize("config,needle", [
    ({"backends": {"a": {"kind": "r3", "preset": "gpt-judge"}}}, "unknown preset 'gpt-judge'"),
    ({"backends": {"a": {"kind": "telepathy"}}}, "kind"),
    ({"backends": {"a": {"kind": "r3", "modle": "x"}}}, "modle"),
    ({"default_backend": "b", "backends": {"a": {"kind": "r3"}}}, "default_backend 'b'"),
    ({"backends": {"r3": {"kind": "r3"}, "m": {"kind": "ensemble", "members": [{"backend": "nope"}]}}},
     "member 'nope'"),
    ({"backends": {"r3": {"kind": "r3"},
                   "m": {"kind": "ensemble", "members": [{"backend": "r3", "std": 0}]}}}, "std"),
    ({"backends": {"r3": {"kind": "hf-reward-model", "model": "m", "input_format": "xml"}}}, "input_format"),
    ({"max_batch_tokens": 0}, "max_batch_tokens"),
    ({"max_batch_tokns": 10}, "unknown setting(s) max_batch_tokns"),
])
def test_bad_config_is_refused_naming_the_problem(tmp_path: Path, config: dict, needle: str) -> None:
    with pytest.raises((ValidationError, ValueError)) as error:
        Settings(config=str(write_config(tmp_path, config)))
    assert needle in str(error.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        Settings(config=str(tmp_path / "absent.yaml"))


# configs/serve.yaml is Ray Serve's (tests/test_ray.py), audit-thresholds.yaml r3-audit's
# (tests/test_audit.py); the others are r3 deployment files.
DEPLOYMENT_FILES = sorted(set((ROOT / "configs").glob("*.yaml"))
                          - {ROOT / "configs" / "serve.yaml", ROOT / "configs" / "audit-thresholds.yaml"})


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    settings = Settings(config=str(path))
    assert settings.default_backend in settings.backends


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, tiny_rm: Path) -> Iterator[TestClient]:
    """An app (in this process) whose backends come from a config file: two R3 backends on one
    model, a reward model, and an ensemble of them."""
    tmp = tmp_path_factory.mktemp("deployment")
    path = write_config(tmp, {"default_backend": "r3", "backends": {
        "r3": {"kind": "r3"},
        "r3-wide": {"kind": "r3", "relevance_in_range": [-1, 1], "max_rollout_tokens": 1024},
        "rm": {"kind": "hf-reward-model", "model": str(tiny_rm)},
        "mix": {"kind": "ensemble", "members": [
            {"backend": "r3", "weight": 1.0},
            {"backend": "rm", "weight": 0.5, "standardize": "fixed", "mean": 0.25, "std": 2.0}]},
        "mix-running": {"kind": "ensemble", "members": [
            {"backend": "r3", "weight": 2.0, "standardize": "running"}, {"backend": "rm", "weight": -1.0}]},
    }})
    with in_process(config=str(path)) as client:
        yield client


def score(client: TestClient, backend: str, items: list[dict]) -> dict:
    got = client.post("/reward", json={"items": items, "backend": backend, "return_components": True})
    assert got.status_code == 200, got.text
    return got.json()


CLOSED = [{"query": QUERY, "response": r, "reference": "Paris.", "query_type": "closed"} for r in RESPONSES]


def test_info_lists_backends_and_shares_models(deployment: TestClient, tiny_rm: Path) -> None:
    info = deployment.get("/v1/info").json()
    assert set(info["backends"]) == {"r3", "r3-wide", "rm", "mix", "mix-running"}
    rm = info["backends"]["rm"]
    assert rm["kind"] == "hf-reward-model" and rm["model"] == str(tiny_rm)
    assert info["backends"]["r3-wide"]["relevance_in_range"] == [-1.0, 1.0]
    assert info["backends"]["r3-wide"]["relevance_out_range"] == [0.0, 10.24]
    assert info["backends"]["mix"]["members"][1] == {"backend": "rm", "weight": 0.5, "standardize": "fixed",
                                                      "mean": 0.25, "std": 2.0}
    # r3 and r3-wide name the same model: it is loaded once (a `layers` view of it for the query-type
    # head), beside the reward model.
    assert sorted((m["model"], m.get("pooling")) for m in info["models"]) == sorted(
        [(DEFAULT_MODEL, "mean"), (DEFAULT_MODEL, "layers"), (str(tiny_rm), None)])


def test_backends_are_picked_per_request(deployment: TestClient, tiny_rm: Path) -> None:
    r3, wide, rm = (score(deployment, name, CLOSED) for name in ("r3", "r3-wide", "rm"))
    assert r3["backend"] == "r3" and rm["backend"] == "rm"
    # Same relevance, another linear map: f(s) = (s + 1) / 2 * 10.24 instead of s * 5.12.
    for a, b in zip(r3["components"], wide["components"], strict=True):
        assert a["relevance"] == pytest.approx(b["relevance"], abs=1e-6)
    assert wide["rewards"] == pytest.approx(
        [(c["relevance"] + 1) / 2 * 10.24 * c["repetition_penalty"] for c in wide["components"]], rel=1e-5)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_rm)
    expected = direct_rewards(tiny_rm, [tokenizer(QUERY, r, return_tensors="pt") for r in RESPONSES])
    assert rm["rewards"] == pytest.approx(expected, abs=1e-5)
    assert all(c["relevance"] is None and c["length_incentive"] > 0 for c in rm["components"])


def test_ensemble_is_the_weighted_sum_of_standardised_members(deployment: TestClient) -> None:
    r3, rm, mix = (score(deployment, name, CLOSED) for name in ("r3", "rm", "mix"))
    expected = [a + 0.5 * (b - 0.25) / 2.0 for a, b in zip(r3["rewards"], rm["rewards"], strict=True)]
    assert mix["rewards"] == pytest.approx(expected, abs=1e-5)
    first = mix["components"][0]
    assert first["members"] == pytest.approx({"r3": r3["rewards"][0], "rm": (rm["rewards"][0] - 0.25) / 2})
    assert first["relevance"] == pytest.approx(r3["components"][0]["relevance"])  # R3's parts kept


def test_running_standardisation_uses_every_reward_seen(deployment: TestClient) -> None:
    seen: list[float] = []
    for batch in (CLOSED[:2], CLOSED[1:]):
        r3, rm, mix = (score(deployment, name, batch) for name in ("r3", "rm", "mix-running"))
        seen += r3["rewards"]
        mean, std = statistics.fmean(seen), statistics.pstdev(seen)
        expected = [2.0 * (a - mean) / std - b for a, b in zip(r3["rewards"], rm["rewards"], strict=True)]
        assert mix["rewards"] == pytest.approx(expected, abs=1e-4)
        assert all(math.isfinite(r) for r in mix["rewards"])


def test_openrlhf_logs_each_ensemble_member(deployment: TestClient) -> None:
    got = deployment.post("/get_reward", json={
        "query": [f"USER: {QUERY} ASSISTANT: {RESPONSES[0]}"], "backend": "mix"}).json()
    assert set(got["extra_logs"]) >= {"reward_r3", "reward_rm", "relevance", "length_incentive"}
    assert got["rewards"][0] == pytest.approx(got["extra_logs"]["reward_r3"][0]
                                              + 0.5 * got["extra_logs"]["reward_rm"][0], abs=1e-6)


def test_unknown_backend_lists_the_configured_names(deployment: TestClient) -> None:
    got = deployment.post("/reward", json={"items": CLOSED[:1], "backend": "li"})
    assert got.status_code == 422
    assert all(name in got.json()["detail"] for name in ("r3", "r3-wide", "rm", "mix", "mix-running"))
