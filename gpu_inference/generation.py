"""What a generation takes and returns, shared by the diffusers and simulated runners.

Nothing here imports torch, so processes that only schedule work start fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from schemas.errors import SlotforgeError
from schemas.events import GenerationParams

# Called on the generating thread after each denoising step with (completed steps, total steps).
StepCallback = Callable[[int, int], None]


class GenerationCancelled(SlotforgeError):
    """The attempt's cancel flag was set, so the generation stopped before its next step."""

    retriable = False


@dataclass(frozen=True)
class GenerationRequest:
    """Inputs of one generation: the sampler settings of a job and the attempt's seed."""

    model: str
    prompt: str
    steps: int
    width: int
    height: int
    seed: int
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    # LoRA adapter ids, merged into the model's weights in this order.
    loras: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, params: GenerationParams, seed: int) -> GenerationRequest:
        return cls(
            model=params.model,
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            steps=params.steps,
            width=params.width,
            height=params.height,
            guidance_scale=params.guidance_scale,
            seed=seed,
            loras=tuple(params.loras),
        )


@dataclass(frozen=True)
class GenerationResult:
    """A generated image and the seconds it occupied the device, model loading excluded."""

    image: Image.Image
    gpu_s: float
    device: str
