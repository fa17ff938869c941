"""PPO trainer pieces against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import r3_trainer
from conftest import in_process
from r3_service.rule.features import GENERIC_STOP_STRINGS, features
from r3_service.rule.templates import TEMPLATES
from r3_trainer import data, ppo
from r3_trainer.checkpoint import moments_state
from r3_trainer.config import ConfigError, TrainConfig, config_from_dict, load_config
from r3_trainer.data import Record
from r3_trainer.rollout import RolloutPipeline

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "trainer" / "configs"


def t(*rows: list[float] | float) -> torch.Tensor:
    """t([1, 2]) and t(1, 2) are vectors, t([1, 2], [3, 4]) a matrix."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float32)


# ------------------------------------------------------------------------------------ GAE


def test_gae_hand_computed_with_padding():
    # Row 0, gamma 1, lam 0.5, r = [0, 0, 1], V = [0.5, 0.25, 0.5]:
    #   t=2: delta = 1 + 0 - 0.5 = 0.5              A2 = 0.5
    #   t=1: delta = 0 + 0.5 - 0.25 = 0.25          A1 = 0.25 + 0.5 * 0.5 = 0.5
    #   t=0: delta = 0 + 0.25 - 0.5 = -0.25         A0 = -0.25 + 0.5 * 0.5 = 0.0
    #   returns = A + V = [0.5, 0.75, 1.0]
    # Row 1: one real token then padding (junk 9s / 7s must not leak in):
    #   t=0: delta = 2 + 0 (next value masked) - 1 = 1, A0 = 1 + 0.5 * 0 = 1; returns [2, 0, 0]
    rewards = t([0, 0, 1], [2, 9, 9])
    values = t([0.5, 0.25, 0.5], [1, 7, 7])
    mask = t([1, 1, 1], [1, 0, 0])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(advantages, t([0, 0.5, 0.5], [1, 0, 0]))
    assert torch.allclose(returns, t([0.5, 0.75, 1.0], [2, 0, 0]))


def test_gae_paper_settings_discount():
    # gamma 0.9, lam 0.95, r = [0, 1], V = [0, 0]:
    #   t=1: delta = 1, A1 = 1;  t=0: delta = 0 + 0.9 * 0 - 0 = 0, A0 = 0 + 0.9 * 0.95 * 1 = 0.855
    advantages, returns = ppo.gae(t([0, 1])[None], t([0, 0])[None], t([1, 1])[None], gamma=0.9, lam=0.95)
    assert torch.allclose(advantages, t([[0.855, 1.0]]))
    assert torch.allclose(returns, t([[0.855, 1.0]]))


# ------------------------------------------------------------------------------------ KL


def test_kl_penalized_rewards_put_score_on_last_real_token():
    # kl = logp - ref = [-1 - -1.5, -2 - -1, masked] = [0.5, -1, 0]
    # rewards = -0.1 * kl, + score 2 on the last unmasked token (index 1): [-0.05, 0.1 + 2, 0]
    # Row 1: a single token: it gets its own penalty and the score -1: -0.1 * (0 - 1) - 1 = -0.9
    logprobs, ref_logprobs = t([-1, -2, -3], [0, 5, 5]), t([-1.5, -1, -3], [1, 0, 0])
    rewards, kl = ppo.kl_penalized_rewards(t(2.0, -1.0), logprobs, ref_logprobs, t([1, 1, 0], [1, 0, 0]), 0.1)
    assert torch.allclose(kl, t([0.5, -1, 0], [-1, 0, 0]))
    assert torch.allclose(rewards, t([-0.05, 2.1, 0], [-0.9, 0, 0]))


