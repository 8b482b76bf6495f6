"""Turn the Alibaba Stable Diffusion serving trace into job requests and replay them.

The trace (``lora_request_trace.csv``) gives arrival time, user group, base model, steps and
images per request, but no prompt text. Each request gets a stable prompt derived from
(user, prompt length, negative prompt length, model, steps), so a row that repeats an
earlier row's key is replayed as the same user regenerating the same prompt.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from schemas.events import MAX_PROMPT_CHARS, MAX_SLOTS, GenerationParams, JobRequested, Tier

logger = logging.getLogger(__name__)

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / (
    "alibaba_genai2026_lora_request_trace.csv"
)

# Words of the floor-plan and interior-rendering domain the derived prompts are built from.
_VOCABULARY = (
    "floor plan two bedroom apartment open kitchen living room scandinavian interior "
    "rendering oak parquet large windows balcony minimalist loft studio bathroom walk-in "
    "closet dining area warm lighting concrete walls industrial plan view isometric "
    "architectural drawing furniture layout sofa bookshelf marble countertop terrace "
    "garden courtyard hallway staircase skylight mezzanine attic basement office nook "
    "photorealistic soft shadows evening sunlight pastel colours blueprint section"
).split()


@dataclass(frozen=True)
class TraceRequest:
    """One row of the trace, with its arrival as seconds from the first replayed row."""

    arrival_s: float
    user: str
    model: str
    steps: int
    slots: int
    prompt_length: int
    negative_prompt_length: int
    predict_type: str
    exec_time_s: float

    @property
    def prompt_key(self) -> tuple[str, int, int, str, int]:
        return (self.user, self.prompt_length, self.negative_prompt_length, self.model,
                self.steps)


def _number(text: str, default: float = 0.0) -> float:
    try:
        return float(text) if text.strip() else default
    except ValueError:
        return default


def load_trace(path: Path = DEFAULT_TRACE) -> list[TraceRequest]:
    """Read every row of the trace, in arrival order, with arrivals relative to the first."""
    rows: list[tuple[datetime, TraceRequest]] = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            arrival = datetime.strptime(row["gmt_create"], "%Y-%m-%d %H:%M:%S")
            rows.append((arrival, TraceRequest(
                arrival_s=0.0,
                user=row["groupId"],
                model=row["checkpoint_model_version_id"],
                steps=max(1, int(_number(row["num_inference_steps"], 30))),
                slots=min(MAX_SLOTS, max(1, int(_number(row["num_images_per_prompt"], 1)))),
                prompt_length=int(_number(row["prompt_length"])),
                negative_prompt_length=int(_number(row["negative_prompt_length"])),
                predict_type=row["predict_type"],
                exec_time_s=_number(row["exec_time_seconds"]),
            )))
    if not rows:
        raise ValueError(f"trace {path} has no rows")
    rows.sort(key=lambda item: item[0])
    start = rows[0][0]
    return [
        TraceRequest(**{**request.__dict__, "arrival_s": (arrival - start).total_seconds()})
        for arrival, request in rows
    ]


def densest_window(requests: Sequence[TraceRequest], count: int) -> list[TraceRequest]:
    """Return the ``count`` consecutive requests that span the least time, rebased to zero."""
    if count >= len(requests):
        window = list(requests)
    else:
        spans = [
            requests[index + count - 1].arrival_s - requests[index].arrival_s
            for index in range(len(requests) - count + 1)
        ]
        start = spans.index(min(spans))
        window = list(requests[start:start + count])
    origin = window[0].arrival_s
    return [TraceRequest(**{**request.__dict__, "arrival_s": request.arrival_s - origin})
            for request in window]


def compress(requests: Sequence[TraceRequest], duration_s: float) -> list[TraceRequest]:
    """Scale arrival times so the whole sequence arrives within ``duration_s``."""
    span = requests[-1].arrival_s if requests else 0.0
    factor = duration_s / span if span > 0 else 0.0
    return [TraceRequest(**{**request.__dict__, "arrival_s": request.arrival_s * factor})
            for request in requests]


def derive_prompt(key: tuple[str, int, int, str, int], length: int) -> str:
    """Build a deterministic prompt of about ``length`` characters for a trace key."""
    target = max(1, min(length, MAX_PROMPT_CHARS))
    rng = random.Random(hashlib.sha256(repr(key).encode()).digest())
    words: list[str] = []
    while sum(len(word) + 1 for word in words) < target:
        words.append(rng.choice(_VOCABULARY))
    return " ".join(words)[:target]


def to_job_request(
    request: TraceRequest,
    *,
    tenant_id: str,
    tier: Tier = Tier.STANDARD,
    deadline_s: float = 600.0,
    size_px: int = 32,
) -> JobRequested:
    """Map one trace row to a job request, with the derived prompts."""
    key = request.prompt_key
    negative = derive_prompt((*key[:3], "negative", key[4]), request.negative_prompt_length) \
        if request.negative_prompt_length > 0 else ""
    return JobRequested(
        tenant_id=tenant_id,
        user_id=request.user,
        params=GenerationParams(
            model=request.model,
            prompt=derive_prompt(key, request.prompt_length),
            negative_prompt=negative,
            steps=request.steps,
            width=size_px,
            height=size_px,
        ),
        slots=request.slots,
        tier=tier,
        deadline_s=deadline_s,
    )


async def replay(
    requests: Sequence[tuple[float, JobRequested]],
    submit: Callable[[JobRequested], Awaitable[object]],
) -> None:
    """Submit each request at its arrival offset (seconds from now)."""
    started = time.monotonic()
    for arrival_s, request in requests:
        delay = arrival_s - (time.monotonic() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        await submit(request)
    logger.info("Replayed %d requests in %.1f s", len(requests), time.monotonic() - started)
