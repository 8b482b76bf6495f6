"""Unit tests of the model-affinity worker choice."""

from __future__ import annotations

import random

from gpu_inference.affinity import (
    LoadCosts,
    Placement,
    WorkerView,
    load_s,
    pick_affinity,
    pick_random,
    place,
    rendezvous_rank,
    route_partition,
    route_shortest_queue,
)
from schemas.events import Tier
from streams.pool import PoolMonitor


def _worker(worker_id: str, free_slots: int, *warm: str,
            frees_in_s: float | None = None) -> WorkerView:
    return WorkerView(worker_id=worker_id, free_slots=free_slots, warm_models=frozenset(warm),
                      frees_in_s=frees_in_s)


def test_affinity_picks_warm_free_worker() -> None:
    workers = [_worker("a", 2, "M1"), _worker("b", 1, "M2"), _worker("c", 3)]

    assert pick_affinity(workers, "M2") == "b"


def test_affinity_falls_back_when_warm_worker_busy() -> None:
    workers = [_worker("a", 1, "M1"), _worker("b", 0, "M2"), _worker("c", 3)]

    chosen = pick_affinity(workers, "M2")

    assert chosen == "c"


def test_affinity_prefers_warm_adapters() -> None:
    workers = [_worker("a", 1, "M1"), _worker("b", 1, "M1", "L7")]

    assert pick_affinity(workers, "M1", ["L7"]) == "b"
    # A warm base model outweighs a warm adapter at the default costs.
    assert pick_affinity([_worker("a", 1, "M1"), _worker("b", 1, "L7")], "M1", ["L7"]) == "a"


def test_affinity_none_when_all_busy() -> None:
    workers = [_worker("a", 0, "M1"), _worker("b", 0)]

    assert pick_affinity(workers, "M1") is None
    assert pick_random(workers, random.Random(1)) is None


def test_cold_model_lands_on_rendezvous_first() -> None:
    workers = [_worker(name, 1) for name in "abcdefgh"]
    first = min("abcdefgh", key=lambda name: rendezvous_rank("M9", name))

    assert pick_affinity(workers, "M9") == first
    # Another model's cold loads spread to other workers; some model ranks each worker first.
    firsts = {min("abcdefgh", key=lambda name, model=model: rendezvous_rank(model, name))
              for model in (f"M{index}" for index in range(64))}
    assert firsts == set("abcdefgh")


def test_rendezvous_stable_when_worker_leaves() -> None:
    names = "abcdefgh"
    models = [f"M{index}" for index in range(200)]

    def first(model: str, pool: str) -> str:
        return min(pool, key=lambda name: rendezvous_rank(model, name))

    moved = [model for model in models if first(model, names) != first(model, names[:-1])]

    # Only the models that ranked the removed worker first move.
    assert all(first(model, names) == "h" for model in moved)


def test_place_waits_for_warm_worker_freeing_soon() -> None:
    costs = LoadCosts(model_load_s=10.0, adapter_load_s=2.0)
    workers = [_worker("warm", 0, "M1", frees_in_s=3.0), _worker("cold", 1)]

    assert place(workers, "M1", costs=costs) == Placement("warm", 0.0, wait=True)


def test_place_skips_wait_longer_than_load() -> None:
    costs = LoadCosts(model_load_s=10.0, adapter_load_s=2.0)
    slow = [_worker("warm", 0, "M1", frees_in_s=12.0), _worker("cold", 1)]
    waited = [_worker("warm", 0, "M1", frees_in_s=3.0), _worker("cold", 1)]
    unknown = [_worker("warm", 0, "M1"), _worker("cold", 1)]

    assert place(slow, "M1", costs=costs) == Placement("cold", 10.0)
    assert place(waited, "M1", costs=costs, waited_s=8.0) == Placement("cold", 10.0)
    assert place(unknown, "M1", costs=costs) == Placement("cold", 10.0)


def test_place_prefers_free_warm_worker() -> None:
    workers = [_worker("busy", 0, "M1", frees_in_s=0.0), _worker("free", 1, "M1")]

    assert place(workers, "M1") == Placement("free", 0.0)


def test_route_partition_of_chosen_worker() -> None:
    workers = [_worker("a", 1, "M1"), _worker("b", 1, "M2"), _worker("c", 1, "M1")]
    owned = {"a": [0, 3], "b": [1], "c": []}

    worker_id, partition = route_partition(workers, owned, "M1", (), "attempt-1:1") or ("", -1)

    # "c" holds the model too but owns no partition, so only "a" can receive it.
    assert worker_id == "a"
    assert partition in (0, 3)
    assert route_partition(workers, owned, "M2", (), "attempt-2:1") == ("b", 1)


def test_route_partition_none_when_all_busy() -> None:
    workers = [_worker("a", 0, "M1"), _worker("b", 0)]

    assert route_partition(workers, {"a": [0], "b": [1]}, "M1", (), "attempt:1") is None


def test_shortest_queue_gets_saturated_attempt() -> None:
    owned = {"a": [0, 1], "b": [2, 3], "c": []}

    worker_id, partition = route_shortest_queue(owned, {"a": 5, "b": 2}, "attempt:1") \
        or ("", -1)

    # "c" has no queue at all but owns no partition, so it cannot receive the attempt.
    assert worker_id == "b"
    assert partition in (2, 3)


def test_shortest_queue_spreads_ties() -> None:
    owned = {"a": [0], "b": [1]}
    chosen = {route_shortest_queue(owned, {}, f"attempt-{index}:1") for index in range(20)}

    assert chosen == {("a", 0), ("b", 1)}


def test_shortest_queue_none_without_partitions() -> None:
    assert route_shortest_queue({"a": []}, {}, "attempt:1") is None


def test_pool_counts_queue_per_routed_worker() -> None:
    pool = PoolMonitor(status_ttl_s=5.0)
    pool.dispatched("x", Tier.BATCH, "a")
    pool.dispatched("y", Tier.STANDARD, "a")
    pool.dispatched("z", Tier.STANDARD, "b")
    pool.dispatched("unrouted", Tier.STANDARD)
    assert pool.queued_by_worker() == {"a": 2, "b": 1}

    pool.dequeued("x")
    pool.dequeued("z")
    assert pool.queued_by_worker() == {"a": 1}
    assert pool.backlog()[Tier.STANDARD] == 2


def test_load_seconds_per_missing_part() -> None:
    costs = LoadCosts(model_load_s=10.0, adapter_load_s=2.0)
    worker = _worker("a", 1, "M1", "L1")

    assert load_s(worker, "M1", ["L1"], costs) == 0.0
    assert load_s(worker, "M1", ["L1", "L2"], costs) == 2.0
    assert load_s(worker, "M2", ["L2", "L3"], costs) == 14.0


def test_random_picks_only_free_workers() -> None:
    workers = [_worker("a", 0), _worker("b", 1), _worker("c", 2)]
    rng = random.Random(7)

    chosen = {pick_random(workers, rng) for _ in range(50)}

    assert chosen == {"b", "c"}
