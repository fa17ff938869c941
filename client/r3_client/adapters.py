"""Reward functions for RL trainers, backed by the r3 service.

- TRL (`GRPOTrainer(reward_funcs=...)` and friends): `make_reward_func`, `make_async_reward_func`.
- verl (`custom_reward_function.path=<this file>`, `name=compute_score` or
  `compute_score_batch`): the service URL comes from `R3_URL`, the backend from `R3_BACKEND`,
  an API key from `R3_API_KEY`.

Trainers pass whatever columns their dataset has; anything that cannot be used is ignored, so a
new trainer version adding kwargs never breaks training.
"""

from __future__ import annotations

import asyncio
import os
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from ._async import AsyncRewardClient
from ._core import DEFAULT_BASE_URL, RewardItem
from ._sync import RewardClient

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


def make_reward_func(
    base_url: str = DEFAULT_BASE_URL,
    *,
    backend: str | None = None,
    reference_key: str | None = None,
    query_type_key: str | None = None,
    **client_kwargs: Any,
) -> Callable[..., list[float]]:
    """A TRL reward function `reward_func(prompts, completions, **kwargs) -> list[float]`.

    The reference comes from the dataset column `reference_key` (default: the first of
    `REFERENCE_KEYS` holding a string for that sample), the query type likewise from
    `query_type_key` / `QUERY_TYPE_KEYS`. `client_kwargs` go to `RewardClient`.
    """
    client = _PerProcess(lambda: RewardClient(base_url, **client_kwargs))
    client()  # fail now on bad client_kwargs, not at the first training step

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        items = trl_items(
            prompts, completions, kwargs, reference_key=reference_key, query_type_key=query_type_key
        )
        return client().score(items, backend=backend)

    name_reward_func(reward_func, backend)
    return reward_func


def make_async_reward_func(
    base_url: str = DEFAULT_BASE_URL,
    *,
    backend: str | None = None,
    reference_key: str | None = None,
    query_type_key: str | None = None,
    **client_kwargs: Any,
) -> Callable[..., Awaitable[list[float]]]:
    """Like `make_reward_func`, as an `async def` (for trainers that await reward functions);
    `client_kwargs` go to `AsyncRewardClient` (e.g. `max_concurrency`)."""
    AsyncRewardClient(base_url, **client_kwargs)  # fail now on bad client_kwargs
    client = _PerLoop(lambda: AsyncRewardClient(base_url, **client_kwargs))

    async def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        items = trl_items(
            prompts, completions, kwargs, reference_key=reference_key, query_type_key=query_type_key
        )
        return await client().score(items, backend=backend)

    name_reward_func(reward_func, backend)
    return reward_func


# --------------------------------------------------------------------------- verl


def _verl_client_for(url: str, api_key: str | None) -> RewardClient:
    clients = _verl_clients()
    client = clients.get((url, api_key))
    if client is None:
        client = clients[url, api_key] = RewardClient(url, api_key=api_key)
    return client


_verl_clients: _PerProcess[dict[tuple[str, str | None], RewardClient]] = _PerProcess(dict)


def _verl_client() -> tuple[RewardClient, str | None]:
    """The process's client for `R3_URL` and the backend named by `R3_BACKEND` (read per call,
    so a launcher may set them after import)."""
    url = os.environ.get("R3_URL") or DEFAULT_BASE_URL
    client = _verl_client_for(url, os.environ.get("R3_API_KEY") or None)
    return client, os.environ.get("R3_BACKEND") or None


def verl_item(solution_str: str, ground_truth: Any, extra_info: Any = None) -> RewardItem:
    """An item from verl's per-sample fields.

    The query is the first of `extra_info[QUERY_KEYS]` that is a string or a chat message list;
    `ground_truth` is a reference string or a mapping with "reference" / "query_type"; the
    query type may also come from `extra_info["query_type" | "qtype"]`.
    """
    extra = _plain(extra_info)
    extra = extra if isinstance(extra, Mapping) else {}
    query = ""
    for key in QUERY_KEYS:
        value = _plain(extra.get(key))
        if isinstance(value, str) or _turns(value, "user"):
            query = query_text(value)
            break
    if not query.strip():
        raise MissingQuery(
            f"verl sample has no query: extra_info needs one of {', '.join(QUERY_KEYS)} holding the "
            f"prompt text or its chat messages (extra_info keys: {sorted(map(str, extra)) or 'none'}); "
            "R3 cannot score relevance against nothing")
    truth = _plain(ground_truth)
    truth = truth if isinstance(truth, Mapping) else {"reference": truth}
    query_type = _first_str(truth, ("query_type",)) or _first_str(extra, QUERY_TYPE_KEYS)
    return RewardItem(query, solution_str, _str_or_none(truth.get("reference")), query_type)


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """verl's per-sample reward function (`NaiveRewardManager`)."""
    client, backend = _verl_client()
    return client.score([verl_item(solution_str, ground_truth, extra_info)], backend=backend)[0]


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """verl's batched reward function (`BatchRewardManager`): one request per chunk."""
    solutions, truths = list(_plain(solution_strs)), list(_plain(ground_truths))
    infos = [None] * len(solutions) if extra_infos is None else list(_plain(extra_infos))
    if not len(solutions) == len(truths) == len(infos):
        raise ValueError("solution_strs, ground_truths and extra_infos differ in length")
    items = [verl_item(s, t, e) for s, t, e in zip(solutions, truths, infos, strict=True)]
    client, backend = _verl_client()
    return client.score(items, backend=backend)
