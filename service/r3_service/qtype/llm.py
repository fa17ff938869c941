"""The `llm` query-type classifier: the paper's prompt (appendix B, figure 5) on any OpenAI-compatible
chat-completions endpoint (a local vLLM, a hosted API).

Only `OPEN-ENDED` or `CLOSED-ENDED` counts as an answer; anything else, an error status, a timeout
or a refused connection after the retries makes that query fall back to another classifier
(`learned`), so an unreliable endpoint slows classification down but never fails it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from r3_client import parse_retry_after
from r3_service.qtype.base import BaseClassifier, Label, QueryTypeClassifier, short_hash
from r3_service.rule.querytypes import QueryType

log = logging.getLogger(__name__)

PROMPT = (
    "Could you identify whether the last user query of the below conversation is open-ended or not?\n"
    "Open-ended means that the responses to the query can be relatively anything and creative.\n"
    "However, its counterparts, i.e., ‘closed-ended query’, indicate the corresponding responses should "
    "be consistent and constrained as a closed form.\n"
    "Please just answer it either “OPEN-ENDED” or “CLOSED-ENDED”.\n\n"
    "CONVERSATION:\n{conversation}"
)
ANSWERS: dict[str, QueryType] = {"OPEN-ENDED": "open", "CLOSED-ENDED": "closed"}
MAX_RETRY_AFTER_S = 10.0
_QUOTES = "\"'“”‘’`"


def parse_answer(text: str) -> QueryType | None:
    """One of the two tokens, exactly (case included), give or take surrounding whitespace, quotes
    and a final full stop; None for anything else."""
    token = text.strip().removesuffix(".").strip().strip(_QUOTES).strip()
    return ANSWERS.get(token)


class EndpointError(Exception):
    """One request failed; `retryable` for timeouts, connection errors, 429 and 5xx."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass
class LlmStats:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    answered: int = 0  # queries the endpoint answered with one of the two tokens
    fallbacks: int = 0  # queries answered by the fallback classifier instead


class LlmClassifier(BaseClassifier):
    name = "llm"

    def __init__(self, base_url: str, model: str, *, fallback: QueryTypeClassifier,
                 api_key: str | None = None, timeout_s: float = 10.0, retries: int = 2,
                 backoff_s: float = 0.5, concurrency: int = 8) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.version = short_hash(PROMPT, model)  # the endpoint's address does not change the answers
        self.fallback = fallback
        self.retries = retries
        self.backoff_s = backoff_s
        self.stats = LlmStats()
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)
        self._slots = asyncio.Semaphore(concurrency)

    async def label(self, queries: Sequence[str]) -> list[Label]:
        answers = await asyncio.gather(*(self._label_one(query) for query in queries))
        missing = [i for i, answer in enumerate(answers) if answer is None]
        fallback = await self.fallback.label([queries[i] for i in missing]) if missing else []
        backup = dict(zip(missing, fallback, strict=True))
        return [answer if answer is not None else backup[i] for i, answer in enumerate(answers)]

    async def _label_one(self, query: str) -> Label | None:
        async with self._slots:
            for attempt in range(self.retries + 1):
                try:
                    query_type = await self._ask(query)
                except EndpointError as error:
                    if not error.retryable or attempt == self.retries:
                        self.stats.fallbacks += 1
                        self._log_failure(error)
                        return None
                    self.stats.retries += 1
                    await asyncio.sleep(error.retry_after or self.backoff_s * 2**attempt)
                    continue
                self.stats.answered += 1
                return Label(query_type, self.id)
        return None

    async def _ask(self, query: str) -> QueryType:
        body = {"model": self.model, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": PROMPT.format(conversation=query.strip())}]}
        self.stats.requests += 1
        try:
            response = await self._client.post(self.url, json=body)
        except httpx.TimeoutException as error:
            raise EndpointError(f"timeout: {error!r}", retryable=True) from None
        except httpx.TransportError as error:
            raise EndpointError(f"{type(error).__name__}: {error}", retryable=True) from None
        if response.status_code == 429 or response.status_code >= 500:
            raise EndpointError(f"HTTP {response.status_code}", retryable=True,
                                retry_after=_capped(parse_retry_after(response.headers.get("retry-after"))))
        if response.status_code != 200:
            raise EndpointError(f"HTTP {response.status_code}: {response.text[:200]}", retryable=False)
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise EndpointError("not a chat-completions response", retryable=False) from None
        query_type = parse_answer(content) if isinstance(content, str) else None
        if query_type is None:
            raise EndpointError(f"unexpected answer {str(content)[:80]!r}", retryable=False)
        return query_type

    def _log_failure(self, error: EndpointError) -> None:
        failures = self.stats.fallbacks
        if failures == 1 or failures % 100 == 0:  # a dead endpoint must not flood the log
            log.warning("query-type endpoint %s failed (%s); %d queries fell back to %s so far",
                        self.url, error, failures, self.fallback.id)

    async def aclose(self) -> None:
        await self._client.aclose()
        await self.fallback.aclose()


def _capped(seconds: float | None) -> float | None:
    """The server's Retry-After, capped: a query waits on the fallback rather than for minutes."""
    return min(seconds, MAX_RETRY_AFTER_S) if seconds is not None else None
