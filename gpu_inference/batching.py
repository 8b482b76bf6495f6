"""Dynamic batching: attempts that can share one pipeline call wait briefly to be grouped.

Attempts share a call when their model, adapters (LoRAs), image size, scheduler, step count
and guidance scale match, because a diffusers call takes one value of each for the whole
batch. Prompts and seeds may differ. A group runs when it reaches its size limit or when its
oldest attempt has waited ``max_wait_s``. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from schemas.events import GenerationParams

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

BatchKey = tuple[str, tuple[str, ...], int, int, str, int, float]


def batch_key(params: GenerationParams) -> BatchKey:
    """Return the parameters that attempts must share to run in one pipeline call."""
    return (
        params.model,
        tuple(params.loras),
        params.width,
        params.height,
        params.scheduler,
        params.steps,
        params.guidance_scale,
    )


@dataclass
class _Group(Generic[Item, Outcome]):
    limit: int
    items: list[Item] = field(default_factory=list)
    futures: list[asyncio.Future[Outcome]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


# Reports item ``index`` of a batch as done with an outcome before the batch ends; callable
# from any thread.
DoneCallback = Callable[[int, Outcome], None]


class Batcher(Generic[Item, Outcome]):
    """Collect submitted items by key and run each group with one ``run_batch`` call.

    Args:
        run_batch: runs a batch and returns one outcome per item, in order. It may report an
            item's outcome earlier through the done callback it receives. That releases the
            item's caller at once, and the outcome returned later for that item is ignored.
        max_batch_size: most items in one call.
        max_wait_s: longest time the first item of a group waits for others.
        limit_for: caps the batch size for a group from its first item, for example by
            free memory; None uses ``max_batch_size``.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item], DoneCallback[Outcome]], Awaitable[list[Outcome]]],
        max_batch_size: int,
        max_wait_s: float,
        limit_for: Callable[[Item, int], int] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.limit_for = limit_for
        self._groups: dict[Hashable, _Group[Item, Outcome]] = {}
        self._running: set[asyncio.Task[None]] = set()
        # Sizes of the batches run so far, for logs and benchmarks.
        self.batch_sizes: list[int] = []

    async def submit(self, key: Hashable, item: Item) -> Outcome:
        """Queue ``item`` under ``key`` and wait for its outcome from the batch it joins."""
        loop = asyncio.get_running_loop()
        group = self._groups.get(key)
        if group is None:
            limit = self.max_batch_size
            if self.limit_for is not None:
                limit = max(1, min(limit, self.limit_for(item, limit)))
            group = _Group(limit=limit)
            self._groups[key] = group
            if limit > 1 and self.max_wait_s > 0:
                group.timer = loop.call_later(self.max_wait_s, self._flush, key)
        future: asyncio.Future[Outcome] = loop.create_future()
        group.items.append(item)
        group.futures.append(future)
        if len(group.items) >= group.limit:
            self._flush(key)
        return await future

    def _flush(self, key: Hashable) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        # A caller cancelled while waiting no longer needs its item run.
        pairs = [(item, future) for item, future in zip(group.items, group.futures, strict=True)
                 if not future.done()]
        if not pairs:
            return
        task = asyncio.get_running_loop().create_task(self._run(pairs))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, pairs: list[tuple[Item, asyncio.Future[Outcome]]]) -> None:
        items = [item for item, _ in pairs]
        self.batch_sizes.append(len(items))
        loop = asyncio.get_running_loop()

        def resolve(index: int, outcome: Outcome) -> None:
            future = pairs[index][1]
            if not future.done():
                future.set_result(outcome)

        def done(index: int, outcome: Outcome) -> None:
            try:
                loop.call_soon_threadsafe(resolve, index, outcome)
            except RuntimeError:
                # A second stop signal cancels the service and closes its loop while the
                # pipeline thread may still end a step, and then no caller waits for it.
                if not loop.is_closed():
                    raise
                logger.debug("Dropped the outcome of batch item %d: the event loop is closed",
                             index)

        try:
            outcomes = await self.run_batch(items, done)
        except BaseException as err:  # noqa: BLE001 - every waiter gets the batch's error
            for _, future in pairs:
                if not future.done():
                    future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        for (_, future), outcome in zip(pairs, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