def test_adaptive_kl_controller_ziegler_rule():
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # kl 9: error = 9/6 - 1 = 0.5, clipped to 0.2; coef *= 1 + 0.2 * 16 / 10000 = 1.00032 -> 0.200064
    ctl.update(9.0, n_steps=16)
    assert ctl.value == pytest.approx(0.200064, rel=1e-12)
    # kl 5.4: error = 5.4/6 - 1 = -0.1 (inside the clip); coef *= 1 - 0.1 * 100 / 10000 = 0.999
    ctl.update(5.4, n_steps=100)
    assert ctl.value == pytest.approx(0.200064 * 0.999, rel=1e-12)  # 0.199863936
    # kl 0: error -1 clipped to -0.2; coef *= 1 - 0.2 * 10000 / 10000 = 0.8
    ctl.update(0.0, n_steps=10000)
    assert ctl.value == pytest.approx(0.199863936 * 0.8, rel=1e-12)
    restored = ppo.AdaptiveKLController(0.2, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value

    fixed = ppo.FixedKLController(0.2, 6.0, 10000)
    fixed.update(100.0, 16)
    assert fixed.value == 0.2


# ------------------------------------------------------------------------------------ losses


def test_clipped_policy_loss():
    # log-ratios ln 1.5, ln 0.5, ln 0.5 (+ a masked token with junk); advantages 1, 1, -2; clip 0.2
    #   token 0: ratio 1.5, A 1  -> -1.5 vs -1 * 1.2 = -1.2 -> max -1.2 (clipped: no credit past 1.2)
    #   token 1: ratio 0.5, A 1  -> -0.5 vs -1 * 0.8 = -0.8 -> max -0.5 (unclipped)
    #   token 2: ratio 0.5, A -2 -> 2 * 0.5 = 1.0 vs 2 * 0.8 = 1.6 -> max 1.6 (clipped, pessimistic)
    #   loss = (-1.2 - 0.5 + 1.6) / 3 = -0.0333; clipfrac = 2/3
    #   approx_kl = 0.5 * (ln²1.5 + 2 ln²0.5) / 3
    old = t([-1.0, -1.0, -1.0, -1.0])
    new = old + t([math.log(1.5), math.log(0.5), math.log(0.5), 50.0])
    advantages = t([1.0, 1.0, -2.0, 1000.0])
    mask = t([1, 1, 1, 0])
    loss, clipfrac, approx_kl = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-0.1 / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_clipped_value_loss():
    # v = [1.0, 0.0], v_old = [0.5, 0.5], returns = [2, 0], clip 0.2 -> v clipped into [0.3, 0.7]
    #   token 0: (1 - 2)^2 = 1   vs (0.7 - 2)^2 = 1.69 -> 1.69
    #   token 1: (0 - 0)^2 = 0   vs (0.3 - 0)^2 = 0.09 -> 0.09
    #   loss = 0.5 * (1.69 + 0.09) / 2 = 0.445; both took the clipped branch -> clipfrac 1
    loss, clipfrac = ppo.value_loss(t([1.0, 0.0, 9.0]), t([0.5, 0.5, 0.0]), t([2.0, 0.0, -9.0]),
                                    t([1, 1, 0]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.445, rel=1e-6)
    assert clipfrac.item() == 1.0


def test_masked_whiten():
    # unmasked [1, 2, 3]: mean 2, unbiased var ((-1)^2 + 0 + 1^2) / (3 - 1) = 1 -> [-1, 0, 1]
    whitened = ppo.masked_whiten(t([1, 2, 3, 100]), t([1, 1, 1, 0]))
    assert torch.allclose(whitened[:3], t([-1, 0, 1]), atol=1e-6)


def test_entropy_of_uniform_and_certain():
    # uniform over 4: ln 4; one-hot-ish (one logit 1e4 above): ~0
    entropy = ppo.entropy_from_logits(t([0, 0, 0, 0], [1e4, 0, 0, 0]))
    assert entropy[0].item() == pytest.approx(math.log(4), rel=1e-6)
    assert entropy[1].item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------ scores


def test_score_scaling_norm_baseline_and_running_moments():
    shaper = ppo.ScoreShaper(use_scaling=True, use_norm=True, clip=10.0, baseline=1.0)
    # [2, 4] - baseline 1 = [1, 3]: running mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt 2
    out = shaper(t(2.0, 4.0))
    assert torch.allclose(out, t(-1 / math.sqrt(2), 1 / math.sqrt(2)), atol=1e-6)
    # [5, 5] - 1 = [4, 4]: all seen = [1, 3, 4, 4]: mean 3, unbiased var (4 + 0 + 1 + 1) / 3 = 2
    #   -> (4 - 3) / sqrt 2 = 0.7071 for both
    out = shaper(t(5.0, 5.0))
    assert torch.allclose(out, torch.full((2,), 1 / math.sqrt(2)), atol=1e-6)
    assert shaper.running.mean == pytest.approx(3.0)
    assert shaper.running.sample_std == pytest.approx(math.sqrt(2))


def test_score_scaling_without_norm_and_clipping():
    # scaling only: [2, 4] / std sqrt 2 = [1.4142, 2.8284]
    shaper = ppo.ScoreShaper(use_scaling=True, use_norm=False, clip=None)
    assert torch.allclose(shaper(t(2.0, 4.0)), t(2 / math.sqrt(2), 4 / math.sqrt(2)), atol=1e-6)
    # clip only: [25, -3, -12] -> [10, -3, -10]
    clipper = ppo.ScoreShaper(use_scaling=False, use_norm=False, clip=10.0)
    assert clipper(t(25.0, -3.0, -12.0)).tolist() == [10.0, -3.0, -10.0]
    # the moments of all processes' scores drive the scaling of this process's share:
    # all = [0, 4]: mean 2, std sqrt 8; local [4] -> (4 - 2) / sqrt 8 = 0.7071
    shared = ppo.ScoreShaper(use_scaling=True, use_norm=True, clip=None)
    assert shared(t([4.0]), all_scores=t(0.0, 4.0)).item() == pytest.approx(2 / math.sqrt(8), rel=1e-6)


# ------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(("template", "text", "expected"), [
    ("vicuna", "  Paris is the capital. USER: and Rome? ASSISTANT: yes", "Paris is the capital."),
    ("vicuna", "Fine.</s>junk", "Fine."),
    ("llama-2", "Sure thing [INST] next [/INST]", "Sure thing"),
    ("chatml", "Hi there<|im_end|>\n<|im_start|>user\nmore", "Hi there"),
    ("alpaca", "42\n\n### Instruction:\nAnother task", "42"),
    ("alpaca", "A list:\n\n--\nsignature", "A list:"),  # a generic stop string
    ("chatml", "\n\nno stop string here  ", "no stop string here"),
])
def test_rollouts_are_cut_at_the_services_stop_strings(template, text, expected):
    assert data.clean_rollout(text, data.stop_strings(template)) == expected


