"""Unit tests of the diffusers runner on the CPU with small random-weight models."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_inference.pipeline import (
    RANDOM_MAX_SIDE_PX,
    DiffusersRunner,
    GenerationCancelled,
    GenerationRequest,
    _run_loaded_pipeline,
    _with_own_scheduler,
    build_random_pipeline,
    is_retriable,
    model_seed,
)
from schemas.errors import PermanentError, TransientError
from schemas.events import GenerationParams


def _request(seed: int = 1, steps: int = 4, **changes: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "model": "M0012",
        "prompt": "a floor plan",
        "steps": steps,
        "width": 32,
        "height": 32,
        "seed": seed,
    }
    values.update(changes)
    return GenerationRequest(**values)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def runner() -> DiffusersRunner:
    return DiffusersRunner(device="cpu")


def test_same_seed_gives_same_image(runner: DiffusersRunner) -> None:
    first = runner.generate(_request(seed=7))
    second = runner.generate(_request(seed=7))

    assert first.image.size == (32, 32)
    assert first.image.mode == "RGB"
    assert np.array_equal(_pixels(first.image), _pixels(second.image))
    assert first.gpu_s > 0
    assert first.device == "cpu"


def test_different_seeds_give_different_images(runner: DiffusersRunner) -> None:
    first = _pixels(runner.generate(_request(seed=1)).image).astype(int)
    second = _pixels(runner.generate(_request(seed=2)).image).astype(int)

    assert np.abs(first - second).mean() > 10


def test_model_id_fixes_weights_across_runners() -> None:
    # Two workers build the same random model for one id and different ones for two ids.
    first = DiffusersRunner(device="cpu").generate(_request(seed=3))
    second = DiffusersRunner(device="cpu").generate(_request(seed=3))
    other_model = DiffusersRunner(device="cpu").generate(_request(seed=3, model="M0013"))

    assert np.array_equal(_pixels(first.image), _pixels(second.image))
    assert not np.array_equal(_pixels(first.image), _pixels(other_model.image))


def test_random_model_size_and_seed() -> None:
    pipe = build_random_pipeline("M0012", width=48, height=16)
    parameters = sum(parameter.numel() for parameter in pipe.unet.parameters())

    assert 500_000 < parameters < 900_000
    assert tuple(pipe.unet.config.sample_size) == (16, 48)
    assert model_seed("M0012") == model_seed("M0012")
    assert model_seed("M0012") != model_seed("M0013")
    assert 0 <= model_seed("M0012") < 2**63


def test_non_square_size(runner: DiffusersRunner) -> None:
    result = runner.generate(_request(width=48, height=16, steps=2))

    assert result.image.size == (48, 16)


def test_oversize_random_request_rejected(runner: DiffusersRunner) -> None:
    side = RANDOM_MAX_SIDE_PX + 8
    with pytest.raises(PermanentError, match="SLOTFORGE_WORKER__MODEL_PATH") as caught:
        runner.generate(_request(width=side, height=side))

    assert caught.value.retriable is False


def test_progress_callback_count(runner: DiffusersRunner) -> None:
    calls: list[tuple[int, int]] = []

    runner.generate(_request(steps=6), on_step=lambda step, total: calls.append((step, total)))

    assert calls == [(step, 6) for step in range(1, 7)]


def test_cancellation_stops_within_one_step(runner: DiffusersRunner) -> None:
    cancel = threading.Event()
    steps_seen: list[int] = []
    unet_calls = 0

    def count_unet_call(*_args: Any) -> None:
        nonlocal unet_calls
        unet_calls += 1

    def cancel_at_step_two(step: int, _total: int) -> None:
        steps_seen.append(step)
        if step == 2:
            cancel.set()

    pipe = runner._random_pipeline("M0012", 32, 32)
    hook = pipe.unet.register_forward_hook(count_unet_call)
    try:
        with pytest.raises(GenerationCancelled, match="after 2 of 10 steps"):
            runner.generate(_request(steps=10), on_step=cancel_at_step_two, cancel=cancel)
    finally:
        hook.remove()

    assert steps_seen == [1, 2]
    assert unet_calls == 2


def test_cancel_before_start_runs_no_step(runner: DiffusersRunner) -> None:
    cancel = threading.Event()
    cancel.set()
    calls: list[int] = []

    with pytest.raises(GenerationCancelled, match="after 0 of"):
        runner.generate(_request(), on_step=lambda step, _total: calls.append(step), cancel=cancel)

    assert calls == []


def test_model_path_loads_saved_pipeline(tmp_path: Path, runner: DiffusersRunner) -> None:
    # A saved DDIM pipeline goes through DiffusionPipeline.from_pretrained and the same loop.
    build_random_pipeline("M0012", 32, 32).save_pretrained(tmp_path / "model")
    loaded = DiffusersRunner(model_path=str(tmp_path / "model"), device="cpu")
    calls: list[int] = []

    result = loaded.generate(_request(seed=5), on_step=lambda step, _total: calls.append(step))
    expected = runner.generate(_request(seed=5))

    assert np.array_equal(_pixels(result.image), _pixels(expected.image))
    assert calls == [1, 2, 3, 4]


class _StepPipeline:
    """Stands in for a text-to-image pipeline with ``callback_on_step_end``."""

    def __init__(self) -> None:
        self.arguments: dict[str, Any] = {}

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        num_inference_steps: int = 50,
        height: int = 512,
        width: int = 512,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        callback_on_step_end: Any = None,
    ) -> Any:
        self.arguments = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "num_inference_steps": num_inference_steps,
            "height": height,
            "width": width,
            "output_type": output_type,
        }
        for index in range(num_inference_steps):
            callback_on_step_end(self, index, 1000 - index, {})
        image = Image.new("RGB", (width, height), (10, 20, 30))
        return type("Output", (), {"images": [image]})()


def test_loaded_pipeline_gets_accepted_arguments() -> None:
    pipe = _StepPipeline()
    calls: list[tuple[int, int]] = []

    image = _run_loaded_pipeline(
        pipe,
        _request(steps=3, width=40, height=24, negative_prompt="blurry"),
        lambda step, total: calls.append((step, total)),
        None,
    )

    assert image.size == (40, 24)
    assert pipe.arguments == {
        "prompt": "a floor plan",
        "negative_prompt": "blurry",
        "num_inference_steps": 3,
        "height": 24,
        "width": 40,
        "output_type": "pil",
    }
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_loaded_pipeline_cancels_in_step_callback() -> None:
    cancel = threading.Event()
    calls: list[int] = []

    def cancel_at_first_step(step: int, _total: int) -> None:
        calls.append(step)
        cancel.set()

    with pytest.raises(GenerationCancelled, match="after 1 of 5 steps"):
        _run_loaded_pipeline(_StepPipeline(), _request(steps=5), cancel_at_first_step, cancel)

    assert calls == [1]


def test_own_scheduler_shares_models() -> None:
    pipe = build_random_pipeline("M0012", 32, 32)

    view = _with_own_scheduler(pipe)

    assert view.unet is pipe.unet
    assert view.scheduler is not pipe.scheduler
    assert view.unet.dtype == torch.float32


def test_request_from_params() -> None:
    params = GenerationParams(
        model="M0001", prompt="kitchen", negative_prompt="text", steps=12, width=64, height=48,
        guidance_scale=4.0,
    )

    request = GenerationRequest.from_params(params, seed=99)

    assert request == GenerationRequest(
        model="M0001", prompt="kitchen", negative_prompt="text", steps=12, width=64,
        height=48, guidance_scale=4.0, seed=99,
    )


@pytest.mark.parametrize(
    ("error", "retriable"),
    [
        (TransientError("broker down"), True),
        (PermanentError("bad size"), False),
        (GenerationCancelled("stopped"), False),
        (torch.cuda.OutOfMemoryError("CUDA out of memory"), True),
        (ValueError("height must be divisible by 8"), False),
        (RuntimeError("device lost"), True),
    ],
)
def test_retriable_classification(error: BaseException, retriable: bool) -> None:
    assert is_retriable(error) is retriable

