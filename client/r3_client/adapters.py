"""Reward functions for RL trainers, backed by the r3 service.

- TRL (`GRPOTrainer(reward_funcs=...)` and friends): `make_reward_func`, `make_async_reward_func`.
- verl (`custom_reward_function.path=<r3_client/verl_reward.py>`): `compute_score` /
  `compute_score_batch` (synchronous reward managers) and `compute_score_async` (the reward loop,
  which awaits coroutine functions per sample: verl/experimental/reward/reward_loop/naive.py).
- OpenRLHF (`--reward.remote_url <r3_client/openrlhf_reward.py>`, older `--remote_rm_url`):
  `openrlhf_reward_func`, one `/get_reward` request per call.
- AReaL (`RLVRWorkflow(reward_fn=...)`): `areal_reward_fn` / `AReaLRewardFn`.

Configuration read per call (a launcher may set it after import): `R3_URL`, `R3_API_KEY`,
`R3_BACKEND`, `R3_BACKENDS` (verl: JSON object data_source -> backend), `R3_ON_FAILURE`
(raise|none) and `R3_DEADLINE_S`; see `r3_client.failures` for the failure policy shared by all.

Trainers pass whatever columns their dataset has; anything that cannot be used is ignored, so a
new trainer version adding kwargs never breaks training.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, NoReturn, TypeVar

from . import failures
from ._async import AsyncRewardClient
from ._core import DEFAULT_BASE_URL, Components, R3ClientError, RewardItem
from ._sync import RewardClient
from .failures import (  # noqa: F401  (re-exported: r3_client.adapters.failure_count() etc.)
    OnFailure,
    RewardUnavailable,
    failure_count,
    failure_stats,
    on_failure_policy,
    reset_failures,
)

#: Dataset columns tried, in order, for an item's reference answer and query type.
REFERENCE_KEYS = ("reference", "output", "solution", "ground_truth", "answer")
QUERY_TYPE_KEYS = ("query_type", "qtype")
#: verl `extra_info` keys tried, in order, for the query.
QUERY_KEYS = ("query", "question", "prompt")

_C = TypeVar("_C")


class MissingQuery(ValueError):
    """A sample whose query cannot be found: scoring it against an empty query would be a wrong
    reward that looks right, so it is refused."""

_WHITESPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------- text extraction


def _plain(value: Any) -> Any:
    """Arrays from parquet/arrow columns (numpy & co.) as lists, without importing numpy."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) and not isinstance(value, (str, bytes)) else value


def _content(content: Any) -> str:
    """A message's text; multimodal content is a list of parts, of which the text ones count."""
    content = _plain(content)
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = (part.get("text") for part in content if isinstance(part, Mapping))
        return " ".join(part for part in parts if isinstance(part, str))
    return ""


def _turns(messages: Any, role: str) -> list[str] | None:
    """Contents of `role`'s turns in a chat message list (every turn if that role never speaks);
    None when `messages` is not a message list."""
    messages = _plain(messages)
    if isinstance(messages, str) or not isinstance(messages, Sequence):
        return None
    turns = [m for m in messages if isinstance(m, Mapping)]
    if not turns and messages:
        return None
    own = [m for m in turns if m.get("role") == role] or turns
    return [_content(m.get("content")) for m in own]


def query_text(prompt: Any) -> str:
    """A prompt as the query: a string as is; for a chat, the user turns joined by a space with
    whitespace collapsed (what the service does with templated multi-turn prompts)."""
    if isinstance(prompt, str):
        return prompt
    turns = _turns(prompt, "user")
    return "" if turns is None else _WHITESPACE.sub(" ", " ".join(turns)).strip()


def response_text(completion: Any) -> str:
    """A completion as the response: a string as is; for a chat, the assistant turns joined."""
    if isinstance(completion, str):
        return completion
    turns = _turns(completion, "assistant")
    return "" if turns is None else " ".join(turn for turn in turns if turn)


def _str_or_none(value: Any) -> str | None:
    """Usable text only: empty strings and non-strings count as missing."""
    return value if isinstance(value, str) and value.strip() else None