def test_rollouts_are_cut_where_the_service_cuts_them():
    """The text the trainer logs and pays for ends where the service's reward stops counting."""
    answer = "Paris is the capital of France."
    for name in ("vicuna", "llama-2", "chatml", "alpaca"):
        stops = [*TEMPLATES[name].stop_strings, *GENERIC_STOP_STRINGS]
        rollouts = [f"{answer}{stop} and the next turn goes on and on" for stop in stops]
        with in_process(chat_template=name, default_backend="li") as client:
            served = client.post("/reward", json={"items": [{"query": "Capital of France?", "response": r}
                                                            for r in rollouts],
                                                  "return_components": True}).json()["components"]
        for rollout, parts in zip(rollouts, served, strict=True):
            cut = data.clean_rollout(rollout, data.stop_strings(name))
            assert cut == answer, (name, rollout)
            assert features(cut).length_incentive == parts["length_incentive"], (name, rollout)


def format_prompt(template: str, query: str, system: str | None = None) -> str:
    return TEMPLATES[template].prompt(query, system)


def test_prompt_formats():
    q = "Name a colour."
    assert format_prompt("vicuna", q) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Name a colour. ASSISTANT:")
    assert format_prompt("vicuna", q, system="Be brief.") == "Be brief. USER: Name a colour. ASSISTANT:"
    assert format_prompt("llama-2", q) == "[INST] Name a colour. [/INST]"
    assert format_prompt("llama-2", q, system="Be brief.") == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nName a colour. [/INST]")
    assert format_prompt("chatml", q) == "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("chatml", q, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert format_prompt("alpaca", q) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    # An empty system prompt is none, in every template.
    assert format_prompt("vicuna", q, system="") == "USER: Name a colour. ASSISTANT:"
    assert format_prompt("alpaca", q, system="") == "### Instruction:\nName a colour.\n\n### Response:\n"
    # The service finds the user's words again in each of them.
    for name in ("vicuna", "llama-2", "chatml", "alpaca"):
        assert TEMPLATES[name].user_text(format_prompt(name, q)).endswith("Name a colour.")


