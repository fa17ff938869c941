"""All service settings in one place, read from `R3_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from r3_service.querytypes import QueryType, parse_query_type

DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="R3_", extra="ignore")

    # Scoring
    backend: str = Field("r3", description="Default preset: r3, r3-no-branch, li-rp, li, relevance, ...")
    model: str = Field(DEFAULT_MODEL, description="Embedding model: the packaged MiniLM, a path or a hub id.")
    normalize: bool | None = Field(
        None, description="Unit-normalise embeddings; None = as the model's own pipeline does."
    )
    relevance_in_range: tuple[float, float] | None = Field(
        None, description="Closed-branch input range of S; None = [0, 1] normalised, else [0, 3.5]."
    )
    max_rollout_tokens: int = Field(512, gt=0, description="Output range of f is [0, this / 100].")
    lppo_target_length: int = Field(100, gt=0, description="Target length T of the lppo preset.")
    stop_strings: bool = Field(True, description="Cut responses at stop strings before scoring.")
    chat_template: str | None = Field(None, description="Template whose role prefixes /reward stops at.")
    default_query_type: QueryType = "open"
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 on GPU (fp16 without bf16), fp32 on CPU."
    )
    compile: bool = Field(False, description="torch.compile the encoder (dynamic shapes); compiled "
                                             "and warmed up at start-up.")

    # Batching engine
    max_batch_tokens: int | None = Field(None, gt=0, description="Padded tokens per forward; "
                                         "None = 32768 on GPU, 2048 on CPU.")
    max_batch_size: int | None = Field(None, gt=0, description="Sequences per forward; "
                                       "None = 1024 on GPU, 256 on CPU.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long an idle model waits for a fuller batch.")
    max_queue_items: int = Field(65_536, gt=0, description="Distinct texts queued; beyond it, 429.")
    embedding_cache_size: int = Field(50_000, ge=0, description="Query/reference embeddings kept (LRU).")
    tokenizer_threads: int = Field(2, gt=0, description="Threads tokenising ahead of the model.")

    # Store
    redis_url: str | None = Field(None, description="Query-type/reference store; unset = in-process.")
    redis_timeout_ms: int = Field(200, gt=0, description="Per-lookup Redis timeout.")
    redis_retry_s: float = Field(2.0, ge=0, description="How long to skip Redis after a failure.")
    memory_store_size: int = Field(200_000, gt=0, description="Records kept in-process.")
    qtypes_file: str | None = Field(None, description="JSON/JSONL loaded into the store at start-up.")

    # Limits
    max_items: int = Field(4096, gt=0)
    max_text_chars: int = Field(200_000, gt=0)
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("default_query_type", mode="before")
    @classmethod
    def _query_type(cls, value: object) -> QueryType:
        return parse_query_type(str(value))

    @field_validator("relevance_in_range")
    @classmethod
    def _range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"relevance_in_range must be [lo, hi] with lo < hi, got {list(value)}")
        return value

    @field_validator("chat_template", mode="before")
    @classmethod
    def _template(cls, value: object) -> str | None:
        from r3_service.backends.templates import TEMPLATES

        if value in (None, "", "none"):
            return None
        if value not in TEMPLATES:
            raise ValueError(f"unknown chat template {value!r}; valid: none, {', '.join(TEMPLATES)}")
        return str(value)
