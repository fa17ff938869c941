"""Request and response models: the API's single source of truth (and its OpenAPI schema)."""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from r3_service.rule.querytypes import QueryType, parse_query_type


def _query_type(value: object) -> object:
    return parse_query_type(value) if isinstance(value, str) else value


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """JSON may escape half of a UTF-16 surrogate pair (`"\\ud800"`), which no encoder accepts:
    each such half becomes U+FFFD, as a decoder does with invalid bytes (a whole pair arrives
    as one character and is kept). ASCII text, most of it, skips the search."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


Text = Annotated[str, AfterValidator(replace_lone_surrogates)]


QueryTypeIn = Annotated[
    QueryType | None,
    BeforeValidator(_query_type),
    Field(description="open/closed; also oe, ce, open-ended, closed-ended, constrained (any case). "
                      "Omitted: looked up in the store, else the configured default."),
]


# Unknown fields are refused, not ignored: a misspelt `reference` must not silently change a
# reward; no coercion either ("yes" is not a boolean).
STRICT = ConfigDict(extra="forbid", strict=True)
TEXT_NOTE = " A lone UTF-16 surrogate escape becomes U+FFFD."


class RewardItem(BaseModel):
    model_config = STRICT

    query: Text = Field(description="The user's request; a chat template is removed if present.")
    response: Text = Field(description="The policy's rollout text." + TEXT_NOTE)
    reference: Text | None = Field(None, description="Reference answer; empty = none (store lookup).")
    query_type: QueryTypeIn = None


class RewardRequest(BaseModel):
    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "items": [{"query": "What is the capital of France?", "response": "Paris is the capital.",
                   "reference": "The capital of France is Paris.", "query_type": "closed"}],
        "return_components": True,
    }]})

    items: list[RewardItem]
    backend: str | None = Field(None, description="Backend name (GET /v1/info lists them); "
                                                  "default: the configured one.")
    return_components: bool | None = Field(False, description="Also return each item's R3 parts.")


class Components(BaseModel):
    length_incentive: float = Field(description="LI(y) = word tokens / 100.")
    repetition_penalty: float = Field(description="RP(y) = unique trigrams / trigrams.")
    relevance: float | None = Field(description="Raw dot product S before the linear map.")
    relevance_target: Literal["query", "reference"] | None
    query_type: QueryType
    query_type_source: Literal["request", "cache", "classifier", "default", "random"]
    reference_source: Literal["request", "cache"] | None
    members: dict[str, float] | None = Field(
        None, description="An ensemble's member rewards, each after its standardisation.")
    query_type_confidence: float | None = Field(
        description="The classifier's probability of `query_type` (p(open), or 1 - p(open) for closed); "
                    "null when the type came from the request, a data set's label in the store, the "
                    "default, or a classifier answer without one (rules; the llm endpoint's own answers).")
    open_branch_weight: float | None = Field(
        description="Soft branch (R3_SOFT_BRANCH): p(open) when the reward is p·R_open + (1-p)·R_closed; "
                    "`relevance` and `relevance_target` still describe the branch of `query_type` (for "
                    "an ensemble: of its R3 member). null: the reward is that branch's alone.")
    unpaid: dict[str, float] | None = Field(
        None, description="r3-guarded: the share of the response's word tokens not paid for, by reason "
                          "(echo, input_echo, restate, repeat, filler); `length_incentive` and `relevance` "
                          "are then those of the rest. null for other backends.")


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="One reward per item, in item order.")
    backend: str
    components: list[Components] | None = None


# OpenRLHF owns this contract and may send keys of its own: they are ignored, and the schema
# says so (additionalProperties: true).
OPENRLHF = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": True})


class Label(BaseModel):
    model_config = OPENRLHF

    reference: Text | None = None
    query_type: QueryTypeIn = None


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward-model contract. Keys other than these are ignored."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": True, "examples": [{
        "query": ["USER: Name a primary colour. ASSISTANT: Red is a primary colour."],
        "prompts": ["USER: Name a primary colour. ASSISTANT:"],
        "labels": [{"reference": "Red, yellow and blue.", "query_type": "closed"}],
    }]})

    query: list[Text] = Field(description="prompt + response, chat template included." + TEXT_NOTE)
    prompts: list[Text] | None = Field(None, description="The prompt part of each query.")
    labels: list[Text | Label | None] | None = Field(
        None, description="A reference string, or {reference, query_type}, per query.")
    backend: str | None = None


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


LABEL_KEYS = ("reference", "query_type")


def label_object(text: str) -> dict | None:
    """The `{reference, query_type}` object a label string encodes, as JSON or as a Python dict's
    repr (what pandas makes of a JSONL object under slime's `dtype={"label": str}`); None when the
    text is not such an object, so it is a reference."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict) and any(key in value for key in LABEL_KEYS):
            return value
    return None


def _slime_label(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):  # pandas' missing value, sent as NaN
        return None
    if isinstance(value, str):
        decoded = label_object(value)
        return value if decoded is None else decoded
    return value


class SlimeRequest(BaseModel):
    """slime's remote reward-model body (`--rm-type remote_rm`): one sample. slime has only ever
    sent these three keys, so, like `/reward`, an unknown one is a 422 naming it."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [{
        "prompt": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "response": "2 + 2 = 4.",
        "label": {"reference": "4", "query_type": "closed"},
    }]})

    prompt: Text = Field(description="The prompt as slime generated from it: chat template included "
                                     "(removed here as `/get_reward` does)." + TEXT_NOTE)
    response: Text = Field(description="The policy's response." + TEXT_NOTE)
    label: Annotated[Text | Label | None, BeforeValidator(_slime_label)] = Field(
        None, description="A reference string, {reference, query_type} (also as a JSON or Python-repr "
                          "string of one, as slime's JSONL reader sends it), or null (NaN too).")


class SlimeReward(Components):
    """`?components=true`: the reward under `reward` (slime's `--reward-key reward`) and its parts."""

    reward: float


class ErrorResponse(BaseModel):
    detail: str
