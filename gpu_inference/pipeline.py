"""Diffusers runner: generations alone or in batches, with step progress and cancellation.

With a configured model path the runner loads that pipeline on first use (float16 on CUDA).
Without one it builds a small random-weight ``UNet2DModel`` with a DDIM scheduler, seeded from
the model id so that every worker builds the same weights for the same id. Loaded pipelines
live in the worker's model registry, beside the LoRA adapters that requests name, which are
merged into a pipeline's weights while a batch that names them runs (see ``adapters``). Only
this module and its helpers ``adapters``, ``memory`` and ``registry`` import torch, and only
this one imports diffusers.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# diffusers classes come from their defining modules, because the package root's lazy
# imports resolve to dummy classes for type checkers.
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.pipelines.ddim.pipeline_ddim import DDIMPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from opentelemetry import context as otel_context
from opentelemetry import trace
from PIL import Image

from gpu_inference.adapters import LoraAdapter, PipelineAdapters, load_adapter, random_adapter
from gpu_inference.generation import (
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    StepCallback,
)
from gpu_inference.memory import estimate_sample_bytes, fit_batch_size, memory_budget_bytes
from gpu_inference.registry import ModelRegistry
from schemas.errors import PermanentError, SlotforgeError

logger = logging.getLogger(__name__)

# The random UNet runs self-attention at half the image side, so its cost grows with the fourth
# power of the side. At 256x256 one step took about 16 s on one CPU core of a 2-core VM.
RANDOM_MAX_SIDE_PX = 256


def dtype_named(name: str) -> torch.dtype:
    """Map a setting such as ``float32`` to the torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}; use float32 or float64")
    return dtype


def compute_dtype(
    device: torch.device, *, loaded: bool, cpu_dtype: torch.dtype = torch.float64
) -> torch.dtype:
    """Pick the dtype a pipeline runs in on ``device``.

    CUDA runs loaded models in float16 and the small random one in float32. The CPU runs
    ``cpu_dtype``, float64 by default, because float32 convolutions and matrix products round
    differently at different batch sizes, which changed about one pixel in 3,000 between a
    batched and a lone run of the random pipeline. The cost: float64 convolutions on the CPU
    gain nothing from batching (see ``bench gpu``). NOTE: float16 on CUDA rounds the same
    way, so there a batched image can differ from a lone one by a pixel step.
    """
    if device.type == "cuda":
        return torch.float16 if loaded else torch.float32
    return cpu_dtype


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


# Outcome of one item of a batch: its result, or the error that ended that item alone.
BatchOutcome = GenerationResult | BaseException


@dataclass
class BatchItem:
    """One attempt's generation inside a batch, with its own progress callback and cancel flag.

    ``on_done`` receives the item's outcome once, as soon as it is final: at the step where a
    cancelled item leaves the batch, otherwise when the call ends.
    """

    request: GenerationRequest
    on_step: StepCallback | None = None
    cancel: threading.Event | None = None
    on_done: Callable[[BatchOutcome], None] | None = None


class _DeliverOnce:
    """Forward an item's outcome to its ``on_done`` once, even when a split batch reruns it."""

    def __init__(self, on_done: Callable[[BatchOutcome], None] | None) -> None:
        self.on_done = on_done
        self.delivered = False

    def __call__(self, outcome: BatchOutcome) -> None:
        if self.on_done is not None and not self.delivered:
            self.delivered = True
            self.on_done(outcome)

# Fault-injection hook called before every denoising step with (batch size, step index).
# An exception it raises acts as if the step itself had raised it.
StepHook = Callable[[int, int], None]

OUT_OF_MEMORY_ERRORS = (torch.cuda.OutOfMemoryError, MemoryError)


class _StepHighWater:
    """Forward only steps beyond the highest already reported, so a retried batch never makes
    an attempt's progress go backwards."""

    def __init__(self, on_step: StepCallback | None) -> None:
        self.on_step = on_step
        self.reported = 0

    def __call__(self, step: int, total: int) -> None:
        if self.on_step is not None and step > self.reported:
            self.reported = step
            self.on_step(step, total)


