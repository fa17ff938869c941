"""Trainer configuration: one YAML file into typed dataclasses, unknown keys rejected.

Defaults follow the PPO settings of the R3 paper (R3-SPEC.md, "PPO settings the paper used"):
lr 1e-5 constant, batch 4/GPU x grad-accum 4, 4 PPO epochs, adaptive KL 0.2 -> target 6 over a
horizon of 10000, clip 0.2, value clip 0.2, vf coef 1.0, gamma 1, lambda 0.95, score scaling +
normalisation with clip 10, top_k 0 / top_p 1.0 sampling, LoRA on q_proj/v_proj.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

CHAT_TEMPLATES = ("vicuna", "llama-2", "chatml", "alpaca")
MIXED_PRECISION = ("no", "fp16", "bf16")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TinyLlamaSettings:
    """A randomly initialised LlamaForCausalLM with the packaged MiniLM tokenizer (tests, demos)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    # HF's default is 0.02; a larger value gives the random model peaked next-token distributions
    # that LoRA can actually move (see configs/tiny-cpu.yaml).
    initializer_range: float = 0.02
    max_position_embeddings: int = 1024


@dataclass
class TrainConfig:
    # -- model
    model_name_or_path: str | None = None
    tiny_random_llama: TinyLlamaSettings | None = None
    pad_token: str | None = None  # must differ from eos; default: the tokenizer's pad, else unk
    add_bos: bool = True  # prepend the tokenizer's BOS token to every prompt (when it has one)
    lora: LoraSettings = field(default_factory=LoraSettings)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # -- data
    data_path: str = "data/alpacafarm_val.json"
    chat_template: str = "vicuna"
    system_prompt: str | None = None  # None: the template's usual one (vicuna) or none
    dev_size: int = 64
    train_size: int | None = None  # use only the first N train records (after the seeded shuffle)
    max_prompt_tokens: int = 512
    # -- reward service
    reward_url: str = "http://127.0.0.1:8000"
    reward_backend: str | None = "r3"  # a preset name; None = the service's default
    reward_timeout_s: float = 180.0
    reward_max_retries: int = 5
    reward_backoff_s: float = 0.5
    reward_max_backoff_s: float = 20.0
    reward_deadline_s: float = 600.0
    reward_chunk_size: int = 512
    reward_max_concurrency: int = 8
    overlap_generation: bool = False
    # -- rollouts
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # -- PPO
    steps: int = 5000
    batch_size: int = 4  # sequences per forward/backward, per process
    gradient_accumulation_steps: int = 4  # a step's rollout batch is batch_size x this, per process
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    init_kl_coef: float = 0.2
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: float | None = 10.0
    reward_baseline: float = 0.0
    # -- bookkeeping
    seed: int = 0
    output_dir: str = "runs/r3-ppo"
    log_file: str | None = None  # default: <output_dir>/log.jsonl
    eval_every: int = 1000
    save_every: int = 1000
    keep_checkpoints: int = 2
    plot: bool = True
    progress_bar: bool = True

    @property
    def rollout_batch_size(self) -> int:
        """Rollouts per process per PPO step; each epoch is one optimizer step over them."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def log_path(self) -> Path:
        return Path(self.log_file) if self.log_file else Path(self.output_dir) / "log.jsonl"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) one value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # PyYAML reads "1e-5" (no dot) as a string; accept it as the number it plainly is.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), names, n=1)
            parts.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(parts)}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _check(cfg: TrainConfig) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    require((cfg.model_name_or_path is None) != (cfg.tiny_random_llama is None),
            "set exactly one of model_name_or_path and tiny_random_llama")
    require(cfg.chat_template in CHAT_TEMPLATES,
            f"chat_template: {cfg.chat_template!r} is not one of {', '.join(CHAT_TEMPLATES)}")
    require(cfg.mixed_precision in MIXED_PRECISION,
            f"mixed_precision: {cfg.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    for key in ("steps", "batch_size", "gradient_accumulation_steps", "ppo_epochs", "max_new_tokens",
                "max_prompt_tokens", "eval_every", "save_every", "keep_checkpoints", "kl_horizon",
                "reward_chunk_size", "reward_max_concurrency"):
        require(getattr(cfg, key) >= 1, f"{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("learning_rate", "kl_target", "temperature", "reward_timeout_s", "reward_deadline_s"):
        require(getattr(cfg, key) > 0, f"{key}: must be > 0, got {getattr(cfg, key)}")
    for key in ("dev_size", "top_k", "init_kl_coef", "cliprange", "cliprange_value", "vf_coef",
                "weight_decay", "reward_max_retries", "reward_backoff_s", "reward_max_backoff_s"):
        require(getattr(cfg, key) >= 0, f"{key}: must be >= 0, got {getattr(cfg, key)}")
    require(0 < cfg.top_p <= 1, f"top_p: must be in (0, 1], got {cfg.top_p}")
    require(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "gamma and lam: must be in [0, 1]")
    require(cfg.train_size is None or cfg.train_size >= 1, "train_size: must be >= 1 or null")
    require(cfg.score_clip is None or cfg.score_clip > 0, "score_clip: must be > 0 or null")
    require(cfg.max_grad_norm is None or cfg.max_grad_norm > 0, "max_grad_norm: must be > 0 or null")
    require(not cfg.use_score_norm or cfg.use_score_scaling,
            "use_score_norm: only applies with use_score_scaling: true")
    require(cfg.lora.r >= 1 and cfg.lora.alpha > 0 and 0 <= cfg.lora.dropout < 1,
            "lora: needs r >= 1, alpha > 0, 0 <= dropout < 1")
    require(bool(cfg.lora.target_modules), "lora.target_modules: must not be empty")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` (value in YAML) -> (["a", "b"], value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE")
    return key.strip().split("."), yaml.safe_load(raw)


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a mapping")
        node[path[-1]] = value
    cfg = _build(TrainConfig, data)
    _check(cfg)
    return cfg


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