def _first_str(mapping: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = _str_or_none(mapping.get(key))
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------- client caches


class _PerProcess(Generic[_C]):
    """A lazily made value, made again after a fork: a connection pool must not be shared with
    a child process (verl and data loaders fork)."""

    def __init__(self, factory: Callable[[], _C]) -> None:
        self._factory = factory
        self._slot: tuple[int, _C] | None = None

    def __call__(self) -> _C:
        pid = os.getpid()
        slot = self._slot
        if slot is None or slot[0] != pid:
            slot = self._slot = (pid, self._factory())
        return slot[1]


class _PerLoop(Generic[_C]):
    """One async client per process and event loop: httpx's async connections belong to the loop
    that opened them. Weak keys let clients of finished loops go with them."""

    def __init__(self, factory: Callable[[], _C]) -> None:
        self._factory = factory
        self._clients: _PerProcess[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _C]]
        self._clients = _PerProcess(weakref.WeakKeyDictionary)

    def __call__(self) -> _C:
        clients = self._clients()
        loop = asyncio.get_running_loop()
        client = clients.get(loop)
        if client is None:
            client = clients[loop] = self._factory()
        return client



#: Process-wide clients per (url, api key, deadline): a connection pool is shared by every call.
_sync_clients: _PerProcess[dict[tuple[str, str | None, float], RewardClient]] = _PerProcess(dict)
_async_clients: dict[tuple[str, str | None, float], _PerLoop[AsyncRewardClient]] = {}


def _client_options(deadline: float) -> dict[str, Any]:
    # No attempt may outlive the deadline either (180 s per attempt otherwise, as OpenRLHF waits).
    return {"deadline": deadline, "timeout": min(180.0, deadline)}


def _sync_client(url: str, api_key: str | None, deadline: float) -> RewardClient:
    clients = _sync_clients()
    client = clients.get((url, api_key, deadline))
    if client is None:
        client = RewardClient(url, api_key=api_key, **_client_options(deadline))
        clients[url, api_key, deadline] = client
    return client


def _async_client(url: str, api_key: str | None, deadline: float) -> AsyncRewardClient:
    per_loop = _async_clients.get((url, api_key, deadline))
    if per_loop is None:
        per_loop = _async_clients.setdefault(
            (url, api_key, deadline),
            _PerLoop(lambda: AsyncRewardClient(url, api_key=api_key, **_client_options(deadline))))
    return per_loop()


def _env_target() -> tuple[str, str | None]:
    """The service URL and API key from `R3_URL` / `R3_API_KEY`."""
    return os.environ.get("R3_URL") or DEFAULT_BASE_URL, os.environ.get("R3_API_KEY") or None


def _no_reward(error: R3ClientError, policy: OnFailure, framework: str, url: str, ids: Sequence[str]) -> None:
    """Apply the failure policy to a call that got no rewards: raise, or count, log and return."""
    if policy == "raise":
        failures.fail(error, framework=framework, url=url, items=ids)
    failures.record_failure(error, framework=framework, url=url, items=ids)


# --------------------------------------------------------------------------- TRL


def _per_sample(columns: Mapping[str, Any], keys: Sequence[str], n: int) -> list[str | None]:
    """For each sample, the first usable string among the per-sample lists `columns[key]`."""
    lists = [_plain(columns.get(key)) for key in keys]
    lists = [v for v in lists if isinstance(v, (list, tuple)) and len(v) == n]
    return [next((s for s in map(_str_or_none, (v[i] for v in lists)) if s), None) for i in range(n)]


def trl_items(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Any],
    *,
    reference_key: str | None = None,
    query_type_key: str | None = None,
) -> list[RewardItem]:
    """Items from a TRL reward-function call; `columns` are its extra kwargs."""
    prompts, completions = list(_plain(prompts)), list(_plain(completions))
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(prompts)
    references = _per_sample(columns, (reference_key,) if reference_key else REFERENCE_KEYS, n)
    query_types = _per_sample(columns, (query_type_key,) if query_type_key else QUERY_TYPE_KEYS, n)
    queries = [query_text(p) for p in prompts]
    for index, query in enumerate(queries):
        if not query.strip():
            raise MissingQuery(f"prompts[{index}] holds no query: expected the prompt text or a chat "
                               "message list with a user turn; R3 cannot score relevance against nothing")
    return [
        RewardItem(q, response_text(c), reference, query_type)
        for q, c, reference, query_type in zip(queries, completions, references, query_types, strict=True)
    ]


def name_reward_func(func: Callable[..., Any], backend: str | None) -> None:
    # TRL logs each reward function's mean under its __name__.
    func.__name__ = func.__qualname__ = "r3" if backend is None else f"r3_{backend}"


