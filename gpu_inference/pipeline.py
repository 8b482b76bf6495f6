"""Diffusers runner: one generation per call, with step progress and cancellation.

With a configured model path the runner loads that pipeline once (float16 on CUDA). Without
one it builds a small random-weight ``UNet2DModel`` with a DDIM scheduler, seeded from the
model id so that every worker builds the same weights for the same id. This module is the
only one that imports torch and diffusers.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import torch

# diffusers classes come from their defining modules, because the package root's lazy
# imports resolve to dummy classes for type checkers.
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from PIL import Image

from gpu_inference.generation import (
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    StepCallback,
)
from schemas.errors import PermanentError, SlotforgeError

logger = logging.getLogger(__name__)

# The random UNet runs self-attention at half the image side, so its cost grows with the fourth
# power of the side. At 256x256 one step took about 16 s on one CPU core of a 2-core VM.
RANDOM_MAX_SIDE_PX = 256


def resolve_device(device: str) -> torch.device:
    """Map ``auto`` to CUDA when it is available and to the CPU otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def configure_worker_thread(slots: int) -> None:
    """Split the CPU cores between the slots; use as a ThreadPoolExecutor initializer.

    With the OpenMP backend the setting applies to the calling thread, so each slot's thread
    calls this once instead of every slot competing for all cores.
    """
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, slots)))


def is_retriable(error: BaseException) -> bool:
    """Return whether another attempt may succeed where this error ended one."""
    if isinstance(error, SlotforgeError):
        return error.retriable
    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    # Invalid arguments fail the same way on every worker.
    if isinstance(error, ValueError | TypeError):
        return False
    return True


