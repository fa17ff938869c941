"""Turn slime's remote reward-model request (one templated prompt + response) into an engine item.

slime (github.com/THUDM/slime), `--rm-type remote_rm --rm-url URL`, read from its source:

- `slime/rollout/rm_hub/__init__.py` (`remote_rm`, commit 0b420f1e4161; the same body in
  every version seen, e.g. 701749b73cc0 and older ones without retries): per sample, `POST URL`
  with `json={"prompt": sample.prompt, "response": sample.response, "label": sample.label}`,
  nothing else; the URL is used as given (its `--rm-url` help shows a bare
  `http://localhost:8000`, so the path must be part of it: `http://HOST:8000/slime`).
- The answer is `await resp.json()` stored whole as `sample.reward`;
  `slime/utils/types.py` `Sample.get_reward_value` returns it as is, or `reward[args.reward_key]`
  (one flat key, no nesting) with `--reward-key`. So a bare JSON number, or an object holding the
  scalar under that key; aiohttp's `resp.json()` also insists on `Content-Type: application/json`.
- Failure: `resp.raise_for_status()` (any status >= 400) or any exception (timeout, connection,
  bad JSON) is retried, 4xx included, up to `max_retries=10` tries with a
  `min(2**attempt, 30) + random()` s backoff (about 150 s in all), then re-raised, which fails
  the rollout. `Retry-After` is not read.
- One shared `aiohttp.ClientSession`: `TCPConnector(limit=64)` (64 requests at once at most),
  `ClientTimeout(total=120)` per try (older releases: a session per call, `total=30`).
- `slime/utils/data.py` (`Dataset`): with `--apply-chat-template` the prompt is
  `tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)`, a templated
  string; else the `--input-key` text as is. The label is the `--label-key` value; JSONL is read
  by `pd.read_json(..., dtype={"label": str})`, so a JSON object label arrives as its Python
  repr string, and a row without one (when others have one) as NaN.

Hence: a JSON object label encoded in a string (JSON or Python repr) is read as that object,
and NaN as no label (`schemas.SlimeRequest`); the query is the user's words of the templated
prompt, extracted by the engine exactly as for `/get_reward`, and the response is cut at the
detected template's role prefixes.
"""

from __future__ import annotations

from collections.abc import Iterable

from r3_service.api.openrlhf import templated_item
from r3_service.api.schemas import Components, SlimeRequest, SlimeReward
from r3_service.engine.resolve import RawItem

QUERY_PARAMETERS = ("backend", "components")


class SlimeError(ValueError):
    """A request the `/slime` contract does not allow; the message names the problem."""


def check_query_parameters(names: Iterable[str]) -> None:
    """Strict as the body is: a misspelt `?backend=` must not silently score on the default."""
    unknown = sorted(set(names) - set(QUERY_PARAMETERS))
    if unknown:
        raise SlimeError(f"unknown query parameter {', '.join(repr(n) for n in unknown)}: /slime takes "
                         f"{' and '.join(QUERY_PARAMETERS)}")


def texts(request: SlimeRequest) -> dict[str, str | None]:
    """The texts to hold to the length limit, by field name."""
    label = request.label
    reference = label if isinstance(label, str) else label.reference if label else None
    return {"prompt": request.prompt, "response": request.response, "label": reference}


def to_raw_item(request: SlimeRequest) -> RawItem:
    return templated_item(request.prompt, request.response, request.label)


def answer(reward: float, parts: Components | None) -> float | SlimeReward:
    """A bare number (slime without `--reward-key`), or with `parts` the object whose `reward`
    `--reward-key reward` picks, the rest there to log."""
    return reward if parts is None else SlimeReward(reward=reward, **parts.model_dump())
