"""The local artifact store, and post-processing on the real broker."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpu_inference import postprocess
from gpu_inference.artifacts import ArtifactError, ArtifactNotFoundError, ArtifactStore
from gpu_inference.scoring import score_png
from schemas.events import (
    AttemptFinished,
    AttemptStatus,
    DeadLetter,
    ResultScored,
    decode_event,
    encode_event,
)
from streams.config import Settings
from streams.kafka import group_lag, header_value
from tests.kafka_helpers import TopicReader, produce

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---- artifact store ----------------------------------------------------------------------


def test_store_writes_reads_png(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")

    uri = store.write_png("job1", "attempt1", _image(), epoch=1)

    path = (tmp_path / "artifacts" / "job1" / "attempt1.e1.png").resolve()
    assert uri == path.as_uri()
    assert uri.startswith("file:///")
    data = store.read(uri)
    assert data.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(data)) as image:
        assert np.array_equal(np.asarray(image), np.asarray(_image()))
    assert [entry.name for entry in path.parent.iterdir()] == ["attempt1.e1.png"]


def test_store_delete_and_delete_job(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    first = store.write_png("job1", "a1", _image(1), epoch=1)
    store.write_png("job1", "a2", _image(2), epoch=1)
    other = store.write_png("job2", "a3", _image(3), epoch=1)

    assert store.delete(first) is True
    assert store.delete(first) is False
    with pytest.raises(ArtifactNotFoundError, match="not found"):
        store.read(first)

    assert store.delete_job("job1") == 1
    assert not (tmp_path / "job1").exists()
    assert store.delete_job("job1") == 0
    assert store.read(other)


@pytest.mark.parametrize("bad_id", ["..", "../x", "a/b", "", ".hidden", "a\\b", "x" * 200])
def test_store_rejects_unsafe_ids(tmp_path: Path, bad_id: str) -> None:
    store = ArtifactStore(tmp_path)

    with pytest.raises(ArtifactError, match="invalid"):
        store.write_png(bad_id, "attempt", _image(), epoch=1)
    with pytest.raises(ArtifactError, match="invalid"):
        store.write_png("job", bad_id, _image(), epoch=1)


@pytest.mark.parametrize(
    "uri",
    ["http://example.invalid/a.png", "file://otherhost/tmp/a.png", "file:///etc/passwd",
     "/tmp/a.png"],
)
def test_store_rejects_foreign_uris(tmp_path: Path, uri: str) -> None:
    store = ArtifactStore(tmp_path / "artifacts")

    with pytest.raises(ArtifactError):
        store.read(uri)


def test_store_rejects_uri_escaping_root(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    escaping = (tmp_path / "artifacts").as_uri() + "/../secret.png"

    with pytest.raises(ArtifactError, match="outside the artifact store"):
        store.read(escaping)


# ---- post-processing service --------------------------------------------------------------


def _generated(settings: Settings, uri: str | None = None, **changes: Any) -> AttemptFinished:
    attempt_id = uuid.uuid4().hex
    job_id = uuid.uuid4().hex
    if uri is None:
        uri = ArtifactStore(settings.artifact_dir).write_png(job_id, attempt_id, _image(), epoch=1)
    values: dict[str, Any] = {
        "attempt_id": attempt_id,
        "job_id": job_id,
        "job_key": f"acme:{job_id}",
        "worker_id": "test-worker",
        "status": AttemptStatus.SUCCEEDED,
        "slot": 1,
        "artifact_uri": uri,
        "gpu_s": 0.1,
    }
    values.update(changes)
    return AttemptFinished(**values)


async def _send(settings: Settings, event: AttemptFinished | bytes, key: bytes) -> None:
    value = event if isinstance(event, bytes) else encode_event(event)
    await produce(
        settings.kafka,
        settings.topics.generated,
        value,
        key=key,
        headers=[("traceparent", TRACEPARENT.encode())],
    )


def _scored(reader: TopicReader) -> list[ResultScored]:
    return [decode_event(record.value, ResultScored) for record in reader.records]


@asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(postprocess.run(settings, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


@pytest.mark.integration
async def test_postprocess_scores_generated_images(settings: Settings) -> None:
    accepted = _generated(settings)
    uri = accepted.artifact_uri
    assert uri is not None
    expected = score_png(ArtifactStore(settings.artifact_dir).read(uri))
    # The same image under a threshold just above its score is rejected.
    strict = settings.model_copy(
        update={"postprocess": settings.postprocess.model_copy(
            update={"accept_threshold": min(1.0, expected.score + 0.01)})}
    )
    lenient = settings.model_copy(
        update={"postprocess": settings.postprocess.model_copy(
            update={"accept_threshold": max(0.0, expected.score - 0.01)})}
    )

    async with TopicReader(settings.kafka, settings.topics.coordinator_events) as events:
        async with _running(lenient):
            await _send(settings, accepted, key=accepted.attempt_id.encode())
            await events.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
        first = _scored(events)[0]

        rejected = accepted.model_copy(update={"attempt_id": uuid.uuid4().hex})
        async with _running(strict):
            await _send(settings, rejected, key=rejected.attempt_id.encode())
            await events.wait_for(lambda seen: len(seen) >= 2, timeout_s=120)
        second = _scored(events)[1]

    assert first.attempt_id == accepted.attempt_id
    assert first.job_id == accepted.job_id
    assert first.slot == 1
    assert first.artifact_uri == uri
    assert first.score == pytest.approx(expected.score)
    assert first.accepted is True
    assert first.reason.startswith("accepted")
    assert events.records[0].key == accepted.job_key.encode()
    traceparent = header_value(events.records[0].headers, "traceparent")
    assert traceparent is not None
    assert traceparent.split("-")[1] == TRACE_ID

    assert second.attempt_id == rejected.attempt_id
    assert second.accepted is False
    assert second.reason.startswith("rejected")
    lag = await group_lag(settings.kafka, settings.postprocess.group_id, settings.topics.generated)
    assert lag == 0


@pytest.mark.integration
async def test_missing_artifact_rejected_with_reason(settings: Settings) -> None:
    missing_uri = (settings.artifact_dir.resolve() / "nojob" / "noattempt.png").as_uri()
    missing = _generated(settings, uri=missing_uri)
    not_png = _generated(settings)
    assert not_png.artifact_uri is not None
    ArtifactStore(settings.artifact_dir).path_of(not_png.artifact_uri).write_bytes(b"broken")

    async with (
        TopicReader(settings.kafka, settings.topics.coordinator_events) as events,
        _running(settings),
    ):
        for event in (missing, not_png):
            await _send(settings, event, key=event.attempt_id.encode())
        await events.wait_for(lambda seen: len(seen) >= 2, timeout_s=120)

    results = {result.attempt_id: result for result in _scored(events)}
    assert results[missing.attempt_id].accepted is False
    assert results[missing.attempt_id].score == 0.0
    assert "artifact not found" in results[missing.attempt_id].reason
    assert results[not_png.attempt_id].accepted is False
    assert "not a decodable image" in results[not_png.attempt_id].reason


@pytest.mark.integration
async def test_invalid_records_go_to_deadletter(settings: Settings) -> None:
    failed = _generated(settings, status=AttemptStatus.FAILED, artifact_uri=None)
    valid = _generated(settings)
    key = b"same-partition"

    async with (
        TopicReader(settings.kafka, settings.topics.coordinator_events) as events,
        TopicReader(settings.kafka, settings.topics.deadletter) as letters,
        _running(settings),
    ):
        await _send(settings, b"{not json", key=key)
        await _send(settings, failed, key=key)
        await _send(settings, valid, key=key)
        await letters.wait_for(lambda seen: len(seen) >= 2, timeout_s=120)
        await events.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)

    first, second = (decode_event(record.value, DeadLetter) for record in letters.records)
    assert first.error_type == "json"
    assert first.consumer_group == settings.postprocess.group_id
    assert second.error_type == "validation"
    assert "status failed" in second.reason

    (result,) = _scored(events)
    assert result.attempt_id == valid.attempt_id
    lag = await group_lag(settings.kafka, settings.postprocess.group_id, settings.topics.generated)
    assert lag == 0
