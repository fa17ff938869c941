"""All service settings in one place: `R3_*` environment variables over a deployment file.

The deployment file (YAML, path in `R3_CONFIG`) holds the same keys as the environment, without
the prefix, plus `backends:` — the named reward backends this deployment serves. Environment
variables override the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from r3_service.rule.querytypes import QueryType, parse_query_type
from r3_service.rule.reward import PRESETS
from r3_service.rule.templates import TEMPLATES

DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"
# The packaged model's closed-branch input range, from `r3-calibrate data/alpacafarm_val.json`: it
# puts the closed branch's median reward (0.55) within 1.5x of the open branch's (0.41). The cosine
# default [0, 1] pays the closed branch about 8x the open one. Contriever keeps the paper's [0, 3.5].
PACKAGED_MODEL_RANGE = (0.311, 3.622)
# Per forward pass when unset: on a GPU, on a CPU.
GPU_BATCH_TOKENS, CPU_BATCH_TOKENS = 32768, 2048
CPU_SHARED_BATCH_TOKENS = 512
GPU_BATCH_SIZE, CPU_BATCH_SIZE = 1024, 256


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    if not value[0] < value[1]:
        raise ValueError(f"relevance_in_range must be [lo, hi] with lo < hi, got {list(value)}")
    return value


RelevanceRange = Annotated[tuple[float, float], AfterValidator(_check_range)]

SOFT_BRANCH_FORM = "soft_branch must be two numbers lo,hi (or [lo, hi]) with 0 <= lo < hi <= 1"


def _split_band(value: object) -> object:
    """`lo,hi` as an environment variable writes it, or JSON `[lo, hi]`, or a list (YAML)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text) if text.startswith("[") else text.split(",")
        except json.JSONDecodeError:
            raise ValueError(f"{SOFT_BRANCH_FORM}, got {text!r}") from None
    if isinstance(value, list | tuple) and len(value) != 2:
        raise ValueError(f"{SOFT_BRANCH_FORM}, got {list(value)}")
    return value