def _trl_setup(
    on_failure: str | None, deadline_s: float | None, client_kwargs: dict[str, Any]
) -> OnFailure:
    policy = on_failure_policy(on_failure, "TRL", has_no_reward_value=True)
    deadline = failures.deadline_s(deadline_s)
    client_kwargs.setdefault("deadline", deadline)
    return policy


def _trl_ids(n: int) -> list[str]:
    return [f"completions[{i}]" for i in range(n)]


def make_reward_func(
    base_url: str = DEFAULT_BASE_URL,
    *,
    backend: str | None = None,
    reference_key: str | None = None,
    query_type_key: str | None = None,
    on_failure: OnFailure | None = None,
    deadline_s: float | None = None,
    **client_kwargs: Any,
) -> Callable[..., list[float | None]]:
    """A TRL reward function `reward_func(prompts, completions, **kwargs) -> list[float | None]`.

    The reference comes from the dataset column `reference_key` (default: the first of
    `REFERENCE_KEYS` holding a string for that sample), the query type likewise from
    `query_type_key` / `QUERY_TYPE_KEYS`. `client_kwargs` go to `RewardClient`.

    When the service gives no rewards (after retries, within `deadline_s` / `R3_DEADLINE_S`):
    `on_failure="raise"` (default, or `R3_ON_FAILURE`) raises `RewardUnavailable`; "none" returns
    None per completion, which GRPOTrainer turns into NaN and leaves out of the group baseline
    (trl/trainer/grpo_trainer.py, `_calculate_rewards` and "unscorable_mask").
    """
    policy = _trl_setup(on_failure, deadline_s, client_kwargs)
    client = _PerProcess(lambda: RewardClient(base_url, **client_kwargs))
    client()  # fail now on bad client_kwargs, not at the first training step

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        items = trl_items(
            prompts, completions, kwargs, reference_key=reference_key, query_type_key=query_type_key
        )
        try:
            return list(client().score(items, backend=backend))
        except R3ClientError as error:
            _no_reward(error, policy, "TRL", client().base_url, _trl_ids(len(items)))
            return [None] * len(items)

    name_reward_func(reward_func, backend)
    return reward_func


