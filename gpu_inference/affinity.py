"""Model affinity: choose the worker for an attempt from the workers' free slots and warm models.

Pure and deterministic (the random baseline takes its generator), so the coordinator and an
offline simulator run the same code. A worker's warm set contains base model ids and adapter
(LoRA) ids, as ``WorkerStatus.warm_models`` reports them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """Dispatcher's view of one worker: its free slots and its warm models."""

    worker_id: str
    free_slots: int
    warm_models: frozenset[str]


@dataclass(frozen=True)
class LoadCosts:
    """Seconds to load what an attempt needs when it is not warm on the chosen worker."""

    model_load_s: float = 10.0
    adapter_load_s: float = 2.0


def load_s(worker: WorkerView, model: str, adapters: Iterable[str], costs: LoadCosts) -> float:
    """Return the seconds ``worker`` would spend loading ``model`` and ``adapters`` first."""
    seconds = 0.0 if model in worker.warm_models else costs.model_load_s
    for adapter in adapters:
        if adapter not in worker.warm_models:
            seconds += costs.adapter_load_s
    return seconds


def pick_affinity(
    workers: Sequence[WorkerView],
    model: str,
    adapters: Sequence[str] = (),
    costs: LoadCosts = LoadCosts(),
) -> str | None:
    """Pick the free worker with the least load time for the attempt; None when none is free.

    A worker with the model and adapters warm wins. Without one, any free worker takes the
    attempt rather than letting it wait for a warm one. Ties go to the worker with the most
    free slots, then to the smallest worker id.
    """
    free = [worker for worker in workers if worker.free_slots > 0]
    if not free:
        return None
    best = min(
        free,
        key=lambda worker: (
            load_s(worker, model, adapters, costs),
            -worker.free_slots,
            worker.worker_id,
        ),
    )
    return best.worker_id


def pick_random(workers: Sequence[WorkerView], rng: random.Random) -> str | None:
    """Pick any free worker uniformly at random (the baseline); None when none is free."""
    free = sorted(worker.worker_id for worker in workers if worker.free_slots > 0)
    if not free:
        return None
    return rng.choice(free)
