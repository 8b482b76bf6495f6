"""The affinity benchmark's pool simulator and its clairvoyant-cache reference."""

from __future__ import annotations

import argparse
import random

from bench.gpu import (
    TraceRequest,
    _belady_hits,
    add_arguments,
    affinity_picker,
    belady_hit_fraction,
    random_picker,
    simulate_pool,
)
from gpu_inference.affinity import LoadCosts


def _arguments(**changes: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for name, value in changes.items():
        setattr(args, name, value)
    return args


def test_belady_evicts_furthest_next_use() -> None:
    # At "c" the cache holds a (never used again) and b (used next), so a goes.
    assert _belady_hits(["a", "b", "a", "c", "b"], 2) == [False, False, True, False, True]


def test_belady_hit_needs_model_and_adapters() -> None:
    requests = [TraceRequest("m", ("x",), 1.0), TraceRequest("m", ("y",), 1.0),
                TraceRequest("m", ("x",), 1.0)]

    # Capacity 1: the model hits twice, but adapter x is evicted by y before it returns.
    assert belady_hit_fraction(requests, 1) == 0.0
    assert belady_hit_fraction(requests, 2) == 1 / 3


def test_affinity_beats_random_in_simulation() -> None:
    # Two models alternate over two one-model workers with spaced arrivals, so every worker
    # is free at each arrival and only the choice decides the hits.
    requests = [TraceRequest(f"m{index % 2}", (), 1.0) for index in range(200)]
    arrivals_s = [10.0 * index for index in range(200)]
    args = _arguments(workers=2, warm_models=1)
    costs = LoadCosts()

    by_random = simulate_pool(requests, random_picker(random.Random(3)), args, arrivals_s,
                              costs)
    by_affinity = simulate_pool(requests, affinity_picker(costs, wait=True), args, arrivals_s,
                                costs)

    # Only the first request of each model loads it under affinity.
    assert by_affinity["warm_hit_fraction"] == 198 / 200
    assert by_random["warm_hit_fraction"] < 0.7
    assert by_affinity["load_s_per_attempt"] < by_random["load_s_per_attempt"]