def model_seed(model_id: str) -> int:
    """Derive the weight seed of a random-weight model from its id, the same in every process."""
    digest = hashlib.sha256(model_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def build_random_pipeline(model_id: str, width: int, height: int) -> DDIMPipeline:
    """Build the random-weight DDIM pipeline for a model id and image size.

    The UNet has about 700k parameters. Its weights come from the global torch RNG seeded with
    ``model_seed(model_id)``, so the caller must not build two pipelines at once.
    """
    if max(width, height) > RANDOM_MAX_SIDE_PX:
        raise PermanentError(
            f"the random-weight pipeline generates at most {RANDOM_MAX_SIDE_PX} px per side, "
            f"got {width}x{height}; set SLOTFORGE_WORKER__MODEL_PATH to a real model for "
            "larger images",
            model=model_id,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(model_id))
        unet = UNet2DModel(
            sample_size=(height, width),
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )
    unet.eval()
    return DDIMPipeline(unet=unet, scheduler=DDIMScheduler())


def _raise_if_cancelled(cancel: threading.Event | None, step: int, total: int) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled(f"generation cancelled after {step} of {total} steps")


def _to_pil(sample: torch.Tensor) -> Image.Image:
    """Convert one sample in [-1, 1], shaped (1, channels, height, width), to an RGB image."""
    scaled = (sample / 2 + 0.5).clamp(0, 1)
    array = scaled[0].permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


def _run_ddim(
    pipe: DDIMPipeline,
    request: GenerationRequest,
    device: torch.device,
    on_step: StepCallback | None,
    cancel: threading.Event | None,
) -> Image.Image:
    """Run the DDIM denoising loop of ``DDIMPipeline.__call__`` with a per-step callback.

    NOTE: DDIMPipeline in diffusers 0.39 has no ``callback_on_step_end``, so this loop repeats
    its unet and scheduler calls (eta 0, no clipped model output) to report progress and stop
    on cancellation between steps.
    """
    unet = pipe.unet
    # A scheduler keeps the timesteps of its current run, so concurrent calls need their own.
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(request.steps, device=device)
    total = len(scheduler.timesteps)

    generator = torch.Generator().manual_seed(request.seed)
    shape = (1, unet.config.in_channels, request.height, request.width)
    # Noise is drawn on the CPU so a seed gives the same starting noise on every device.
    sample = torch.randn(shape, generator=generator, dtype=torch.float32)
    sample = sample.to(device=device, dtype=unet.dtype)

    for index, timestep in enumerate(scheduler.timesteps):
        _raise_if_cancelled(cancel, index, total)
        noise_prediction = unet(sample, timestep).sample
        sample = scheduler.step(
            noise_prediction, timestep, sample, eta=0.0, generator=generator
        ).prev_sample
        if on_step is not None:
            on_step(index + 1, total)
    return _to_pil(sample)


def _with_own_scheduler(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Return a view of the pipeline that shares its models but has a scheduler of its own.

    ``torch_dtype=None`` keeps ``from_pipe`` (diffusers 0.39) from casting the shared models to
    float32. NOTE: tokenizers stay shared; concurrent calls on a text-conditioned pipeline are
    not verified here, because no such model is available offline.
    """
    scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
    return type(pipe).from_pipe(pipe, scheduler=scheduler, torch_dtype=None)


def _run_loaded_pipeline(
    pipe: Any,
    request: GenerationRequest,
    on_step: StepCallback | None,
    cancel: threading.Event | None,
) -> Image.Image:
    """Call a loaded pipeline with the request's arguments that its ``__call__`` accepts."""
    accepted = inspect.signature(pipe.__call__).parameters
    candidates: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "height": request.height,
        "width": request.width,
        "guidance_scale": request.guidance_scale,
        "generator": torch.Generator().manual_seed(request.seed),
        "output_type": "pil",
    }
    arguments = {name: value for name, value in candidates.items() if name in accepted}
    total = request.steps

    def on_step_end(
        _pipe: Any, step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if on_step is not None:
            on_step(step_index + 1, total)
        _raise_if_cancelled(cancel, step_index + 1, total)
        return callback_kwargs

    has_step_callback = "callback_on_step_end" in accepted
    if has_step_callback:
        arguments["callback_on_step_end"] = on_step_end
    else:
        # NOTE: without a step callback this pipeline reports progress and checks the cancel
        # flag only before and after the whole run.
        logger.warning(
            "Pipeline %s has no callback_on_step_end; progress and cancellation are per run",
            type(pipe).__name__,
        )

    _raise_if_cancelled(cancel, 0, total)
    output = pipe(**arguments)
    if not has_step_callback and on_step is not None:
        on_step(total, total)
    return output.images[0]


class DiffusersRunner:
    """Run generations on one device; safe to call from several threads at once."""

    is_retriable = staticmethod(is_retriable)
    configure_thread = staticmethod(configure_worker_thread)

    def warm_models(self) -> list[str]:
        """Model ids whose pipelines are loaded in this process."""
        with self._lock:
            models = {model for model, _, _ in self._random_pipelines}
        if self._loaded is not None and self.model_path:
            models.add(self.model_path)
        return sorted(models)

    def __init__(self, model_path: str | None = None, device: str = "auto") -> None:
        self.model_path = model_path
        self.device = resolve_device(device)
        self._lock = threading.Lock()
        self._random_pipelines: dict[tuple[str, int, int], DDIMPipeline] = {}
        self._loaded: DiffusionPipeline | None = None

    def _random_pipeline(self, model_id: str, width: int, height: int) -> DDIMPipeline:
        key = (model_id, width, height)
        # One lock guards the cache and the global RNG that seeds the weights.
        with self._lock:
            pipe = self._random_pipelines.get(key)
            if pipe is None:
                started = time.perf_counter()
                pipe = build_random_pipeline(model_id, width, height)
                pipe.to(self.device)
                pipe.set_progress_bar_config(disable=True)
                self._random_pipelines[key] = pipe
                logger.info(
                    "Built random-weight pipeline for model %s at %dx%d on %s in %.2f s",
                    model_id,
                    width,
                    height,
                    self.device,
                    time.perf_counter() - started,
                )
            return pipe

    def _loaded_pipeline(self) -> DiffusionPipeline:
        with self._lock:
            if self._loaded is None:
                assert self.model_path is not None
                dtype = torch.float16 if self.device.type == "cuda" else torch.float32
                started = time.perf_counter()
                pipe = DiffusionPipeline.from_pretrained(self.model_path, torch_dtype=dtype)
                pipe.to(self.device)
                pipe.set_progress_bar_config(disable=True)
                self._loaded = pipe
                logger.info(
                    "Loaded pipeline %s from %s on %s (%s) in %.2f s",
                    type(pipe).__name__,
                    self.model_path,
                    self.device,
                    dtype,
                    time.perf_counter() - started,
                )
            return self._loaded

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Generate one image, calling ``on_step`` after every denoising step.

        Raises:
            GenerationCancelled: ``cancel`` was set; checked before every step.
            PermanentError: the random-weight pipeline cannot generate the requested size.
        """
        _raise_if_cancelled(cancel, 0, request.steps)
        if self.model_path is None:
            pipe: DiffusionPipeline = self._random_pipeline(
                request.model, request.width, request.height
            )
        else:
            # NOTE: a worker with a model path serves that model whatever ``request.model`` is.
            # Only a separate consumer group per model pool keeps other models' attempts away.
            pipe = self._loaded_pipeline()

        started = time.perf_counter()
        with torch.inference_mode():
            if isinstance(pipe, DDIMPipeline):
                # NOTE: DDIM pipelines are unconditional, so the prompt, negative prompt and
                # guidance scale only reach text-conditioned models loaded from a path.
                image = _run_ddim(pipe, request, self.device, on_step, cancel)
            else:
                image = _run_loaded_pipeline(_with_own_scheduler(pipe), request, on_step, cancel)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return GenerationResult(
            image=image, gpu_s=time.perf_counter() - started, device=str(self.device)
        )
