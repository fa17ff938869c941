"""Trainers calling the live service with no glue: OpenRLHF's remote reward model, verl's custom
reward function, and TRL's GRPOTrainer with the client's async reward function."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # real servers, training or process faults throughout

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions. ")


def openrlhf_request(url: str, body: dict) -> dict:
    """What OpenRLHF's remote_rm_fn does: POST JSON, raise for status, read the JSON answer."""
    response = httpx.post(url, json=body, headers={"Content-Type": "application/json"}, timeout=180)
    response.raise_for_status()
    answer = response.json()
    assert "rewards" in answer
    return answer


def test_openrlhf_one_sample_per_request(server_url: str, dataset: list[dict]) -> None:
    """OpenRLHF's --remote_rm_url (newer: --reward.remote_url): one templated sample per request,
    the label column (here the reference) as labels."""
    row = next(r for r in dataset if r["qtype"] == "CONSTRAINED")
    prompt = f"{VICUNA_SYSTEM}USER: {row['input']} ASSISTANT:"
    query = prompt + " " + row["output"] + "</s>"
    answer = openrlhf_request(f"{server_url}/get_reward",
                              {"query": [query], "prompts": [prompt], "labels": [row["output"]]})
    assert len(answer["rewards"]) == len(answer["scores"]) == 1
    assert all(len(values) == 1 for values in answer["extra_logs"].values())
    direct = httpx.post(f"{server_url}/reward", json={"items": [{
        "query": row["input"], "response": row["output"], "reference": row["output"]}]}).json()
    assert answer["rewards"][0] == pytest.approx(direct["rewards"][0], rel=1e-6)


def test_openrlhf_empty_batch(server_url: str) -> None:
    answer = openrlhf_request(f"{server_url}/get_reward", {"query": [], "prompts": [], "labels": []})
    assert answer["rewards"] == [] and answer["scores"] == []


def test_openrlhf_without_labels_uses_the_store_or_default(server_url: str) -> None:
    prompt = "<|im_start|>user\nWrite a limerick about a cat.<|im_end|>\n<|im_start|>assistant\n"
    answer = openrlhf_request(f"{server_url}/get_reward", {
        "query": [prompt + "There once was a cat from Peru.<|im_end|>"], "prompts": [prompt]})
    assert answer["extra_logs"]["closed_branch"] == [0.0]  # default: open
    assert answer["extra_logs"]["length_incentive"] == [pytest.approx(0.08)]  # cut at <|im_end|>


def load_like_verl(path: Path):
    """verl's get_custom_reward_fn: import the file by path, outside any package."""
    spec = importlib.util.spec_from_file_location("custom_module", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_module"] = module
    spec.loader.exec_module(module)
    return module


def test_verl_custom_reward_function(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R3_URL", server_url)
    module = load_like_verl(ROOT / "client" / "r3_client" / "verl_reward.py")
    extra = {"question": "What is the capital of France?", "split": "train", "index": 3}
    score = module.compute_score("alpaca_farm", "Paris is the capital.", "Paris.", extra_info=extra)
    batch = module.compute_score_batch(["alpaca_farm"] * 2, ["Paris is the capital.", "Lyon."],
                                       [{"reference": "Paris.", "query_type": "closed"}, "Paris."],
                                       [extra, extra])
    direct = httpx.post(f"{server_url}/reward", json={"items": [
        {"query": extra["question"], "response": "Paris is the capital.", "reference": "Paris."},
        {"query": extra["question"], "response": "Paris is the capital.", "reference": "Paris.",
         "query_type": "closed"},
        {"query": extra["question"], "response": "Lyon.", "reference": "Paris."}]}).json()["rewards"]
    assert isinstance(score, float) and score == pytest.approx(direct[0], rel=1e-6)
    assert batch == pytest.approx(direct[1:], rel=1e-6)


def test_trl_grpo_trainer_with_the_async_reward_function(server_url: str, tmp_path: Path,
                                                         dataset: list[dict]) -> None:
    """A real trl.GRPOTrainer (tiny random Llama, CPU, 2 steps) rewarded by the live service."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from r3_client.adapters import make_async_reward_func
    from r3_trainer.config import config_from_dict
    from r3_trainer.model import load_base_model, load_tokenizer

    tiny = config_from_dict({"tiny_random_llama": {"hidden_size": 64, "num_layers": 2}, "seed": 0})
    tokenizer = load_tokenizer(tiny)
    model = load_base_model(tiny, tokenizer)
    rows = [{"prompt": r["input"], "reference": r["output"], "qtype": r["qtype"]} for r in dataset[:8]]
    reward_func = make_async_reward_func(server_url)
    before = items_scored(server_url)
    config = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                        max_completion_length=8, max_steps=2, logging_steps=1, report_to=[],
                        use_cpu=True, bf16=False, save_strategy="no", learning_rate=1e-4, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_func], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    try:
        trainer.train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is per process
    assert trainer.state.global_step == 2
    logged = [entry for entry in trainer.state.log_history if "rewards/r3/mean" in entry]
    assert len(logged) == 2 and all(isinstance(e["rewards/r3/mean"], float) for e in logged)
    assert items_scored(server_url) - before >= 2 * 4  # every completion was scored by the service
    json.dumps(trainer.state.log_history)  # the logged rewards are plain numbers


def items_scored(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('r3_items_total{backend="r3",endpoint="/reward"}'))
