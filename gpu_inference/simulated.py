"""A simulated GPU for scheduling benchmarks and fault tests: same interface, no torch.

Service times are lognormal (sigma 0.99 gives p99/p50 of about 10), stretched by how many
attempts share the device, and progress advances one step at a time so heartbeats,
cancellation and hang detection behave as with the diffusers runner. The image is a
smooth gradient that post-processing accepts, or noise that it rejects, chosen per seed
with the configured acceptance probability, so the real scoring code decides.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time

import numpy as np
from PIL import Image

from gpu_inference.generation import (
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
    StepCallback,
)
from schemas.errors import SlotforgeError, TransientError
from streams.config import SimulationSettings

logger = logging.getLogger(__name__)


def sigma_for_tail_ratio(p99_over_p50: float) -> float:
    """Lognormal sigma whose p99 is ``p99_over_p50`` times its median (z(0.99) = 2.326)."""
    return math.log(p99_over_p50) / 2.326


class SimulatedRunner:
    """Sleep through a drawn service time step by step; thread-safe."""

    device = "simulated"

    def __init__(self, settings: SimulationSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._active = 0

    @staticmethod
    def is_retriable(error: BaseException) -> bool:
        return error.retriable if isinstance(error, SlotforgeError) else True

    @staticmethod
    def configure_thread(slots: int) -> None:
        return None

    def warm_models(self) -> list[str]:
        return []

    def _draw(self, seed: int) -> tuple[float, bool, bool, bool]:
        rng = random.Random(hashlib.sha256(str(seed).encode()).digest())
        service_s = self.settings.p50_s * math.exp(self.settings.sigma * rng.gauss(0.0, 1.0))
        accepted = rng.random() < self.settings.acceptance
        hangs = rng.random() < self.settings.hang_fraction
        crashes = rng.random() < self.settings.crash_fraction
        return service_s, accepted, hangs, crashes

    def generate(self, request: GenerationRequest, *, on_step: StepCallback | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        service_s, accepted, hangs, crashes = self._draw(request.seed)
        hang_step = 1 + request.seed % max(1, request.steps)
        with self._lock:
            self._active += 1
        started = time.perf_counter()
        try:
            done_s = 0.0
            for step in range(1, request.steps + 1):
                # Each step's length follows the device's current sharing, like a real GPU.
                with self._lock:
                    slowdown = 1.0 + self.settings.slowdown_per_attempt * (self._active - 1)
                step_s = service_s / request.steps * slowdown
                if hangs and step == hang_step:
                    self._hang(cancel)
                if cancel is not None and cancel.wait(step_s):
                    raise GenerationCancelled(f"cancelled after {step - 1} of {request.steps} "
                                              "steps")
                if cancel is None:
                    time.sleep(step_s)
                done_s += step_s
                if crashes and step == request.steps // 2 + 1:
                    raise TransientError("simulated device failure")
                if on_step is not None:
                    on_step(step, request.steps)
        finally:
            with self._lock:
                self._active -= 1
        image = _accepted_image(request) if accepted else _rejected_image(request)
        return GenerationResult(image=image, gpu_s=time.perf_counter() - started,
                                device=self.device)

    def _hang(self, cancel: threading.Event | None) -> None:
        """Stop making progress until cancelled, as a wedged kernel would."""
        if cancel is None:
            time.sleep(self.settings.hang_s)
            return
        if cancel.wait(self.settings.hang_s):
            raise GenerationCancelled("cancelled while hung")


def _accepted_image(request: GenerationRequest) -> Image.Image:
    height, width = request.height, request.width
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = (request.seed % 360) / 57.3
    red = 127 + 100 * np.sin(x / width * 3.1 + phase)
    green = 127 + 100 * np.cos(y / height * 2.7 + phase)
    blue = 127 + 60 * np.sin((x + y) / (width + height) * 4.0)
    rgb = np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _rejected_image(request: GenerationRequest) -> Image.Image:
    rng = np.random.default_rng(request.seed % 2**32)
    rgb = rng.integers(0, 256, size=(request.height, request.width, 3), dtype=np.uint8)
    return Image.fromarray(rgb, "RGB")
