"""Model affinity: choose the worker for an attempt from the workers' free slots and warm models.

Pure and deterministic (the random baseline takes its generator), so the coordinator and an
offline simulator run the same code. A worker's warm set contains base model ids and adapter
(LoRA) ids, as ``WorkerStatus.warm_models`` reports them.

The policy, in order:

1. The free worker with the least load time wins, so a worker with the model and adapters
   warm takes the attempt when one is free.
2. Among free workers with equal load time, the one that ranks highest for the model by
   rendezvous hashing wins. A cold model therefore keeps landing on the same few workers,
   and the pool's warm sets split the models between workers instead of every worker
   caching the same popular ones.
3. When a busy worker holds more of the attempt warm and its slot is expected to free
   sooner than the saved load time, the attempt waits for it. Without an estimate of when a
   slot frees (``frees_in_s`` is None), the attempt never waits.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    """Dispatcher's view of one worker: its free slots, its warm models and, when known, the
    expected seconds until its next slot frees."""

    worker_id: str
    free_slots: int
    warm_models: frozenset[str]
    frees_in_s: float | None = None


@dataclass(frozen=True)
class LoadCosts:
    """Seconds to load what an attempt needs when it is not warm on the chosen worker."""

    model_load_s: float = 10.0
    adapter_load_s: float = 2.0


@dataclass(frozen=True)
class Placement:
    """Worker chosen for an attempt; ``wait`` is true when that worker has no free slot yet."""

    worker_id: str
    load_s: float
    wait: bool = False


def load_s(worker: WorkerView, model: str, adapters: Iterable[str], costs: LoadCosts) -> float:
    """Return the seconds ``worker`` would spend loading ``model`` and ``adapters`` first."""
    seconds = 0.0 if model in worker.warm_models else costs.model_load_s
    for adapter in adapters:
        if adapter not in worker.warm_models:
            seconds += costs.adapter_load_s
    return seconds


def rendezvous_rank(model: str, worker_id: str) -> int:
    """Rank ``worker_id`` for ``model`` by rendezvous (highest random weight) hashing.

    Lower ranks come first. Adding or removing a worker moves only the models that ranked it
    first, unlike ``hash(model) % workers``.
    """
    digest = hashlib.blake2b(f"{model}\0{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place(
    workers: Sequence[WorkerView],
    model: str,
    adapters: Sequence[str] = (),
    costs: LoadCosts = LoadCosts(),
    *,
    waited_s: float = 0.0,
) -> Placement | None:
    """Place an attempt on a worker; None when no worker is free and none is worth waiting for.

    ``waited_s`` is how long the attempt has already waited for a warm worker, so repeated
    decisions on the same attempt stop waiting once the wait exceeds the load time saved.
    """
    best_free: Placement | None = None
    free = [worker for worker in workers if worker.free_slots > 0]
    if free:
        chosen = min(
            free,
            key=lambda worker: (
                load_s(worker, model, adapters, costs),
                rendezvous_rank(model, worker.worker_id),
                -worker.free_slots,
                worker.worker_id,
            ),
        )
        best_free = Placement(chosen.worker_id, load_s(chosen, model, adapters, costs))
        if best_free.load_s == 0:
            return best_free

    # The alternative to waiting is the best free worker's load, or, with none free, an
    # unknown wait for any slot plus a full load.
    fallback_s = best_free.load_s if best_free is not None else (
        costs.model_load_s + costs.adapter_load_s * len(adapters))
    best_wait: Placement | None = None
    best_wait_s = fallback_s
    for worker in workers:
        if worker.free_slots > 0 or worker.frees_in_s is None:
            continue
        worker_load_s = load_s(worker, model, adapters, costs)
        total_s = waited_s + max(0.0, worker.frees_in_s) + worker_load_s
        if worker_load_s < fallback_s and total_s < best_wait_s:
            best_wait = Placement(worker.worker_id, worker_load_s, wait=True)
            best_wait_s = total_s
    return best_wait or best_free


def pick_affinity(
    workers: Sequence[WorkerView],
    model: str,
    adapters: Sequence[str] = (),
    costs: LoadCosts = LoadCosts(),
) -> str | None:
    """Pick the free worker with the least load time for the attempt; None when none is free.

    A worker with the model and adapters warm wins. Without one, any free worker takes the
    attempt rather than letting it wait for a warm one; among equals, the worker that ranks
    highest for the model by rendezvous hashing wins.
    """
    free = [worker for worker in workers if worker.free_slots > 0]
    placement = place(free, model, adapters, costs)
    return None if placement is None else placement.worker_id


def route_partition(
    workers: Sequence[WorkerView],
    owned_partitions: Mapping[str, Sequence[int]],
    model: str,
    adapters: Sequence[str],
    record_key: str,
    costs: LoadCosts = LoadCosts(),
) -> tuple[str, int] | None:
    """Pick a worker with ``pick_affinity`` and one of the partitions it owns.

    Only workers that own partitions take part. Returns (worker id, partition), or None when
    no such worker is free, so the caller falls back to the default partitioner instead of
    queueing the attempt behind a busy worker. ``record_key`` spreads a worker's attempts
    over its partitions.
    """
    candidates = [worker for worker in workers if owned_partitions.get(worker.worker_id)]
    chosen = pick_affinity(candidates, model, adapters, costs)
    if chosen is None:
        return None
    partitions = sorted(owned_partitions[chosen])
    return chosen, partitions[zlib.crc32(record_key.encode("utf-8")) % len(partitions)]


def route_shortest_queue(
    owned_partitions: Mapping[str, Sequence[int]],
    queued: Mapping[str, int],
    record_key: str,
) -> tuple[str, int] | None:
    """Pick the worker with the fewest attempts queued for it and one of its partitions.

    Used when the pool is saturated and no worker is free. A worker takes attempts only
    from its own partitions, so spreading them by key alone leaves one worker idle at the
    end of a backlog while the other still has a queue. Ties go to the worker that ranks highest
    for ``record_key``. Returns None when no worker owns partitions.
    """
    candidates = sorted(worker_id for worker_id, partitions in owned_partitions.items()
                        if partitions)
    if not candidates:
        return None
    chosen = min(candidates, key=lambda worker_id: (
        queued.get(worker_id, 0), rendezvous_rank(record_key, worker_id)))
    partitions = sorted(owned_partitions[chosen])
    return chosen, partitions[zlib.crc32(record_key.encode("utf-8")) % len(partitions)]


def pick_random(workers: Sequence[WorkerView], rng: random.Random) -> str | None:
    """Pick any free worker uniformly at random (the baseline); None when none is free."""
    free = sorted(worker.worker_id for worker in workers if worker.free_slots > 0)
    if not free:
        return None
    return rng.choice(free)