def test_records_split_and_order(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"input": "a", "output": "A", "qtype": "OPENENDED"}\n\n{"input": "b", "output": " "}\n'
                     '{"instruction": "c", "qtype": "CONSTRAINED"}\n')
    # The service's reader: its field names and query-type spellings, a blank reference is none.
    assert data.load_records(jsonl) == [Record("a", "A", "open"), Record("b", None, None),
                                        Record("c", None, "closed")]
    (tmp_path / "bad.json").write_text('[{"input": "ok"},\n {"output": "x"},\n'
                                       ' {"input": "y", "qtype": "odd"}]')
    with pytest.raises(ValueError, match=r"bad\.json: 2 malformed record\(s\): line 2: .*; line 3: qtype"):
        data.load_records(tmp_path / "bad.json")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        data.load_records(tmp_path / "empty.jsonl")

    records = [Record(str(i), None, None) for i in range(10)]
    train, dev = data.split_dev(records, 3, seed=0)
    assert len(dev) == 3 and len(train) == 7 and not set(train) & set(dev)
    assert data.split_dev(records, 3, seed=0) == (train, dev)

    order = data.PromptOrder(7, seed=5)
    first = order.indices(0, 7)
    assert sorted(first) == list(range(7))  # an epoch visits each prompt once
    assert order.indices(3, 6) == first[3:] + order.indices(7, 2)  # positions continue across epochs
    assert data.PromptOrder(7, seed=5).indices(5, 4) == order.indices(5, 4)  # a function of the position


def test_score_statistics_of_older_checkpoints_still_load():
    # TRL-style state of [1, 3, 4, 4]: mean 3, population var 6/4 = 1.5, count 4 (+1e-24)
    shaper = ppo.ScoreShaper()
    old = {"mean": 3.0, "var": 1.5, "std": 1.4142, "count": 4 + 1e-24}
    shaper.running.load_state_dict(moments_state(old))
    assert (shaper.running.count, shaper.running.mean) == (4, 3.0)
    assert shaper.running.sample_std == pytest.approx(math.sqrt(2))  # sqrt(6 / 3)
    assert moments_state(shaper.running.state_dict()) == shaper.running.state_dict()


class FakeRollout:
    def __init__(self, position: int) -> None:
        self.position = position
        self.rewards = None


@pytest.mark.parametrize("overlap", [False, True])
def test_rollout_pipeline_order_and_staleness(overlap):
    made: list[int] = []

    def make(position: int) -> FakeRollout:
        made.append(position)
        return FakeRollout(position)

    pipeline = RolloutPipeline(make, position=64, stride=32, overlap=overlap)
    steps = [pipeline.next(more=more) for more in (True, True, False)]
    assert [current.position for current, _ in steps] == [64, 96, 128]  # every batch, in order
    assert made == [64, 96, 128]  # each sampled once, none past the last step
    sampled = [[r.position for r in generated] for _, generated in steps]
    # With overlap, each step samples the next batch before the current one is trained on.
    assert sampled == ([[64, 96], [128], []] if overlap else [[64], [96], [128]])


# ------------------------------------------------------------------------------------ boundaries

IMPORT_CHECK = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(n for n in sys.modules if n.startswith("r3_service.")
                        and n not in ("r3_service.rule", "r3_service.caches")
                        and not n.startswith("r3_service.rule."))))
"""


def service_modules_imported_by(*modules: str) -> list[str]:
    """The r3_service modules outside r3_service.rule (and the standard-library-only caches the rule
    memoizes with) that importing `modules` loads (fresh process)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK, *modules], capture_output=True, text=True,
                          timeout=240, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and peft: ~8 s