def make_async_reward_func(
    base_url: str = DEFAULT_BASE_URL,
    *,
    backend: str | None = None,
    reference_key: str | None = None,
    query_type_key: str | None = None,
    on_failure: OnFailure | None = None,
    deadline_s: float | None = None,
    **client_kwargs: Any,
) -> Callable[..., Awaitable[list[float | None]]]:
    """Like `make_reward_func`, as an `async def` (for trainers that await reward functions);
    `client_kwargs` go to `AsyncRewardClient` (e.g. `max_concurrency`)."""
    policy = _trl_setup(on_failure, deadline_s, client_kwargs)
    AsyncRewardClient(base_url, **client_kwargs)  # fail now on bad client_kwargs
    client = _PerLoop(lambda: AsyncRewardClient(base_url, **client_kwargs))

    async def reward_func(
        prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        items = trl_items(
            prompts, completions, kwargs, reference_key=reference_key, query_type_key=query_type_key
        )
        try:
            return list(await client().score(items, backend=backend))
        except R3ClientError as error:
            _no_reward(error, policy, "TRL", client().base_url, _trl_ids(len(items)))
            return [None] * len(items)

    name_reward_func(reward_func, backend)
    return reward_func


# --------------------------------------------------------------------------- verl

#: Where verl's per-sample query is looked for: these `extra_info` keys, then a `raw_prompt` kwarg.
VERL_QUERY_KEYS = (*QUERY_KEYS, "raw_prompt")
BACKENDS_ENV = "R3_BACKENDS"


def _query_from(mapping: Mapping[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        value = _plain(mapping.get(key))
        if isinstance(value, str) or _turns(value, "user"):
            return query_text(value)
    return ""


def verl_item(
    solution_str: str, ground_truth: Any, extra_info: Any = None, raw_prompt: Any = None
) -> RewardItem:
    """An item from verl's per-sample fields.

    The query is the first of `extra_info[VERL_QUERY_KEYS]` that is a string or a chat message
    list, else `raw_prompt` (the chat messages, when the reward manager passes them);
    `ground_truth` is a reference string or a mapping with "reference" / "query_type"; the
    query type may also come from `extra_info["query_type" | "qtype"]`.
    """
    extra = _plain(extra_info)
    extra = extra if isinstance(extra, Mapping) else {}
    query = _query_from(extra, VERL_QUERY_KEYS) or _query_from({"raw_prompt": raw_prompt}, ("raw_prompt",))
    if not query.strip():
        raise MissingQuery(
            f"verl sample has no query: extra_info needs one of {', '.join(VERL_QUERY_KEYS)} holding the "
            f"prompt text or its chat messages, or the reward manager must pass raw_prompt "
            f"(extra_info keys: {sorted(map(str, extra)) or 'none'}); "
            "R3 cannot score relevance against nothing")
    truth = _plain(ground_truth)
    truth = truth if isinstance(truth, Mapping) else {"reference": truth}
    query_type = _first_str(truth, ("query_type",)) or _first_str(extra, QUERY_TYPE_KEYS)
    return RewardItem(query, solution_str, _str_or_none(truth.get("reference")), query_type)


def verl_backend(data_source: Any, backends: Mapping[str, Any] | None = None) -> str | None:
    """The backend for `data_source`: from `backends` (verl's `reward_kwargs.backends`), else the
    JSON object in `R3_BACKENDS`, falling back to `R3_BACKEND`, then the service's default."""
    mapping: Any = backends
    if mapping is None:
        raw = os.environ.get(BACKENDS_ENV)
        try:
            mapping = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise ValueError(f"{BACKENDS_ENV} is not JSON: {exc}") from None
    if not isinstance(mapping, Mapping) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"{BACKENDS_ENV} / backends must map data_source names to backend names, "
                         f"got {mapping!r}")
    return mapping.get(str(data_source)) or os.environ.get("R3_BACKEND") or None


def verl_id(data_source: Any, extra_info: Any, position: int | None = None) -> str:
    """A sample's id in logs: its position in the batch, data_source, and verl's index / uid."""
    extra = _plain(extra_info)
    extra = extra if isinstance(extra, Mapping) else {}
    parts = [] if position is None else [f"#{position}"]
    parts.append(f"data_source={data_source}")
    parts += [f"{key}={extra[key]}" for key in ("index", "uid") if extra.get(key) is not None]
    return " ".join(parts)


def _verl_client() -> tuple[RewardClient, str | None]:
    """The process's client for `R3_URL` / `R3_API_KEY` / `R3_DEADLINE_S`, and `R3_BACKEND` (all
    read per call, so a launcher may set them after import)."""
    url, api_key = _env_target()
    return _sync_client(url, api_key, failures.deadline_s()), os.environ.get("R3_BACKEND") or None


def _verl_setup(on_failure: str | None, deadline_s: float | None) -> tuple[str, str | None, float]:
    on_failure_policy(on_failure, "verl", has_no_reward_value=False)  # verl has no "no reward" value
    url, api_key = _env_target()
    return url, api_key, failures.deadline_s(deadline_s)


def _verl_failed(error: R3ClientError, url: str, ids: Sequence[str]) -> NoReturn:
    failures.fail(error, framework="verl", url=url, items=ids)


def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Any = None,
    *,
    backends: Mapping[str, Any] | None = None,
    on_failure: str | None = None,
    deadline_s: float | None = None,
    **kwargs: Any,
) -> float:
    """verl's synchronous per-sample reward function (`NaiveRewardManager`): the reward as a float.
    `backends`, `on_failure` and `deadline_s` may come from `custom_reward_function.reward_kwargs`."""
    url, api_key, deadline = _verl_setup(on_failure, deadline_s)
    item = verl_item(solution_str, ground_truth, extra_info, kwargs.get("raw_prompt"))
    client = _sync_client(url, api_key, deadline)
    try:
        return client.score([item], backend=verl_backend(data_source, backends))[0]
    except R3ClientError as error:
        _verl_failed(error, url, [verl_id(data_source, extra_info)])


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None = None,
    *,
    backends: Mapping[str, Any] | None = None,
    on_failure: str | None = None,
    deadline_s: float | None = None,
    **kwargs: Any,
) -> list[float]:
    """verl's batched reward function (`BatchRewardManager`): one request per backend (and chunk)."""
    url, api_key, deadline = _verl_setup(on_failure, deadline_s)
    sources, solutions = list(_plain(data_sources)), list(_plain(solution_strs))
    truths = list(_plain(ground_truths))
    infos = [None] * len(solutions) if extra_infos is None else list(_plain(extra_infos))
    if not len(sources) == len(solutions) == len(truths) == len(infos):
        raise ValueError("data_sources, solution_strs, ground_truths and extra_infos differ in length")
    items = [verl_item(s, t, e) for s, t, e in zip(solutions, truths, infos, strict=True)]
    groups: dict[str | None, list[int]] = {}
    for index, source in enumerate(sources):
        groups.setdefault(verl_backend(source, backends), []).append(index)
    client = _sync_client(url, api_key, deadline)
    rewards: list[float] = [0.0] * len(items)  # every slot is overwritten below, or nothing is returned
    for backend, indices in groups.items():
        try:
            scored = client.score([items[i] for i in indices], backend=backend)
        except R3ClientError as error:
            _verl_failed(error, url, [verl_id(sources[i], infos[i], i) for i in indices])
        for i, reward in zip(indices, scored, strict=True):
            rewards[i] = reward
    return rewards


