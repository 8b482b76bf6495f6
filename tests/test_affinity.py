"""Unit tests of the model-affinity worker choice."""

from __future__ import annotations

import random

from gpu_inference.affinity import LoadCosts, WorkerView, load_s, pick_affinity, pick_random


def _worker(worker_id: str, free_slots: int, *warm: str) -> WorkerView:
    return WorkerView(worker_id=worker_id, free_slots=free_slots, warm_models=frozenset(warm))


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


def test_affinity_ties_break_by_free_slots() -> None:
    workers = [_worker("a", 1), _worker("b", 3), _worker("c", 3)]

    assert pick_affinity(workers, "M9") == "b"


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
