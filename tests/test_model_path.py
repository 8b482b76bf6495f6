"""Loading a diffusers pipeline from a local directory through the worker's settings."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_inference import worker
from gpu_inference.pipeline import DiffusersRunner, GenerationRequest, build_random_pipeline
from gpu_inference.worker import GpuWorker
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStatus,
    GenerationParams,
    Tier,
    decode_event,
    encode_event,
    utc_now,
)
from streams.config import Settings
from tests.kafka_helpers import ClaimGranter, TopicReader, produce

MODEL = "M0012"
SEED = 11


@pytest.fixture
def saved_model(tmp_path: Path) -> Path:
    """The random-weight pipeline of MODEL, written with ``save_pretrained``."""
    directory = tmp_path / "saved-model"
    build_random_pipeline(MODEL, 32, 32).save_pretrained(directory)
    return directory


def _expected_pixels(cpu_dtype: torch.dtype, steps: int) -> np.ndarray:
    """The image that the random-weight pipeline of MODEL gives for SEED."""
    runner = DiffusersRunner(device="cpu", cpu_dtype=cpu_dtype)
    request = GenerationRequest(model=MODEL, prompt="", steps=steps, width=32, height=32,
                                seed=SEED)
    return np.asarray(runner.generate(request).image)


def test_model_path_setting_loads_saved_pipeline(
    saved_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLOTFORGE_WORKER__MODEL_PATH", str(saved_model))
    monkeypatch.setenv("SLOTFORGE_WORKER__DEVICE", "cpu")
    # float64 makes the image independent of thread counts, so it must match exactly.
    monkeypatch.setenv("SLOTFORGE_WORKER__CPU_DTYPE", "float64")
    settings = Settings()
    runner = worker.build_runner(settings)
    # Another model id still gets the configured pipeline.
    request = GenerationRequest(model="some-other-id", prompt="", steps=3, width=32, height=32,
                                seed=SEED)

    image = np.asarray(runner.generate(request).image)

    assert runner.model_path == str(saved_model)
    assert runner.warm_models() == [str(saved_model)]
    expected = _expected_pixels(getattr(torch, settings.worker.cpu_dtype), steps=3)
    assert np.array_equal(image, expected)


@pytest.mark.integration
async def test_worker_runs_saved_pipeline(settings: Settings, saved_model: Path) -> None:
    configured = settings.model_copy(update={"worker": settings.worker.model_copy(
        update={"model_path": str(saved_model), "device": "cpu", "cpu_dtype": "float64",
                "worker_id": "gpu-path"})})
    attempt = AttemptDispatched(
        attempt_id=uuid.uuid4().hex, job_id=uuid.uuid4().hex, job_key="acme:path",
        tenant_id="acme", slot=0, attempt_no=1, seed=SEED, tier=Tier.STANDARD,
        params=GenerationParams(model="any-model", prompt="a floor plan", steps=3),
        deadline_at=utc_now() + timedelta(seconds=300),
    )
    service = GpuWorker(configured)
    stop = asyncio.Event()

    async with ClaimGranter(settings.kafka), \
            TopicReader(settings.kafka, settings.topics.generated) as generated:
        task = asyncio.create_task(service.run(stop))
        try:
            await produce(settings.kafka, settings.topics.attempts(attempt.tier),
                          encode_event(attempt), key=attempt.attempt_id.encode())
            records = await generated.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=90)

    finished = decode_event(records[0].value, AttemptFinished)
    assert finished.status == AttemptStatus.SUCCEEDED
    path = (configured.artifact_dir.resolve() / attempt.job_id
            / f"{attempt.attempt_id}.e{attempt.epoch}.png")
    assert finished.artifact_uri == path.as_uri()
    with Image.open(path) as image:
        stored = np.asarray(image.convert("RGB"))
    expected = _expected_pixels(getattr(torch, configured.worker.cpu_dtype), steps=3)
    assert np.array_equal(stored, expected)
