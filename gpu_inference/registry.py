"""Per-worker model registry: pipelines and adapters loaded on first use, kept warm in a
memory-bounded LRU.

A pipeline's size is the bytes of its modules' parameters and buffers; an adapter reports its
own. Loading an entry that does not fit evicts the least recently used idle ones first, of
either kind. Entries in use by a running batch are never evicted, so the budget can be
exceeded while they finish. Loads and evictions are logged and traced as spans of their own
(stages ``model_load`` and ``model_evict``, or ``adapter_load`` and ``adapter_evict``), so
load time is not counted as generation time.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace

from streams.tracing import stage_span

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def pipeline_bytes(pipe: Any) -> int:
    """Sum the parameter and buffer bytes of every torch module among the pipeline's parts.

    An object with a ``size_bytes()`` method, such as an adapter, reports its own size.
    """
    size_bytes = getattr(pipe, "size_bytes", None)
    if callable(size_bytes):
        return int(size_bytes())
    components = getattr(pipe, "components", None)
    modules = components.values() if isinstance(components, dict) else [pipe]
    total = 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class _Entry:
    pipeline: Any
    size_bytes: int
    # "model" or "adapter": names the spans and log lines of the entry.
    kind: str = "model"
    users: int = 0


# Span attribute that names the entry, by kind.
_ID_ATTRIBUTE = {"model": "gen_ai.request.model", "adapter": "slotforge.adapter_id"}


class ModelRegistry:
    """LRU of loaded pipelines bounded by ``budget_bytes``; thread-safe.

    Args:
        budget_bytes: memory the loaded pipelines may occupy together.
        tracer: tracer for the ``model_load`` and ``model_evict`` spans; None records none.
        on_evict: called with each evicted pipeline, for example to free device memory.
    """

    def __init__(
        self,
        budget_bytes: int,
        tracer: trace.Tracer | None = None,
        on_evict: Callable[[Any], None] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.tracer = tracer or trace.NoOpTracer()
        self.on_evict = on_evict
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Sizes of pipelines loaded before, so room is made before a load, not after it.
        self._known_bytes: dict[str, int] = {}
        # One lock serializes loads, because random-weight pipelines seed the global RNG.
        self._lock = threading.RLock()

    def models(self) -> list[str]:
        """Keys of the loaded pipelines and adapters, least recently used first."""
        with self._lock:
            return list(self._entries)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(entry.size_bytes for entry in self._entries.values())

    @contextmanager
    def use(
        self,
        key: str,
        load: Callable[[], Any],
        parent: otel_context.Context | None = None,
        kind: str = "model",
    ) -> Iterator[Any]:
        """Yield the entry for ``key``, loading it first if needed; it stays pinned meanwhile.

        ``kind`` is ``model`` or ``adapter`` and names the load and eviction spans.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._load(key, load, parent, kind)
            elif entry.kind != kind:
                raise ValueError(f"registry key {key!r} is loaded as a {entry.kind}, not as "
                                 f"a {kind}; model and adapter ids must differ")
            self._entries.move_to_end(key)
            entry.users += 1
        try:
            yield entry.pipeline
        finally:
            with self._lock:
                entry.users -= 1

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        """Return the pipeline for ``key`` without pinning it."""
        with self.use(key, load) as pipeline:
            return pipeline

    def _expected_bytes(self, key: str) -> int:
        """Return the size of ``key`` when it was loaded before, else the mean size seen."""
        if key in self._known_bytes:
            return self._known_bytes[key]
        if not self._known_bytes:
            return 0
        return sum(self._known_bytes.values()) // len(self._known_bytes)

    def _load(
        self, key: str, load: Callable[[], Any], parent: otel_context.Context | None,
        kind: str,
    ) -> _Entry:
        # Evicting first frees device memory for the load; the size is an estimate until then.
        self._evict_for(self._expected_bytes(key), parent)
        with stage_span(
            self.tracer, f"{kind}_load", f"{kind}_load", parent=parent,
            attributes={_ID_ATTRIBUTE[kind]: key},
        ) as span:
            started = time.perf_counter()
            pipeline = load()
            size_bytes = pipeline_bytes(pipeline)
            span.set_attribute("slotforge.model_bytes", size_bytes)
        self._known_bytes[key] = size_bytes
        self._evict_for(size_bytes, parent)
        entry = _Entry(pipeline=pipeline, size_bytes=size_bytes, kind=kind)
        self._entries[key] = entry
        logger.info(
            "Loaded %s %s (%.1f MiB) in %.2f s; %d entries warm, %.1f of %.1f MiB used",
            kind,
            key,
            size_bytes / MIB,
            time.perf_counter() - started,
            len(self._entries),
            self.used_bytes() / MIB,
            self.budget_bytes / MIB,
        )
        return entry

    def _evict_for(self, size_bytes: int, parent: otel_context.Context | None) -> None:
        """Evict idle pipelines, least recently used first, until ``size_bytes`` more fit."""
        for key in list(self._entries):
            if self.used_bytes() + size_bytes <= self.budget_bytes:
                return
            if self._entries[key].users == 0:
                self._evict(key, parent)
        if self.used_bytes() + size_bytes > self.budget_bytes:
            logger.warning(
                "Model of %.1f MiB exceeds the free budget (%.1f of %.1f MiB used by models "
                "in use); loading it anyway",
                size_bytes / MIB,
                self.used_bytes() / MIB,
                self.budget_bytes / MIB,
            )

    def _evict(self, key: str, parent: otel_context.Context | None) -> None:
        entry = self._entries.pop(key)
        kind = entry.kind
        with stage_span(
            self.tracer, f"{kind}_evict", f"{kind}_evict", parent=parent,
            attributes={_ID_ATTRIBUTE[kind]: key, "slotforge.model_bytes": entry.size_bytes},
        ):
            if self.on_evict is not None:
                self.on_evict(entry.pipeline)
            del entry
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        logger.info("Evicted %s %s to stay within the %.1f MiB budget",
                    kind, key, self.budget_bytes / MIB)