def _check_band(value: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= value[0] < value[1] <= 1.0:
        raise ValueError(f"{SOFT_BRANCH_FORM}, got {list(value)}")
    return value


SoftBand = Annotated[tuple[float, float], BeforeValidator(_split_band), AfterValidator(_check_band)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class R3BackendSpec(_Spec):
    """An R3 preset over an embedding model; unset fields take the top-level settings."""

    kind: Literal["r3"] = "r3"
    preset: str = Field("r3", description="r3, r3-novel, r3-no-branch, li-rp, li, r3-random-type, relevance, "
                                           "lppo.")
    model: str | None = Field(None, description="Embedding model; default: the top-level `model`.")
    normalize: bool | None = None
    relevance_in_range: RelevanceRange | None = None
    max_rollout_tokens: int | None = Field(None, gt=0)
    lppo_target_length: int | None = Field(None, gt=0)
    soft_branch: SoftBand | None = Field(None, description="Band of p(open) whose rewards blend both "
                                                           "branches; default: the top-level `soft_branch`.")

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; valid: {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _soft_branch(self) -> R3BackendSpec:
        if self.soft_branch is not None and not PRESETS[self.preset].uses_query_type:
            branching = ", ".join(name for name, preset in PRESETS.items() if preset.uses_query_type)
            raise ValueError(f"soft_branch: preset {self.preset!r} has no query-type branches to blend; "
                             f"only {branching} have")
        return self


class RewardModelSpec(_Spec):
    """A sequence-classification reward model (e.g. OpenAssistant's DeBERTa OASST-RM)."""

    kind: Literal["hf-reward-model"]
    model: str = Field(description="Local path or hub id (already in the local cache).")
    input_format: str = Field(
        "pair", description="pair: tokenizer(query, response), as OASST-RM was trained; chat: the "
                            "tokenizer's chat template; or a template name (vicuna, chatml, ...).")
    max_length: int = Field(1024, gt=0, description="Tokens per (query, response); longer inputs "
                                                     "lose the end of the longer side.")
    label: int = Field(0, ge=0, description="Which logit is the reward.")

    @field_validator("input_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("pair", "chat", *TEMPLATES):
            raise ValueError(f"unknown input_format {value!r}; valid: pair, chat, {', '.join(TEMPLATES)}")
        return value


class EnsembleMember(_Spec):
    backend: str
    weight: float = 1.0
    standardize: Literal["none", "fixed", "running"] = Field(
        "none", description="fixed: (r - mean) / std with the given numbers; running: with the "
                            "mean and std of every reward this member has given (batch included).")
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class EnsembleSpec(_Spec):
    """A weighted sum of other backends' rewards (the paper's appendix E.2 mixes R3 and UltraRM)."""

    kind: Literal["ensemble"]
    members: list[EnsembleMember] = Field(min_length=1)


BackendSpec = Annotated[R3BackendSpec | RewardModelSpec | EnsembleSpec, Field(discriminator="kind")]


class TenantSpec(_Spec):
    """A training job sharing the service: its API key, the name `/metrics` shows instead of the
    key, and its weight in the fair share of each model's queue."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="R3_", extra="ignore")

    config: str | None = Field(None, description="Deployment file (YAML): settings and `backends`.")

    # Scoring
    backends: dict[str, BackendSpec] = Field(
        default_factory=dict, description="Named reward backends; empty = one r3 backend per preset.")
    default_backend: str = Field("r3", description="Backend used when a request names none.")
    model: str = Field(DEFAULT_MODEL, description="Embedding model: the packaged MiniLM, a path or a hub id.")
    normalize: bool | None = Field(
        None, description="Unit-normalise embeddings; None = as the model's own pipeline does."
    )
    relevance_in_range: RelevanceRange | None = Field(
        None, description="Closed-branch input range of S; None = [0.311, 3.622] for the packaged "
                    "model (calibrated), [0, 1] for other normalised models, [0, 3.5] for raw ones."
    )
    max_rollout_tokens: int = Field(512, gt=0, description="Output range of f is [0, this / 100].")
    lppo_target_length: int = Field(100, gt=0, description="Target length T of the lppo preset.")
    soft_branch: Annotated[SoftBand | None, NoDecode] = Field(
        None, description="`lo,hi`: a query the classifier typed with lo <= p(open) <= hi (and that "
                          "has a reference) is paid p·R_open + (1-p)·R_closed by r3 and r3-novel "
                          "(beyond the paper); unset = the hard branch always.")
    stop_strings: bool = Field(True, description="Cut responses at stop strings before scoring.")
    chat_template: str | None = Field(None, description="Template whose role prefixes /reward stops at.")
    default_query_type: QueryType = Field("open", description="When request, store and classifier "
                                                              "all give no type.")
    qtype_classifier: Literal["learned", "rules", "llm", "none"] = Field(
        "learned", description="Types queries the store does not know; its answers are written back.")
    qtype_llm_url: str | None = Field(None, description="OpenAI-compatible base URL (.../v1) for `llm`.")
    qtype_llm_model: str | None = Field(None, description="Model name sent to the `llm` endpoint.")
    qtype_llm_api_key: str | None = Field(None, description="Bearer key for the `llm` endpoint.")
    qtype_llm_timeout_s: float = Field(10.0, gt=0, description="Per call to the `llm` endpoint.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 where the hardware computes it natively (a GPU with bf16; a CPU "
        "with AVX512-BF16, AMX or Arm BF16), fp16 on a GPU without bf16, else fp32. float32 is the "
        "exact mode (the paper's scorer). /v1/info shows the choice and why."
    )
    compile: bool = Field(False, description="torch.compile the encoder (dynamic shapes); compiled "
                                             "and warmed up at start-up.")
    packing: bool = Field(True, description="On a CPU, run BERT-family encoders on real tokens only, no "
                          "padding computed (same numbers); false runs the padded Hugging Face forward "
                          "(always the case on a GPU).")

    # Batching engine
    max_batch_tokens: int | None = Field(None, gt=0, description="Padded tokens per forward; "
                                         f"None = {GPU_BATCH_TOKENS} on GPU, {CPU_BATCH_TOKENS} on CPU.")
    max_batch_size: int | None = Field(None, gt=0, description="Sequences per forward; "
                                       f"None = {GPU_BATCH_SIZE} on GPU, {CPU_BATCH_SIZE} on CPU.")
    shared_batch_tokens: int | None = Field(
        None, gt=0, description="Padded tokens per forward while several tenants have texts waiting: "
                                "a shorter batch is a shorter wait for a light job's next text. None = "
                                f"the full batch on GPU, {CPU_SHARED_BATCH_TOKENS} on CPU.")
    max_wait_ms: float = Field(2.0, ge=0, description="How long an idle model waits for a fuller batch.")
    max_queue_tokens: int | None = Field(
        None, gt=0, description="Tokens admitted per model (requests in flight, each by a lower bound "
                                "of the tokens it will embed); beyond it, 429. None = what the model "
                                "clears in `queue_seconds`, measured at start-up.")
    max_queue_items: int | None = Field(
        None, gt=0, description="Deprecated: the bound in texts of 64 tokens "
                                "(read as `max_queue_tokens` = 64 × this).")
    queue_seconds: float = Field(60.0, gt=0, description="Work the measured queue bound holds: a third "
                                 "of the 180 s OpenRLHF and r3's client wait per try, half of slime's 120 s.")
    embedding_cache_size: int = Field(50_000, ge=0, description="Query/reference embeddings kept (LRU), "
                                      "per model.")
    embedding_cache_bytes: int = Field(128 << 20, ge=0, description="Bytes the query/reference embeddings "
                                       "and their texts may take, per model (LRU; `r3_cache_bytes`).")
    tokenizer_threads: int = Field(2, gt=0, description="Threads tokenising ahead of the model.")

    # Store
    redis_url: str | None = Field(None, description="Query-type/reference store; unset = in-process.")
    redis_timeout_ms: int = Field(200, gt=0, description="Per-lookup Redis timeout.")
    redis_retry_s: float = Field(2.0, ge=0, description="How long to skip Redis after a failure.")
    memory_store_size: int = Field(200_000, gt=0, description="Records kept in-process.")
    memory_store_bytes: int = Field(128 << 20, gt=0, description="Bytes the in-process records and their "
                                    "reference answers may take (LRU; `r3_cache_bytes{cache=\"store\"}`).")
    qtypes_file: str | None = Field(None, description="JSON/JSONL loaded into the store at start-up.")

    # Security and limits
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated; when set, every endpoint but /healthz and "
                                          "/readyz needs `Authorization: Bearer KEY`.")
    tenants: list[TenantSpec] = Field(
        default_factory=list, description="JSON list of `{name, key, weight}`: each key is a tenant (a "
                                          "training job) with a weighted fair share of the queues; "
                                          "`api_keys` are tenants `key1`, `key2`, ... of weight 1.")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM, how long in-flight "
                                                              "requests may take to finish.")
    max_items: int = Field(4096, gt=0, description="Items (or samples) in one request; more is a 413.")
    max_text_chars: int = Field(200_000, gt=0, description="Characters in one query, response or "
                                                           "reference; more is a 413.")
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Request body size; a larger "
                                "body is a 413, by Content-Length or while it streams, before parsing.")

    # Memory over a long run (docs/operations/memory.md)
    malloc_arena_max: int = Field(2, ge=0, description="glibc malloc arenas (glibc's default: 8 per core): "
                                  "fewer arenas hold a long run's RSS flat; 0 leaves glibc's default (or "
                                  "MALLOC_ARENA_MAX).")
    malloc_trim_s: float = Field(30.0, ge=0, description="Every this many seconds, give the C heap's "
                                 "free pages back to the system (malloc_trim); 0 never.")
    tracemalloc: bool = Field(False, description="Trace CPython's allocations (`r3_python_traced_bytes`); "
                              "slows the service, for finding a leak.")

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="The service's log level (`r3-serve --log-level` overrides it).")
    access_log: Literal["all", "sampled", "off"] = Field(
        "sampled", description="uvicorn's access log: a line per request (`all`); the same but of the "
        "429s under a burst only the first each second, the next line saying how many were left out "
        "(`sampled`); none (`off`). Every answer is counted in `/metrics` in any case.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [key.strip() for key in value if isinstance(key, str) and key.strip()] or []
        return value

    @field_validator("default_query_type", mode="before")
    @classmethod
    def _query_type(cls, value: object) -> QueryType:
        return parse_query_type(str(value))

    @field_validator("soft_branch", mode="before")
    @classmethod
    def _no_band(cls, value: object) -> object:
        return None if value in ("", "none") else value

    @field_validator("chat_template", mode="before")
    @classmethod
    def _template(cls, value: object) -> str | None:
        if value in (None, "", "none"):
            return None
        if value not in TEMPLATES:
            raise ValueError(f"unknown chat template {value!r}; valid: none, {', '.join(TEMPLATES)}")
        return str(value)

    @model_validator(mode="after")
    def _unique_tenants(self) -> Settings:
        for field_name, values in (("name", [t.name for t in self.all_tenants()]),
                                   ("key", [t.key for t in self.all_tenants()])):
            if len(set(values)) < len(values):
                raise ValueError(f"tenants: each {field_name} must be unique (R3_TENANTS, R3_API_KEYS)")
        return self

    def all_tenants(self) -> list[TenantSpec]:
        """The configured tenants, plain `api_keys` included (as `key1`, `key2`, ...)."""
        keys = [TenantSpec(name=f"key{i}", key=key) for i, key in enumerate(self.api_keys, 1)]
        return [*self.tenants, *keys]

    def tenant_weights(self) -> dict[str, float]:
        return {tenant.name: tenant.weight for tenant in self.all_tenants()}

    @model_validator(mode="after")
    def _llm_classifier(self) -> Settings:
        if self.qtype_classifier == "llm" and not (self.qtype_llm_url and self.qtype_llm_model):
            raise ValueError("qtype_classifier 'llm' needs qtype_llm_url and qtype_llm_model "
                             "(R3_QTYPE_LLM_URL, R3_QTYPE_LLM_MODEL)")
        return self

    @model_validator(mode="after")
    def _backends(self) -> Settings:
        if not self.backends:
            self.backends = {name: R3BackendSpec(preset=name) for name in PRESETS}
        if self.default_backend not in self.backends:
            raise ValueError(f"default_backend {self.default_backend!r} is not a configured backend; "
                             f"valid: {', '.join(self.backends)}")
        for name, spec in self.backends.items():
            if isinstance(spec, EnsembleSpec):
                for member in spec.members:
                    if member.backend not in self.backends or member.backend == name:
                        raise ValueError(f"ensemble {name!r}: member {member.backend!r} is not another "
                                         f"configured backend; valid: {', '.join(self.backends)}")
                    if isinstance(self.backends[member.backend], EnsembleSpec):
                        raise ValueError(f"ensemble {name!r}: member {member.backend!r} is an ensemble "
                                         "itself; list its members instead")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructor arguments, then `R3_*` variables, then the deployment file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = getattr(init_settings, "init_kwargs", {}).get("config") or os.environ.get("R3_CONFIG")
        if path:
            sources.append(DeploymentFile(settings_cls, Path(path)))
        return tuple(sources)


class DeploymentFile(YamlConfigSettingsSource):
    """The YAML deployment file; a missing file or a non-mapping is an error, not an empty config."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        if not path.is_file():
            raise ValueError(f"R3_CONFIG: no such file {str(path)!r}")
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise ValueError(f"R3_CONFIG {str(file_path)!r}: expected a mapping of settings at the top level")
        unknown = set(data) - set(Settings.model_fields) - {"config"}
        if unknown:
            raise ValueError(f"R3_CONFIG {str(file_path)!r}: unknown setting(s) {', '.join(sorted(unknown))}")
        return data
