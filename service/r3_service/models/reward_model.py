"""A sequence-classification reward model (`AutoModelForSequenceClassification`), e.g. the paper's
OASST-RM (`OpenAssistant/reward-model-deberta-v3-large-v2`).

It speaks the same `BatchModel` contract as the embedding model, so the scheduler batches its
inputs across requests exactly as it batches texts to embed: one input is one (query, response)
pair, and its output row holds the reward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from r3_service.models.base import ModelInfo, pad_right, pick_device, pick_dtype, resolve_model_path
from r3_service.rule.templates import TEMPLATES

log = logging.getLogger(__name__)


class RewardModel:
    """Owns one classifier. `forward` is not thread-safe (one scheduler thread calls it)."""

    def __init__(self, model: str, *, input_format: str = "pair", max_length: int = 1024,
                 label: int = 0, device: str = "auto", dtype: str = "float32") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = resolve_model_path(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = pick_device(device)
        precision = pick_dtype(dtype, self.device)
        self.dtype = precision.dtype
        self.model = AutoModelForSequenceClassification.from_pretrained(path)
        self.model = self.model.to(self.device, self.dtype).eval()
        if self.tokenizer.pad_token_id is None:  # decoder reward models: pad with EOS, as they score
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # the last real token is found by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if label >= self.model.config.num_labels:
            raise ValueError(f"reward model {model!r} has {self.model.config.num_labels} labels; "
                             f"label {label} does not exist")
        self.label = label
        self.input_format = input_format
        self.max_length = min(max_length, self.tokenizer.model_max_length)
        self.pad_id = self.tokenizer.pad_token_id
        # Pair inputs of BERT-style models mark the second segment with token type 1.
        self._segments = getattr(self.model.config, "type_vocab_size", 0) > 1 and input_format == "pair"
        self._encode = self._encoder(input_format)
        self.info = ModelInfo(
            model=model, path=path, normalize=False, max_length=self.max_length, dim=1,
            # A chat template's own tokens are not counted: a lower bound is what admission needs.
            special_tokens=0 if input_format == "chat" else
            self.tokenizer.num_special_tokens_to_add(pair=input_format == "pair"),
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            dtype_reason=precision.reason, compiled=False, packed=False,
        )
        log.info("reward model %s on %s, %s (input %s, max_length=%d)",
                 model, self.device, self.info.dtype, input_format, self.max_length)

    def _encoder(self, input_format: str) -> Callable[[str, str], list[int]]:
        tokenizer, limit = self.tokenizer, self.max_length
        if input_format == "pair":
            return lambda q, r: tokenizer(q, r, truncation="longest_first", max_length=limit)["input_ids"]
        if input_format == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("input_format 'chat' needs a tokenizer with a chat template; "
                                 "name a template (vicuna, chatml, ...) or use 'pair'")

            def chat(query: str, response: str) -> list[int]:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": query}, {"role": "assistant", "content": response}],
                    tokenize=False)
                encoded = tokenizer(text, truncation=True, max_length=limit, add_special_tokens=False)
                return encoded["input_ids"]

            return chat
        template = TEMPLATES[input_format]
        return lambda q, r: tokenizer(template.render(q, r), truncation=True, max_length=limit)["input_ids"]

    def tokenize(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids of (query, response) pairs in the configured input format."""
        return [self._encode(query, response) for query, response in pairs]

    @torch.inference_mode()
    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards (len, 1), float32 on the CPU, of one right-padded batch."""
        ids, mask = pad_right(sequences, self.pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self._segments:
            # Token type 1 after the first separator (tokenizer(q, r) does the same).
            is_sep = (ids == self.tokenizer.sep_token_id).long()
            inputs["token_type_ids"] = ((is_sep.cumsum(dim=1) - is_sep) > 0).long() * mask
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        logits = self.model(**inputs).logits.float()
        return logits[:, self.label : self.label + 1].cpu()
