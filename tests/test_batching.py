"""Dynamic batching: grouping, identical images per seed, per-attempt cancellation, OOM splits."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from gpu_inference.batching import Batcher, batch_key
from gpu_inference.generation import GenerationCancelled, GenerationRequest, GenerationResult
from gpu_inference.pipeline import BatchItem, DiffusersRunner
from schemas.events import GenerationParams


def _request(seed: int, steps: int = 4, **changes: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "model": "M0012", "prompt": "a floor plan", "steps": steps, "width": 32, "height": 32,
        "seed": seed,
    }
    values.update(changes)
    return GenerationRequest(**values)


def _pixels(outcome: Any) -> np.ndarray:
    assert isinstance(outcome, GenerationResult), outcome
    return np.asarray(outcome.image)


@pytest.fixture(scope="module")
def runner() -> DiffusersRunner:
    return DiffusersRunner(device="cpu")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batched_images_match_unbatched(eta: float) -> None:
    runner = DiffusersRunner(device="cpu", eta=eta)
    seeds = [11, 12, 13, 14]

    alone = [runner.generate(_request(seed)) for seed in seeds]
    batched = runner.generate_batch([BatchItem(_request(seed)) for seed in seeds])

    assert len(batched) == len(seeds)
    for single, together in zip(alone, batched, strict=True):
        assert np.array_equal(_pixels(single), _pixels(together))
    assert not np.array_equal(_pixels(batched[0]), _pixels(batched[1]))


def test_cancelled_row_leaves_batch(runner: DiffusersRunner) -> None:
    cancel = threading.Event()
    steps_by_row: list[list[int]] = [[], [], []]
    rows_per_step: list[int] = []

    def on_step_for(row: int) -> Any:
        def on_step(step: int, _total: int) -> None:
            steps_by_row[row].append(step)
            if row == 1 and step == 2:
                cancel.set()
        return on_step

    runner.before_step = lambda batch_size, _step: rows_per_step.append(batch_size)
    try:
        outcomes = runner.generate_batch([
            BatchItem(_request(21, steps=6), on_step_for(0)),
            BatchItem(_request(22, steps=6), on_step_for(1), cancel),
            BatchItem(_request(23, steps=6), on_step_for(2)),
        ])
    finally:
        runner.before_step = None

    assert isinstance(outcomes[1], GenerationCancelled)
    assert "after 2 of 6 steps" in str(outcomes[1])
    assert steps_by_row[1] == [1, 2]
    assert steps_by_row[0] == [1, 2, 3, 4, 5, 6]
    assert steps_by_row[2] == [1, 2, 3, 4, 5, 6]
    assert rows_per_step == [3, 3, 2, 2, 2, 2]
    # The rows that stayed produce the images they would alone.
    assert np.array_equal(_pixels(outcomes[0]), _pixels(runner.generate(_request(21, steps=6))))
    assert np.array_equal(_pixels(outcomes[2]), _pixels(runner.generate(_request(23, steps=6))))


def test_out_of_memory_splits_batch(runner: DiffusersRunner) -> None:
    batch_sizes: list[int] = []
    progress: list[list[int]] = [[] for _ in range(4)]

    def fail_above_two(batch_size: int, step: int) -> None:
        batch_sizes.append(batch_size)
        # Fail after one step so a retried half must not report step 1 twice.
        if batch_size > 2 and step == 1:
            raise MemoryError("injected: batch too large for the device")

    def record(row: int) -> Any:
        return lambda step, _total: progress[row].append(step)

    runner.before_step = fail_above_two
    try:
        outcomes = runner.generate_batch(
            [BatchItem(_request(30 + row), record(row)) for row in range(4)])
    finally:
        runner.before_step = None

    assert batch_sizes[:2] == [4, 4]
    assert set(batch_sizes[2:]) == {2}
    for row, outcome in enumerate(outcomes):
        assert np.array_equal(_pixels(outcome), _pixels(runner.generate(_request(30 + row))))
        assert progress[row] == [1, 2, 3, 4]


def test_out_of_memory_single_fails_retriably(runner: DiffusersRunner) -> None:
    def always_fail(_batch_size: int, _step: int) -> None:
        raise MemoryError("injected")

    runner.before_step = always_fail
    try:
        outcomes = runner.generate_batch([BatchItem(_request(1)), BatchItem(_request(2))])
    finally:
        runner.before_step = None

    for outcome in outcomes:
        assert isinstance(outcome, MemoryError)
        assert runner.is_retriable(outcome)


def test_batch_size_capped_by_memory() -> None:
    runner = DiffusersRunner(device="cpu", memory_budget_mb=16)
    # 32x32 samples are estimated at 4 MiB each, so 16 MiB hold four.
    assert runner.max_batch_size(_request(1), 8) == 4
    assert runner.max_batch_size(_request(1), 2) == 2
    assert runner.max_batch_size(_request(1, width=256, height=256), 8) == 1


def test_batch_key_groups_shared_parameters() -> None:
    base = GenerationParams(model="M1", prompt="kitchen", steps=10)

    assert batch_key(base) == batch_key(base.model_copy(update={"prompt": "hall"}))
    for change in ({"model": "M2"}, {"loras": ("L1",)}, {"width": 64}, {"steps": 12},
                   {"scheduler": "euler"}, {"guidance_scale": 3.0}):
        assert batch_key(base) != batch_key(base.model_copy(update=change)), change


async def test_batcher_groups_by_key_and_size() -> None:
    calls: list[list[str]] = []

    async def run_batch(items: list[str], _done: Any) -> list[str]:
        calls.append(items)
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(run_batch, max_batch_size=2, max_wait_s=0.05)

    results = await asyncio.gather(
        batcher.submit("k1", "a"), batcher.submit("k2", "b"), batcher.submit("k1", "c"),
        batcher.submit("k1", "d"),
    )

    assert results == ["A", "B", "C", "D"]
    assert sorted(calls) == [["a", "c"], ["b"], ["d"]]


async def test_batcher_limit_for_caps_group() -> None:
    calls: list[list[int]] = []

    async def run_batch(items: list[int], _done: Any) -> list[int]:
        calls.append(items)
        return items

    batcher: Batcher[int, int] = Batcher(run_batch, max_batch_size=8, max_wait_s=0.05,
                                         limit_for=lambda _item, _requested: 3)

    await asyncio.gather(*(batcher.submit("k", value) for value in range(5)))

    assert calls == [[0, 1, 2], [3, 4]]


async def test_batcher_releases_item_reported_early() -> None:
    release = asyncio.Event()

    async def run_batch(items: list[str], done: Any) -> list[str]:
        done(1, "early")
        await release.wait()
        return ["first", "ignored"]

    batcher: Batcher[str, str] = Batcher(run_batch, max_batch_size=2, max_wait_s=1.0)
    first = asyncio.create_task(batcher.submit("k", "a"))
    second = asyncio.create_task(batcher.submit("k", "b"))

    assert await asyncio.wait_for(second, timeout=5) == "early"
    assert not first.done()
    release.set()
    assert await first == "first"


def test_batcher_drops_outcome_after_loop_closed() -> None:
    started = threading.Event()
    release = threading.Event()
    reported = threading.Event()
    errors: list[BaseException] = []

    def generate(done: Any) -> None:
        # Stands in for the pipeline thread, which outlives a cancelled service's loop.
        started.set()
        release.wait(10)
        try:
            done(0, "late")
        except BaseException as err:  # noqa: BLE001 - the test reports any error
            errors.append(err)
        reported.set()

    async def run_batch(items: list[str], done: Any) -> list[str]:
        threading.Thread(target=generate, args=(done,), daemon=True).start()
        await asyncio.Event().wait()
        return ["unused"]

    async def main() -> None:
        batcher: Batcher[str, str] = Batcher(run_batch, max_batch_size=1, max_wait_s=0)
        asyncio.get_running_loop().create_task(batcher.submit("k", "a"))
        await asyncio.to_thread(started.wait, 5)

    # asyncio.run cancels the batch still running and closes the loop, as a second signal does.
    asyncio.run(main())
    release.set()

    assert reported.wait(5)
    assert errors == []