def test_the_trainer_imports_only_the_rule_of_the_service():
    modules = [f"r3_trainer.{m.name}" for m in pkgutil.iter_modules(r3_trainer.__path__)]
    assert {"r3_trainer.trainer", "r3_trainer.rollout", "r3_trainer.data", "r3_trainer.ppo"} <= set(modules)
    assert service_modules_imported_by(*modules) == []
    # The check sees what it is looking for: the service's settings are outside the rule.
    assert "r3_service.settings" in service_modules_imported_by("r3_trainer.data", "r3_service.settings")


# ------------------------------------------------------------------------------------ config


def test_defaults_are_the_papers_settings():
    cfg = TrainConfig(model_name_or_path="m")
    assert (cfg.learning_rate, cfg.batch_size, cfg.gradient_accumulation_steps) == (1e-5, 4, 4)
    assert cfg.ppo_epochs == 4 and cfg.max_new_tokens == 512
    assert (cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl) == (0.2, 6.0, 10000, True)
    assert (cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, cfg.gamma, cfg.lam) == (0.2, 0.2, 1.0, 1.0, 0.95)
    assert (cfg.use_score_scaling, cfg.use_score_norm, cfg.score_clip) == (True, True, 10.0)
    assert (cfg.top_k, cfg.top_p, cfg.temperature) == (0, 1.0, 1.0)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.rollout_batch_size == 16


def test_example_config_documents_the_defaults():
    cfg = load_config(CONFIGS / "example.yaml")
    assert cfg == TrainConfig(model_name_or_path=cfg.model_name_or_path)
    tiny = load_config(CONFIGS / "tiny-cpu.yaml")
    assert tiny.tiny_random_llama is not None and tiny.reward_backend == "li"


def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"key\(s\): learning_rte \(did you mean learning_rate\?\)"):
        config_from_dict({"model_name_or_path": "m", "learning_rte": 1e-5})
    with pytest.raises(ConfigError, match=r"lora\.dropuot \(did you mean lora\.dropout\?\)"):
        config_from_dict({"model_name_or_path": "m", "lora": {"dropuot": 0.1}})
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key\(s\): bogus"):
        load_config(path)


