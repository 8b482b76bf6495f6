"""Critical completion consumer: writes each job's result manifest exactly once.

The manifest file is the acknowledgement. It is written to a temporary name and renamed,
so a crash leaves either no manifest (the record is redelivered) or a whole one; a
redelivered completion whose manifest already exists is skipped, which applies each job
at most once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from pathlib import Path

from aiokafka import AIOKafkaProducer, ConsumerRecord
from opentelemetry.trace import Span

from consumers.acks import send_ack
from consumers.record_loop import run_record_loop
from schemas.errors import PermanentError
from schemas.events import JobCompleted
from streams.config import Settings, load_settings
from streams.service import serve

logger = logging.getLogger(__name__)

SERVICE_NAME = "delivery"


# Job ids become file names, so one that could leave the delivery folder is rejected.
_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def manifest_path(delivery_dir: Path, job_id: str) -> Path:
    """Return the manifest file of a job.

    Raises:
        PermanentError: the job id is not usable as a file name.
    """
    if not _JOB_ID.fullmatch(job_id):
        raise PermanentError(
            f"invalid job id {job_id[:100]!r} for a manifest file name; expected letters, "
            "digits, '.', '_' and '-', not starting with '.'")
    return delivery_dir / f"{job_id}.json"


class JobIdConflictError(PermanentError):
    """A manifest with the job id exists, but another tenant's or request's job wrote it."""


def _check_same_job(path: Path, completed: JobCompleted) -> None:
    """Raise JobIdConflictError unless the manifest at ``path`` belongs to ``completed``'s job.

    Clients choose job ids, so two tenants, or two different requests, may use one id.
    Manifests written before the cache key was stored are compared by tenant only.
    """
    manifest = json.loads(path.read_text())
    owner = (manifest.get("tenant_id"), manifest.get("job_key", completed.job_key))
    if owner != (completed.tenant_id, completed.job_key):
        raise JobIdConflictError(
            f"job id {completed.job_id} is already delivered for tenant {owner[0]}, key "
            f"{owner[1]}; the completion of tenant {completed.tenant_id}, key "
            f"{completed.job_key} is not delivered. Give each job a unique id",
            job_id=completed.job_id,
        )


def write_manifest(delivery_dir: Path, completed: JobCompleted) -> bool:
    """Write the job's manifest; returns False when it was already delivered.

    Raises:
        PermanentError: the job id is not usable as a file name, or its manifest belongs
            to another job (JobIdConflictError).
    """
    path = manifest_path(delivery_dir, completed.job_id)
    if path.exists():
        _check_same_job(path, completed)
        return False
    delivery_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "job_id": completed.job_id,
        "job_key": completed.job_key,
        "tenant_id": completed.tenant_id,
        "user_id": completed.user_id,
        "status": completed.status.value,
        "requested_slots": completed.requested_slots,
        "slots": [slot.model_dump(mode="json") for slot in completed.slots],
        "attempts": completed.attempts,
        "requested_at": completed.requested_at.isoformat(),
        "completed_at": completed.completed_at.isoformat(),
        "reason": completed.reason,
    }
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return True


async def run(settings: Settings, stop: asyncio.Event) -> None:
    delivery_dir = settings.delivery_dir

    async def handle(completed: JobCompleted, record: ConsumerRecord[bytes, bytes],
                     span: Span, producer: AIOKafkaProducer) -> None:
        try:
            written = await asyncio.to_thread(write_manifest, delivery_dir, completed)
        except PermanentError as err:
            # The coordinator waits for an acknowledgement from every critical consumer, so a
            # job that cannot be delivered is acknowledged as failed instead of never.
            span.set_attribute("error.type", type(err).__name__)
            logger.error("Failed to deliver job %s of tenant %s: %s", completed.job_id,
                         completed.tenant_id, err)
            await send_ack(producer, settings, completed, SERVICE_NAME, delivered=False,
                           reason=str(err))
            return
        span.set_attribute("slotforge.delivery.duplicate", not written)
        if written:
            logger.info("Delivered job %s (%s)", completed.job_id, completed.status.value)
        else:
            logger.info("Skipped job %s: already delivered", completed.job_id)
        # A repeated acknowledgement is harmless, so a redelivered record acknowledges again.
        await send_ack(producer, settings, completed, SERVICE_NAME, delivered=True)

    await run_record_loop(
        settings, stop,
        service_name=SERVICE_NAME, stage="delivery",
        topic=settings.topics.jobs_completed, group_id=settings.consumers.critical_group_id,
        expected=(JobCompleted,), handle=handle,
    )


def main() -> int:
    return serve(SERVICE_NAME, run, load_settings())


if __name__ == "__main__":
    raise SystemExit(main())