def _initial_noise(
    generator: torch.Generator, shape: tuple[int, ...]
) -> torch.Tensor:
    # Noise is drawn on the CPU so a seed gives the same starting noise on every device.
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _run_ddim_batch(
    pipe: DDIMPipeline,
    items: list[BatchItem],
    device: torch.device,
    *,
    eta: float = 0.0,
    before_step: StepHook | None = None,
) -> list[Image.Image | GenerationCancelled]:
    """Run the DDIM denoising loop of ``DDIMPipeline.__call__`` over a batch of attempts.

    Each row draws its initial noise and its eta noise from its own generator, so a row's
    image matches a run of that attempt alone. A row whose cancel flag is set is removed
    before the next step while the other rows continue.

    NOTE: DDIMPipeline in diffusers 0.39 has no ``callback_on_step_end``, so this loop repeats
    its unet and scheduler calls (no clipped model output) to report progress per step.
    """
    unet = pipe.unet
    # A scheduler keeps the timesteps of its current run, so concurrent calls need their own.
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    first = items[0].request
    scheduler.set_timesteps(first.steps, device=device)
    total = len(scheduler.timesteps)

    generators = [torch.Generator().manual_seed(item.request.seed) for item in items]
    shape = (1, unet.config.in_channels, first.height, first.width)
    sample = torch.cat([_initial_noise(generator, shape) for generator in generators])
    sample = sample.to(device=device, dtype=unet.dtype)
    # active[row] is the index in ``items`` of the sample's row ``row``.
    active = list(range(len(items)))
    outcomes: list[Image.Image | GenerationCancelled | None] = [None] * len(items)

    for index, timestep in enumerate(scheduler.timesteps):
        kept_rows = []
        for row, item_index in enumerate(active):
            cancel = items[item_index].cancel
            if cancel is not None and cancel.is_set():
                cancelled = GenerationCancelled(
                    f"generation cancelled after {index} of {total} steps"
                )
                outcomes[item_index] = cancelled
                # Reported at once, so the attempt's slot frees while the others run on.
                on_done = items[item_index].on_done
                if on_done is not None:
                    on_done(cancelled)
            else:
                kept_rows.append(row)
        if len(kept_rows) < len(active):
            active = [active[row] for row in kept_rows]
            if not active:
                break
            sample = sample[kept_rows]

        if before_step is not None:
            before_step(len(active), index)
        noise_prediction = unet(sample, timestep).sample
        variance_noise = None
        if eta > 0:
            noise = torch.cat([_initial_noise(generators[i], shape) for i in active])
            variance_noise = noise.to(device=device, dtype=unet.dtype)
        sample = scheduler.step(
            noise_prediction, timestep, sample, eta=eta, variance_noise=variance_noise
        ).prev_sample
        for item_index in active:
            on_step = items[item_index].on_step
            if on_step is not None:
                on_step(index + 1, total)

    for row, item_index in enumerate(active):
        outcomes[item_index] = _to_pil(sample[row : row + 1])
    return [outcome for outcome in outcomes if outcome is not None]


