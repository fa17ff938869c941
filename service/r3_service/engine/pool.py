"""The model pool: each model loaded once, behind one batching scheduler, with its batch limits
and a queue bound measured on this machine."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from r3_service.engine.scheduler import BatchLimits, BatchScheduler
from r3_service.metrics import Metrics
from r3_service.models.base import BatchModel
from r3_service.models.embedding import EmbeddingModel, Pooling
from r3_service.models.reward_model import RewardModel
from r3_service.settings import (
    CPU_BATCH_SIZE,
    CPU_BATCH_TOKENS,
    CPU_SHARED_BATCH_TOKENS,
    GPU_BATCH_SIZE,
    GPU_BATCH_TOKENS,
    RewardModelSpec,
    Settings,
)

log = logging.getLogger(__name__)

MEASURED_PASSES = 3
CALIBRATION_LENGTH = 64  # tokens per text of the batch the queue bound is timed on


def batch_limits(settings: Settings, model: BatchModel) -> BatchLimits:
    on_gpu = model.device.type == "cuda"
    max_tokens = settings.max_batch_tokens or (GPU_BATCH_TOKENS if on_gpu else CPU_BATCH_TOKENS)
    max_size = settings.max_batch_size or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
    shared = settings.shared_batch_tokens or (max_tokens if on_gpu else CPU_SHARED_BATCH_TOKENS)
    return BatchLimits(
        max_tokens=max_tokens, max_size=max_size, max_wait_s=settings.max_wait_ms / 1000,
        shared_max_tokens=min(max_tokens, shared),
        max_queue_tokens=configured_queue_bound(settings) or measured_queue_bound(
            model, max_tokens, max_size, settings.queue_seconds),
    )


def configured_queue_bound(settings: Settings) -> int | None:
    """R3_MAX_QUEUE_TOKENS; the deprecated R3_MAX_QUEUE_ITEMS counts texts of CALIBRATION_LENGTH."""
    if settings.max_queue_tokens is not None:
        return settings.max_queue_tokens
    if settings.max_queue_items is not None:
        log.warning("R3_MAX_QUEUE_ITEMS is deprecated: the queue bound counts tokens; "
                    "R3_MAX_QUEUE_ITEMS=%d is read as R3_MAX_QUEUE_TOKENS=%d",
                    settings.max_queue_items, settings.max_queue_items * CALIBRATION_LENGTH)
        return settings.max_queue_items * CALIBRATION_LENGTH
    return None


def measured_queue_bound(model: BatchModel, max_tokens: int, max_size: int, seconds: float) -> int:
    """Tokens the model clears in `seconds`: a full batch of CALIBRATION_LENGTH-token texts,
    timed after one warm-up pass (the fastest of MEASURED_PASSES). Never below a full batch, so
    a batch-sized request always fits."""
    length = min(CALIBRATION_LENGTH, model.info.max_length)
    count = max(1, min(max_size, max_tokens // length))
    batch = [[1000 + (row + i) % 1000 for i in range(length)] for row in range(count)]
    model.forward(batch)
    fastest = math.inf
    for _ in range(MEASURED_PASSES):  # the fastest pass: what the machine does undisturbed
        started = time.perf_counter()
        model.forward(batch)
        fastest = min(fastest, time.perf_counter() - started)
    bound = max(count * length, int(seconds * count * length / max(fastest, 1e-6)))
    log.info("queue bound for %s: %d tokens (%.1f s of work at the measured rate)",
             model.info.model, bound, seconds)
    return bound


def describe_model(model: BatchModel) -> dict[str, object]:
    info = model.info
    return {"model": info.model, "model_path": info.path, "device": info.device, "dtype": info.dtype,
            "dtype_reason": info.dtype_reason, "compiled": info.compiled, "packed": info.packed,
            "embedding_dim": info.dim, "normalize": info.normalize,
            "max_length": info.max_length,
            "truncation": "left" if isinstance(model, EmbeddingModel) else "right",
            **({"pooling": model.pooling} if isinstance(model, EmbeddingModel) else {})}


class ModelPool:
    """Backends naming the same model share its weights, its queue and its output cache."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.schedulers: dict[tuple[object, ...], BatchScheduler] = {}
        metrics.queue_depth.set_function(lambda: sum(s.queued for s in self.schedulers.values()))
        metrics.admitted_tokens.set_function(lambda: sum(s.held for s in self.schedulers.values()))
        metrics.watch_tenants(settings.tenant_weights(), self._tenant_depths)

    def _tenant_depths(self) -> dict[str, tuple[int, int]]:
        """Per tenant: texts waiting for a batch and tokens held, summed over models."""
        depths: dict[str, tuple[int, int]] = {}
        configured = self.settings.tenant_weights()
        for scheduler in self.schedulers.values():
            for tenant in {*scheduler.shares.held, *configured}:
                queued, held = depths.get(tenant, (0, 0))
                depths[tenant] = (queued + scheduler.queued_by(tenant),
                                  held + scheduler.shares.held.get(tenant, 0))
        return depths

    def embedding(self, name: str, normalize: bool | None, pooling: Pooling = "mean") -> BatchScheduler:
        """`mean`: the sentence embedding; another pooling is a view of the same loaded weights
        behind a queue of its own (its rows are another width, so never the same batch)."""
        s = self.settings
        if pooling != "mean":
            base = self.embedding(name, normalize).model
            assert isinstance(base, EmbeddingModel)
            return self._shared(("embedding", name, normalize, pooling), lambda: base.view(pooling))
        return self._shared(("embedding", name, normalize), lambda: EmbeddingModel(
            name, normalize=normalize, device=s.device, dtype=s.dtype, compile=s.compile,
            packing=s.packing))

    def reward_model(self, spec: RewardModelSpec) -> BatchScheduler:
        s = self.settings
        return self._shared(("reward-model", spec.model, spec.input_format, spec.max_length, spec.label),
                            lambda: RewardModel(spec.model, input_format=spec.input_format,
                                                max_length=spec.max_length, label=spec.label,
                                                device=s.device, dtype=s.dtype))

    def _shared(self, key: tuple[object, ...], load: Callable[[], BatchModel]) -> BatchScheduler:
        if key not in self.schedulers:
            model = load()
            s = self.settings
            name = ":".join(str(part) for part in key if part is not None)
            scheduler = BatchScheduler(model, batch_limits(s, model), self.metrics, name=name,
                                       cache_size=s.embedding_cache_size, cache_bytes=s.embedding_cache_bytes,
                                       tokenizer_threads=s.tokenizer_threads, weights=s.tenant_weights())
            self.metrics.watch_cache(scheduler.cache)
            self.schedulers[key] = scheduler
        return self.schedulers[key]

    def start(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.start()

    async def close(self) -> None:
        for scheduler in self.schedulers.values():
            await scheduler.close()
