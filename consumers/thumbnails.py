"""Best-effort completion consumer: writes a small thumbnail beside each delivered image.

It may lag or fail without slowing any job: a missing or unreadable artifact is logged
and skipped, never retried.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiokafka import AIOKafkaProducer, ConsumerRecord
from opentelemetry.trace import Span
from PIL import Image, UnidentifiedImageError

from consumers.record_loop import run_record_loop
from gpu_inference.artifacts import ArtifactError, ArtifactStore
from schemas.events import JobCompleted, utc_now
from streams.config import Settings, load_settings
from streams.service import serve

logger = logging.getLogger(__name__)

SERVICE_NAME = "thumbnails"


def thumbnail_path(artifact: Path) -> Path:
    return artifact.with_name(f"{artifact.stem}.thumb.png")


def write_thumbnail(store: ArtifactStore, artifact_uri: str, size_px: int) -> Path | None:
    """Write a thumbnail beside an artifact of the store; returns None when it cannot be read.

    Only artifacts inside the store are read, so a completion naming any other file leaves
    it alone.
    """
    try:
        source = store.path_of(artifact_uri)
    except ArtifactError as err:
        logger.warning("Skipping thumbnail for %s: %s", artifact_uri[:300], err)
        return None
    try:
        with Image.open(source) as image:
            image.thumbnail((size_px, size_px))
            target = thumbnail_path(source)
            image.save(target, format="PNG")
            return target
    except (OSError, UnidentifiedImageError) as err:
        logger.warning("Skipping thumbnail for %s: %s", artifact_uri[:300], err)
        return None


async def run(settings: Settings, stop: asyncio.Event) -> None:
    size_px = settings.consumers.thumbnail_px
    store = ArtifactStore(settings.artifact_dir)
    budget_s = settings.consumers.best_effort_budget_s
    dropped = 0

    async def handle(completed: JobCompleted, record: ConsumerRecord[bytes, bytes],
                     span: Span, producer: AIOKafkaProducer) -> None:
        nonlocal dropped
        age_s = (utc_now() - completed.completed_at).total_seconds()
        if age_s > budget_s:
            # Best effort: work older than the budget is not worth doing any more.
            dropped += 1
            span.set_attribute("slotforge.thumbnails.dropped", True)
            logger.warning("Dropped thumbnails of job %s: %.0f s old, budget %.0f s "
                           "(%d dropped so far)", completed.job_id, age_s, budget_s, dropped)
            return
        written = 0
        for slot in completed.slots:
            if await asyncio.to_thread(write_thumbnail, store, slot.artifact_uri, size_px):
                written += 1
        span.set_attribute("slotforge.thumbnails.written", written)
        logger.debug("Wrote %d thumbnails for job %s", written, completed.job_id)

    await run_record_loop(
        settings, stop,
        service_name=SERVICE_NAME, stage="thumbnail",
        topic=settings.topics.jobs_completed, group_id=settings.consumers.best_effort_group_id,
        expected=(JobCompleted,), handle=handle,
    )


def main() -> int:
    return serve(SERVICE_NAME, run, load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