@pytest.mark.parametrize(("data", "message"), [
    ({"learning_rate": "fast"}, "learning_rate: Input should be a valid number, got 'fast'"),
    ({"steps": 1.5}, "steps: Input should be a valid integer, got 1.5"),
    ({"overlap_generation": "yes"}, "overlap_generation: Input should be a valid boolean"),
    ({"chat_template": "zephyr"},
     "chat_template: Input should be 'model', 'vicuna', 'llama-2', 'chatml' or 'alpaca'"),
    ({"steps": 0}, "steps: Input should be greater than or equal to 1, got 0"),
    ({"top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
    ({"score_clip": 0}, "score_clip: Input should be greater than 0"),
    ({"lora": {"r": 0}}, r"lora\.r: Input should be greater than or equal to 1"),
    ({"lora": {"target_modules": ["q", 3]}}, r"lora\.target_modules\[1\]: Input should be a valid string"),
    ({"tiny_random_llama": {}}, "exactly one of model_name_or_path and tiny_random_llama"),
    ({"use_score_scaling": False}, "use_score_norm: only applies"),
])
def test_invalid_values_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model_name_or_path": "m", **data})


def test_values_and_overrides_are_coerced():
    # PyYAML reads 1e-5 (no dot) as a string; it is still a float here. Overrides are YAML too.
    overrides = ["steps=7", "lora.r=8", "lora.target_modules=[q_proj, k_proj]", "reward_backend=null"]
    cfg = config_from_dict({"model_name_or_path": "m", "learning_rate": "1e-5", "score_clip": None,
                            "kl_target": 6}, overrides)
    assert cfg.learning_rate == 1e-5 and cfg.score_clip is None and cfg.steps == 7
    assert isinstance(cfg.kl_target, float) and cfg.to_dict()["lora"]["r"] == 8
    assert cfg.lora.r == 8 and cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.reward_backend is None
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config_from_dict({"model_name_or_path": "m"}, ["steps"])
    given = {"model_name_or_path": "m", "lora": {"r": 4}}
    assert config_from_dict(given, ["lora.r=8"]).lora.r == 8 and given["lora"]["r"] == 4  # not edited


# ------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_rollout_logprobs_are_the_sampling_distribution(temperature):
    """The log-probs PPO stores for a rollout are exactly those generate() sampled from (at the
    sampling temperature), the pad token is never sampled (it marks the end), and with adapters
    off the policy is the reference."""
    from r3_trainer.model import build_policy, end_token_ids, generation_config, load_tokenizer

    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["max_new_tokens=5", f"temperature={temperature}"])
    tokenizer = load_tokenizer(cfg)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    policy = build_policy(cfg, tokenizer).eval()
    prompts = tokenizer(["USER: hi ASSISTANT:", "USER: a much longer question here ASSISTANT:"],
                        padding=True, return_tensors="pt", return_token_type_ids=False)
    assert (prompts["attention_mask"][0, 0] == 0).item()  # left padding
    gen = generation_config(cfg, tokenizer, end_token_ids(tokenizer, data.stop_strings("vicuna")))
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.lm.generate(**prompts, generation_config=gen, output_scores=True,
                                 return_dict_in_generate=True)
        response = out.sequences[:, prompts["input_ids"].shape[1]:]
        assert response.shape == (2, 5) and not (response == tokenizer.pad_token_id).any()
        sampled_logits = torch.stack(out.scores, 1).float()  # after the temperature, as sampled
        sampled = torch.log_softmax(sampled_logits, -1).gather(-1, response[..., None])[..., 0]
        ids = torch.cat([prompts["input_ids"], response], 1)
        mask = torch.cat([prompts["attention_mask"], torch.ones_like(response)], 1)
        logits, values = policy(ids, mask, response.shape[1])
        stored = torch.log_softmax(logits, -1).gather(-1, response[..., None])[..., 0]
        with policy.lm.disable_adapter():
            ref_logits, _ = policy(ids, mask, response.shape[1])
    assert torch.allclose(stored, sampled, atol=1e-4)
    assert values.shape == (2, 5) and torch.isfinite(values).all()
    assert torch.equal(ref_logits, logits)  # LoRA's B starts at zero: policy == reference at step 0
    with torch.no_grad():
        policy.lm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.fill_(0.5)
        moved, _ = policy(ids, mask, response.shape[1])
        with policy.lm.disable_adapter():
            still_ref, _ = policy(ids, mask, response.shape[1])
    assert not torch.allclose(moved, logits) and torch.equal(still_ref, ref_logits)


def test_the_models_own_chat_template_gives_prompts_and_stop_strings():
    """chat_template: model renders with the tokenizer's template and recognises ChatML's markers
    as stop strings (with the generic ones), as the service would cut the rollout."""
    from r3_trainer.model import load_tokenizer

    tokenizer = load_tokenizer(load_config(CONFIGS / "tiny-cpu.yaml"))
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fmt = data.prompt_format("model", None, tokenizer)
    assert fmt.render("Name a colour.") == (
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert data.prompt_format("model", "Be brief.", tokenizer).render("Hi").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")
    assert set(TEMPLATES["chatml"].stop_strings) <= set(fmt.stops)
    assert set(GENERIC_STOP_STRINGS) <= set(fmt.stops) and tokenizer.eos_token in fmt.stops
    assert data.clean_rollout("Red.<|im_end|>\n<|im_start|>user\nmore", fmt.stops) == "Red."
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        data.prompt_format("model", None, tokenizer)


def test_the_packaged_smollm2_is_found_without_importing_its_package():
    from r3_trainer.model import model_source

    cfg = config_from_dict({"model_name_or_path": "packaged:smollm2"})
    directory, extra = model_source(cfg)
    assert (Path(directory) / extra["gguf_file"]).stat().st_size > 50_000_000
    with pytest.raises(ConfigError, match="gguf_file: needs model_name_or_path"):
        config_from_dict({"tiny_random_llama": {}, "gguf_file": "x.gguf"})


def test_text_signals_count_copies_empties_and_words():
    from accelerate import Accelerator

    from r3_trainer.stats import text_signals

    queries = ["What is the capital city of France?"] * 4
    texts = ["What is the capital city of France?", "", "Paris.", "Paris is the capital city of France."]
    got = text_signals(Accelerator(cpu=True), queries, texts, 0.5, "eval/")
    assert got["eval/hack/copy_share"] == pytest.approx(2 / 4)  # the echo, and 5 of 8 words copied
    assert got["eval/hack/empty_share"] == pytest.approx(1 / 4)
    assert got["eval/response/words"] == pytest.approx((8 + 0 + 2 + 8) / 4)
    assert got["eval/hack/echo_share"] == pytest.approx(1 / 4)  # rule.guards: the question pasted back
    assert got["eval/hack/repeat_share"] == 0 and got["eval/hack/input_echo_share"] == 0


def test_hack_watch_warns_past_each_bound_and_on_length_growth():
    from r3_trainer.config import HackBounds
    from r3_trainer.stats import HackWatch

    watch = HackWatch(HackBounds(), baseline_steps=2)
    calm = {"hack/copy_share": 0.0, "hack/empty_share": 0.0, "hack/truncated_share": 0.1,
            "components/repetition_penalty": 0.95, "response/words": 20.0}
    assert watch.check(calm) == [] and watch.check({**calm, "response/words": 30.0}) == []
    bad = watch.check({"hack/copy_share": 0.5, "hack/empty_share": 0.3, "hack/truncated_share": 0.95,
                       "components/repetition_penalty": 0.5, "response/words": 51.0})
    assert [w.split("=")[0] for w in bad] == ["hack/copy_share", "hack/empty_share", "hack/truncated_share",
                                              "components/repetition_penalty", "response/words"]
    assert "2 x 25.0" in bad[-1]  # growth against the first two steps' mean length
    quiet = HackWatch(HackBounds(copy_share=None, length_growth=None))
    assert quiet.check({"hack/copy_share": 1.0, "response/words": 1e6}) == []


def test_grpo_keeps_the_log_probs_generation_sampled_with():
    """grpo takes the behaviour log-probs from generation itself (no second forward pass): they
    equal the policy's forward log-probs of the same tokens, rows of every length included, and
    the reference's are those with the adapters off."""
    from accelerate import Accelerator

    from r3_trainer.model import build_policy, load_tokenizer, response_logprobs
    from r3_trainer.rollout import RolloutMaker

    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["max_new_tokens=12", "advantage_estimator=grpo",
                                                 "group_size=2", "temperature=0.8"])
    tokenizer = load_tokenizer(cfg)
    policy = build_policy(cfg, tokenizer)
    with torch.no_grad():  # adapters away from zero, so the policy is not the reference
        for name, weight in policy.lm.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    maker = RolloutMaker(cfg, Accelerator(cpu=True), tokenizer, policy, None)
    queries = ("hi", "a much longer question with more words here", "why")
    records = [Record(q, None, None) for q in queries] * 2
    torch.manual_seed(3)
    sampled = maker.generate(records, keep_logprobs=True)
    mask = sampled.response_mask
    assert sampled.logprobs is not None and math.isfinite(sampled.entropy)
    logprobs, ref_logprobs, values, entropy = maker._forward(sampled)
    assert logprobs is sampled.logprobs and entropy == sampled.entropy and not values.any()
    ids = torch.cat([sampled.prompt_ids, sampled.response_ids], 1)
    full_mask = torch.cat([sampled.prompt_mask, mask.long()], 1)
    with torch.no_grad():
        forward = response_logprobs(policy.eval(), ids, full_mask, sampled.response_ids)[0] * mask
        with policy.lm.disable_adapter():
            reference = response_logprobs(policy, ids, full_mask, sampled.response_ids)[0] * mask
    assert torch.allclose(sampled.logprobs, forward, atol=1e-4)
    assert torch.allclose(ref_logprobs, reference, atol=1e-4)
    assert not torch.allclose(forward, reference, atol=1e-3)


def test_group_advantages_and_the_k3_kl():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 0.5, 1.0, 4.0])
    advantages = ppo.group_advantages(rewards, 2)
    assert torch.allclose(advantages[:2], torch.tensor([-1.0, 1.0]) / 2 ** 0.5, atol=1e-5)
    assert torch.equal(advantages[2:4], torch.zeros(2))  # a tied group teaches nothing
    four = ppo.group_advantages(rewards, 4)
    group = rewards[:4]
    assert torch.allclose(four[:4], (group - group.mean()) / (group.std() + 1e-6), atol=1e-5)
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(ppo.kl_k3(logprobs, logprobs), torch.zeros(3))
    ref = torch.tensor([-1.5, -1.0, -0.5])
    d = ref - logprobs
    assert torch.allclose(ppo.kl_k3(logprobs, ref), d.exp() - d - 1) and (ppo.kl_k3(logprobs, ref) >= 0).all()