def _with_own_scheduler(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Return a view of the pipeline that shares its models but has a scheduler of its own.

    ``torch_dtype=None`` keeps ``from_pipe`` (diffusers 0.39) from casting the shared models to
    float32. NOTE: tokenizers stay shared; concurrent calls on a text-conditioned pipeline are
    not verified here, because no such model is available offline.
    """
    scheduler = pipe.scheduler.from_config(pipe.scheduler.config)
    return type(pipe).from_pipe(pipe, scheduler=scheduler, torch_dtype=None)


def _batch_arguments(accepted: Mapping[str, Any], items: list[BatchItem]) -> dict[str, Any]:
    """Build the ``__call__`` arguments that the pipeline accepts: scalars for one item, lists
    (one entry and one generator per sample) for a batch."""
    first = items[0].request
    single = len(items) == 1
    prompts = [item.request.prompt for item in items]
    negative_prompts = [item.request.negative_prompt or "" for item in items]
    generators = [torch.Generator().manual_seed(item.request.seed) for item in items]
    candidates: dict[str, Any] = {
        "prompt": prompts[0] if single else prompts,
        "negative_prompt": (first.negative_prompt or None) if single else negative_prompts,
        "num_inference_steps": first.steps,
        "height": first.height,
        "width": first.width,
        "guidance_scale": first.guidance_scale,
        "generator": generators[0] if single else generators,
        "output_type": "pil",
    }
    return {name: value for name, value in candidates.items() if name in accepted}


def _run_loaded_batch(
    pipe: Any, items: list[BatchItem], before_step: StepHook | None = None
) -> list[Image.Image | GenerationCancelled]:
    """Call a loaded pipeline once for a batch of attempts, with per-attempt progress.

    NOTE: a cancelled attempt keeps its row until the call ends, because the pipeline owns its
    latents and prompt embeddings; its image is dropped. The call stops early only when every
    attempt in it is cancelled.
    """
    accepted = inspect.signature(pipe.__call__).parameters
    arguments = _batch_arguments(accepted, items)
    total = items[0].request.steps

    def is_cancelled(item: BatchItem) -> bool:
        return item.cancel is not None and item.cancel.is_set()

    def on_step_end(
        _pipe: Any, step_index: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        for item in items:
            if item.on_step is not None and not is_cancelled(item):
                item.on_step(step_index + 1, total)
        if all(is_cancelled(item) for item in items):
            raise GenerationCancelled(
                f"generation cancelled after {step_index + 1} of {total} steps"
            )
        if before_step is not None and step_index + 1 < total:
            before_step(len(items), step_index + 1)
        return callback_kwargs

    has_step_callback = "callback_on_step_end" in accepted
    if has_step_callback:
        arguments["callback_on_step_end"] = on_step_end
    else:
        # NOTE: without a step callback this pipeline reports progress and checks the cancel
        # flags only before and after the whole run.
        logger.warning(
            "Pipeline %s has no callback_on_step_end; progress and cancellation are per run",
            type(pipe).__name__,
        )

    if all(is_cancelled(item) for item in items):
        raise GenerationCancelled(f"generation cancelled after 0 of {total} steps")
    if before_step is not None:
        before_step(len(items), 0)
    output = pipe(**arguments)
    outcomes: list[Image.Image | GenerationCancelled] = []
    for item, image in zip(items, output.images, strict=True):
        if is_cancelled(item):
            outcomes.append(GenerationCancelled(f"generation cancelled during its {total} steps"))
            continue
        if not has_step_callback and item.on_step is not None:
            item.on_step(total, total)
        outcomes.append(image)
    return outcomes


def _run_loaded_pipeline(
    pipe: Any,
    request: GenerationRequest,
    on_step: StepCallback | None,
    cancel: threading.Event | None,
) -> Image.Image:
    """Call a loaded pipeline for one request with the arguments its ``__call__`` accepts."""
    (outcome,) = _run_loaded_batch(pipe, [BatchItem(request, on_step, cancel)])
    if isinstance(outcome, GenerationCancelled):
        raise outcome
    return outcome


class DiffusersRunner:
    """Run generations, alone or in batches, on one device; safe to call from several threads.

    Pipelines live in a :class:`ModelRegistry` bounded by the device's memory budget: CUDA
    memory times ``cuda_memory_fraction``, or ``memory_budget_mb`` on the CPU.
    """

    is_retriable = staticmethod(is_retriable)
    configure_thread = staticmethod(configure_worker_thread)

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "auto",
        *,
        memory_budget_mb: int = 4096,
        cuda_memory_fraction: float = 0.9,
        eta: float = 0.0,
        cpu_dtype: torch.dtype = torch.float64,
        tracer: trace.Tracer | None = None,
        adapter_dir: Path | None = None,
    ) -> None:
        self.model_path = model_path
        self.adapter_dir = adapter_dir
        self.cpu_dtype = cpu_dtype
        self.device = resolve_device(device)
        self.eta = eta
        self.memory_budget_bytes = memory_budget_bytes(
            self.device, memory_budget_mb, cuda_memory_fraction
        )
        self.registry = ModelRegistry(self.memory_budget_bytes, tracer)
        # Adapter state of each loaded pipeline; it goes when the registry drops the pipeline.
        self._adapters: weakref.WeakKeyDictionary[Any, PipelineAdapters] = (
            weakref.WeakKeyDictionary())
        self._adapters_lock = threading.Lock()
        # Fault-injection hook before every denoising step; see StepHook.
        self.before_step: StepHook | None = None

    def set_tracer(self, tracer: trace.Tracer) -> None:
        """Record model loads and evictions with this tracer."""
        self.registry.tracer = tracer

    def warm_models(self) -> list[str]:
        """Model and adapter ids loaded in this process, least recently used first."""
        return self.registry.models()

    def max_batch_size(self, request: GenerationRequest, requested: int) -> int:
        """Cap a batch size so its samples fit beside the loaded models in the budget."""
        free_bytes = self.memory_budget_bytes - self.registry.used_bytes()
        return fit_batch_size(
            requested, free_bytes, estimate_sample_bytes(request.width, request.height)
        )

    def _load_random(self, model_id: str, width: int, height: int) -> DDIMPipeline:
        pipe = build_random_pipeline(model_id, width, height)
        pipe.to(self.device, compute_dtype(self.device, loaded=False, cpu_dtype=self.cpu_dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _load_path(self) -> DiffusionPipeline:
        assert self.model_path is not None
        dtype = compute_dtype(self.device, loaded=True, cpu_dtype=self.cpu_dtype)
        started = time.perf_counter()
        pipe = DiffusionPipeline.from_pretrained(self.model_path, torch_dtype=dtype)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        logger.info(
            "Loaded pipeline %s from %s on %s (%s) in %.2f s",
            type(pipe).__name__,
            self.model_path,
            self.device,
            dtype,
            time.perf_counter() - started,
        )
        return pipe

    def _pipeline_source(
        self, request: GenerationRequest
    ) -> tuple[str, Callable[[], DiffusionPipeline]]:
        """Return the registry key and loader that serve this request."""
        if self.model_path is not None:
            # NOTE: a worker with a model path serves that model whatever ``request.model`` is.
            # Only a separate consumer group per model pool keeps other models' attempts away.
            return self.model_path, self._load_path
        if max(request.width, request.height) > RANDOM_MAX_SIDE_PX:
            raise PermanentError(
                f"the random-weight pipeline generates at most {RANDOM_MAX_SIDE_PX} px per "
                f"side, got {request.width}x{request.height}; set "
                "SLOTFORGE_WORKER__MODEL_PATH to a real model for larger images",
                model=request.model,
            )

        # The random UNet's weights do not depend on the sample size it was built with.
        def load() -> DiffusionPipeline:
            return self._load_random(request.model, request.width, request.height)

        return request.model, load

    def _random_pipeline(self, model_id: str, width: int, height: int) -> DDIMPipeline:
        request = GenerationRequest(model=model_id, prompt="", steps=1, width=width,
                                    height=height, seed=0)
        key, load = self._pipeline_source(request)
        pipe: DDIMPipeline = self.registry.get(key, load)
        return pipe

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
        (outcome,) = self.generate_batch([BatchItem(request, on_step, cancel)])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def generate_batch(
        self, items: list[BatchItem], parent: otel_context.Context | None = None
    ) -> list[BatchOutcome]:
        """Generate the items' images in one pipeline call; they must share model, adapters,
        size, scheduler, step count and guidance scale.

        Returns one outcome per item, in order: a result, or the exception that ended that
        item (cancellation, or a failure of the whole call). An out-of-memory error splits
        the batch in halves and retries them; a single item that runs out of memory fails.
        """
        if not items:
            return []
        guarded = [
            BatchItem(item.request, _StepHighWater(item.on_step), item.cancel,
                      _DeliverOnce(item.on_done))
            for item in items
        ]
        outcomes = self._load_and_run(guarded, parent)
        for item, outcome in zip(guarded, outcomes, strict=True):
            assert item.on_done is not None
            item.on_done(outcome)
        return outcomes

    def _adapter_loader(self, pipe: Any, adapter_id: str) -> Callable[[], LoraAdapter]:
        """Return the loader of an adapter: its file, or random weights for the random model."""
        adapter_dir = self.adapter_dir
        if adapter_dir is not None:
            return lambda: load_adapter(adapter_dir, adapter_id)
        if self.model_path is None:
            return lambda: random_adapter(pipe, adapter_id)
        raise PermanentError(
            f"adapter {adapter_id!r} requested, but no adapter folder is configured for "
            f"the model at {self.model_path}; set SLOTFORGE_WORKER__ADAPTER_DIR",
            adapter=adapter_id,
        )

    def _pipeline_adapters(self, pipe: Any) -> PipelineAdapters:
        with self._adapters_lock:
            state = self._adapters.get(pipe)
            if state is None:
                state = self._adapters[pipe] = PipelineAdapters(pipe)
            return state

    def _load_and_run(
        self, items: list[BatchItem], parent: otel_context.Context | None
    ) -> list[BatchOutcome]:
        request = items[0].request
        try:
            key, load = self._pipeline_source(request)
        except PermanentError as err:
            return [err for _ in items]
        try:
            with ExitStack() as held:
                pipe = held.enter_context(self.registry.use(key, load, parent))
                # Adapters stay pinned in the registry while the batch runs with them merged.
                adapters = [
                    held.enter_context(self.registry.use(
                        adapter_id, self._adapter_loader(pipe, adapter_id), parent,
                        kind="adapter"))
                    for adapter_id in request.loras
                ]
                held.enter_context(self._pipeline_adapters(pipe).activate(adapters))
                return self._run_splitting(pipe, items)
        except Exception as err:  # noqa: BLE001 - a failed load ends every item of the batch
            logger.exception("Failed to load model %s with adapters [%s] for a batch of %d",
                             key, ", ".join(request.loras), len(items))
            return [err for _ in items]

    def _run_splitting(self, pipe: DiffusionPipeline, items: list[BatchItem]) -> list[BatchOutcome]:
        """Run a batch; on out-of-memory, split it in halves and run each half alone."""
        try:
            return self._run(pipe, items)
        except OUT_OF_MEMORY_ERRORS as err:
            if len(items) == 1:
                return [err]
            half = len(items) // 2
            logger.warning(
                "Out of memory in a batch of %d on %s (%s); retrying as batches of %d and %d",
                len(items), self.device, err, half, len(items) - half,
            )
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self._run_splitting(pipe, items[:half]) + self._run_splitting(pipe, items[half:])
        except Exception as err:  # noqa: BLE001 - a failed call ends every item in it
            logger.exception("Generation failed for a batch of %d", len(items))
            return [err for _ in items]

    def _run(self, pipe: DiffusionPipeline, items: list[BatchItem]) -> list[BatchOutcome]:
        started = time.perf_counter()
        with torch.inference_mode():
            if isinstance(pipe, DDIMPipeline):
                # NOTE: DDIM pipelines are unconditional, so the prompt, negative prompt and
                # guidance scale only reach text-conditioned models loaded from a path.
                images = _run_ddim_batch(
                    pipe, items, self.device, eta=self.eta, before_step=self.before_step
                )
            else:
                images = _run_loaded_batch(_with_own_scheduler(pipe), items, self.before_step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # Every sample in a batch occupied the device for the whole call.
        gpu_s = time.perf_counter() - started
        outcomes: list[BatchOutcome] = []
        for image in images:
            if isinstance(image, GenerationCancelled):
                outcomes.append(image)
            else:
                outcomes.append(
                    GenerationResult(image=image, gpu_s=gpu_s, device=str(self.device))
                )
        return outcomes