def verl_result(reward: float, components: Components) -> dict[str, float]:
    """verl's reward-loop result: `score` plus R3's components under fixed numeric keys (verl
    stacks each key across the batch, so every sample must carry the same ones)."""
    return {
        "score": reward,
        "length_incentive": components.length_incentive,
        "repetition_penalty": components.repetition_penalty,
        "relevance": components.relevance or 0.0,  # as /get_reward's extra_logs: 0 when not computed
        "closed_branch": float(components.relevance_target == "reference"),
    }


async def compute_score_async(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Any = None,
    *,
    backends: Mapping[str, Any] | None = None,
    on_failure: str | None = None,
    deadline_s: float | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's reward loop (`custom_reward_function.name=compute_score_async`): a coroutine, which
    verl awaits per sample, concurrently (verl/experimental/reward/reward_loop/naive.py checks
    `inspect.iscoroutinefunction`); returns {"score", *components} (see `verl_result`)."""
    url, api_key, deadline = _verl_setup(on_failure, deadline_s)
    item = verl_item(solution_str, ground_truth, extra_info, kwargs.get("raw_prompt"))
    client = _async_client(url, api_key, deadline)
    try:
        backend = verl_backend(data_source, backends)
        scored = await client.score([item], backend=backend, return_components=True)
    except R3ClientError as error:
        _verl_failed(error, url, [verl_id(data_source, extra_info)])
    return verl_result(scored.rewards[0], scored.components[0])


# --------------------------------------------------------------------------- OpenRLHF


def _openrlhf_label(label: Any) -> Any:
    label = _plain(label)
    return dict(label) if isinstance(label, Mapping) else label


def _as_tensors(answer: dict[str, Any]) -> dict[str, Any]:
    """OpenRLHF's reward-file result: {"rewards", "scores", "extra_logs"} as float tensors (as its
    examples/python/reward_func.py returns), or lists where torch is not installed."""
    try:
        import torch
    except ImportError:
        return answer

    def tensor(values: list[float]) -> Any:
        return torch.tensor(values, dtype=torch.float32)

    return {"rewards": tensor(answer["rewards"]), "scores": tensor(answer["scores"]),
            "extra_logs": {key: tensor(values) for key, values in answer["extra_logs"].items()}}


def openrlhf_reward_func(
    queries: Sequence[str], prompts: Sequence[str] | None = None, labels: Sequence[Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any] | None:
    """OpenRLHF's file reward `reward_func(queries, prompts, labels)`: the whole call is ONE
    `/get_reward` request (queries are prompt + response full texts, prompts their prefixes,
    labels reference strings, {"reference", "query_type"} objects or None).

    Read from: openrlhf/utils/agent.py (SingleTurnAgentExecutor loads the file, calls
    `reward_func(queries, prompts, labels)` via asyncio.to_thread and reads "rewards", "scores",
    "extra_logs"; an exception is logged and leaves the sample's reward None) and
    examples/python/reward_func.py. On failure: raise (default) or, with `R3_ON_FAILURE=none`,
    return None (OpenRLHF's own "no reward" outcome).
    """
    policy = on_failure_policy(None, "OpenRLHF", has_no_reward_value=True)
    url, api_key = _env_target()
    client = _sync_client(url, api_key, failures.deadline_s())
    queries = list(_plain(queries))
    prompt_list = None if prompts is None else list(_plain(prompts))
    label_list = None if labels is None else [_openrlhf_label(label) for label in _plain(labels)]
    if label_list is not None and all(label is None for label in label_list):
        label_list = None
    try:
        backend = os.environ.get("R3_BACKEND") or None
        answer = client.get_reward(queries, prompt_list, label_list, backend=backend)
    except R3ClientError as error:
        _no_reward(error, policy, "OpenRLHF", url, [f"queries[{i}]" for i in range(len(queries))])
        return None
    return _as_tensors(answer)


# --------------------------------------------------------------------------- AReaL

#: End-of-turn tokens AReaL leaves in a decoded completion (it decodes with special tokens).
_TRAILING_SPECIAL = re.compile(
    r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|</s>|<eos>|<end_of_turn>))+\s*$")
#: AReaL's own per-prompt id keys (areal/workflow/rlvr.py, dump files).
AREAL_ID_KEYS = ("query_id", "id", "qid")
#: AReaL's AsyncRewardWrapper gives a reward function 15 s per try and returns 0 after its retries
#: (areal/api/reward_api.py): r3 must give up (and raise) before that turns into a fake zero.
AREAL_DEFAULT_DEADLINE_S = 12.0


def areal_item(
    completions: str, data: Mapping[str, Any], *, reference_key: str | None = None,
    query_type_key: str | None = None,
) -> RewardItem:
    """An item from AReaL's call: the query from the dataset's `messages` (user turns) or a
    query/question/prompt column (AReaL's `prompt` argument is the chat-templated text, so it is
    not used), the response with trailing end-of-turn tokens cut, reference / query type from the
    dataset columns."""
    query = _query_from(data, ("messages", *QUERY_KEYS))
    if not query.strip():
        raise MissingQuery(
            "AReaL sample has no query: the dataset needs `messages` with a user turn or one of "
            f"{', '.join(QUERY_KEYS)} (columns: {sorted(map(str, data)) or 'none'}); "
            "R3 cannot score relevance against nothing")
    reference = _first_str(data, (reference_key,) if reference_key else REFERENCE_KEYS)
    query_type = _first_str(data, (query_type_key,) if query_type_key else QUERY_TYPE_KEYS)
    return RewardItem(query, _TRAILING_SPECIAL.sub("", response_text(completions)), reference, query_type)


class AReaLRewardFn:
    """AReaL's `reward_fn(prompt, completions, prompt_ids, completion_ids, **data) -> float`.

    AReaL runs it through `AsyncRewardWrapper` in a process pool (areal/api/reward_api.py), so
    instances hold only picklable settings; each process opens its own client. AReaL has no "no
    reward" value (it does `float(reward)`, areal/workflow/rlvr.py), so `on_failure="none"` is
    refused here and a failure raises `RewardUnavailable`.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        backend: str | None = None,
        reference_key: str | None = None,
        query_type_key: str | None = None,
        on_failure: OnFailure | None = None,
        deadline_s: float | None = None,
        api_key: str | None = None,
    ) -> None:
        on_failure_policy(on_failure, "AReaL", has_no_reward_value=False)
        env_url, env_key = _env_target()
        self.base_url = base_url or env_url
        self.api_key = api_key or env_key
        self.backend = backend or os.environ.get("R3_BACKEND") or None
        self.reference_key, self.query_type_key = reference_key, query_type_key
        explicit = deadline_s if deadline_s is not None else os.environ.get(failures.DEADLINE_ENV)
        self.deadline = failures.deadline_s(explicit or AREAL_DEFAULT_DEADLINE_S)

    def __call__(
        self, prompt: str, completions: str, prompt_ids: Sequence[int], completion_ids: Sequence[int],
        **data: Any,
    ) -> float:
        item = areal_item(
            completions, data, reference_key=self.reference_key, query_type_key=self.query_type_key)
        client = _sync_client(self.base_url, self.api_key, self.deadline)
        try:
            return client.score([item], backend=self.backend)[0]
        except R3ClientError as error:
            ident = next((f"{k}={data[k]}" for k in AREAL_ID_KEYS if data.get(k) is not None), "sample")
            failures.fail(error, framework="AReaL", url=self.base_url, items=[ident])


def areal_reward_fn(
    prompt: str, completions: str, prompt_ids: Sequence[int], completion_ids: Sequence[int], **data: Any
) -> float:
    """`AReaLRewardFn` configured from the environment (`R3_URL`, `R3_BACKEND`, `R3_DEADLINE_S`...),
    importable by name (e.g. "r3_client.adapters.areal_reward_fn")."""
    return AReaLRewardFn()(prompt, completions, prompt_ids, completion_ids, **data)