def test_groups_must_fit_the_batch():
    with pytest.raises(ConfigError, match="group_size: must divide"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["group_size=3"])
    with pytest.raises(ConfigError, match="grpo compares samples of one prompt"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["advantage_estimator=grpo"])


def test_rouge_l_by_hand():
    from r3_trainer.evaluation import rouge_l

    # LCS of "the cat sat on the mat" and "the cat lay on a mat": the cat on mat = 4 words.
    expected = 2 * (4 / 6) * (4 / 6) / (4 / 6 + 4 / 6)
    assert rouge_l("The cat sat on the mat.", "the cat lay on a mat")[2] == pytest.approx(expected)
    assert rouge_l("Paris", "Paris") == (1.0, 1.0, 1.0)
    assert rouge_l("", "Paris") == rouge_l("x y", "z") == (0.0, 0.0, 0.0)
    # A longer answer that still covers the reference: recall holds, precision and F1 fall.
    precision, recall, f1 = rouge_l("Paris, of course: Paris is the capital of France", "Paris")
    assert (precision, recall) == (pytest.approx(1 / 9), 1.0) and f1 == pytest.approx(0.2)


def test_compare_pairs_each_run_with_its_own_start(tmp_path):
    """compare: the change is latest - start over the same prompts, with the paired standard
    error; open/closed splits and hack shares come from the rows."""
    from r3_trainer import compare

    def row(query_type: str, reward: float, words: int, rouge: float | None, repeat: bool) -> dict:
        hacks = dict.fromkeys(("copy", "echo", "input_echo", "restate", "repeat", "filler"), False)
        return {"query": f"q{words}", "query_type": query_type, "text": "w " * words, "words": words,
                "truncated": False, "reward": {"r3": reward, "li": words / 100}, "rouge_l": rouge,
                "hacks": {**hacks, "repeat": repeat}, "filler_scored": False}

    run = tmp_path / "r3"
    (run / "eval").mkdir(parents=True)
    start = [row("open", 0.1, 10, None, False), row("closed", 0.2, 20, 0.5, False),
             row("open", 0.3, 30, None, False)]
    latest = [row("open", 0.2, 12, None, True), row("closed", 0.4, 20, 0.25, False),
              row("open", 0.3, 40, None, True)]
    for step, table in ((0, start), (50, latest)):
        (run / "eval" / f"step-{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    assert compare.main([str(run), "--out", str(tmp_path / "out"), "--show", "2"]) == 0
    (summary,) = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert summary["steps"] == [0, 50] and summary["backend"] == "r3"
    diffs = [0.1, 0.2, 0.0]
    mean = sum(diffs) / 3
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert summary["paired"]["reward[r3]"]["mean"] == pytest.approx(mean)
    assert summary["paired"]["reward[r3]"]["se"] == pytest.approx(se)
    assert summary["paired"]["reward[r3]/open"]["n"] == 2
    assert summary["paired"]["rouge_l_closed"] == {"mean": pytest.approx(-0.25), "se": 0.0, "n": 1}
    assert summary["latest"]["hack/repeat_share"]["mean"] == pytest.approx(2 / 3)
    assert summary["paired"]["hack/filler_share"]["n"] == 0  # no guarded backend scored these
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert "| reward[r3] | 0.200 ± 0.058 | 0.300 ± 0.058 | +0.100 ± 0.058 | +1.7 |" in markdown
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
