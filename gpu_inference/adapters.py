"""LoRA adapters: low-rank weight updates read from safetensors files and merged into a
pipeline's weights while a batch that names them runs.

A file holds, for every adapted module, ``<component>.<module path>.lora_A.weight`` (rank x
in features, or a conv kernel with rank output channels), ``...lora_B.weight`` (out features
x rank) and optionally ``...alpha``, for example
``unet.down_blocks.1.attentions.0.to_q.lora_A.weight``. The matrices follow PEFT's naming.
The update ``alpha / rank * B @ A`` is added to the module's weight, and the original weights
are kept to restore them. NOTE: Kohya-style files (``lora_down``/``lora_up`` keys) are not read.

The patch is implemented here instead of through diffusers' ``load_lora_weights``, because
that needs the PEFT package (which requires transformers and accelerate, not installed here),
and the random-weight ``UNet2DModel`` has no adapter loader in diffusers 0.39 at all.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from schemas.errors import PermanentError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
# Module types whose weights an adapter may update.
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)
AdaptableModule = torch.nn.Linear | torch.nn.Conv2d


@dataclass(frozen=True)
class LoraLayer:
    """Low-rank update of one module's weight: ``scale * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the update shaped like ``weight``, in its dtype and on its device."""
        down = self.down.to(device=weight.device, dtype=weight.dtype).flatten(1)
        up = self.up.to(device=weight.device, dtype=weight.dtype).flatten(1)
        return (self.scale * (up @ down)).reshape(weight.shape)


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter's updates, by module path (``<component>.<module path>``)."""

    adapter_id: str
    layers: dict[str, LoraLayer]

    def size_bytes(self) -> int:
        """Bytes of the adapter's tensors, for the registry's memory budget."""
        return sum(
            tensor.numel() * tensor.element_size()
            for layer in self.layers.values()
            for tensor in (layer.down, layer.up)
        )


def adapter_path(adapter_dir: Path, adapter_id: str) -> Path:
    """Return ``<adapter_dir>/<adapter_id>/adapter.safetensors``, rejecting ids that would
    leave the folder."""
    if not adapter_id or "/" in adapter_id or "\\" in adapter_id or adapter_id in (".", ".."):
        raise PermanentError(f"invalid adapter id {adapter_id!r}: it must be a plain name",
                             adapter=adapter_id)
    return adapter_dir / adapter_id / ADAPTER_FILE


def load_adapter(adapter_dir: Path, adapter_id: str) -> LoraAdapter:
    """Read an adapter's file from ``adapter_dir``.

    Raises:
        PermanentError: the file is missing, or a module has only one of its two matrices.
            Every worker with the same folder would fail the same way.
    """
    path = adapter_path(adapter_dir, adapter_id)
    if not path.is_file():
        raise PermanentError(f"adapter {adapter_id!r} not found: no file {path}",
                             adapter=adapter_id)
    tensors = load_file(str(path))
    modules = {name.rsplit(".lora_", 1)[0] for name in tensors if ".lora_" in name}
    layers: dict[str, LoraLayer] = {}
    for module in sorted(modules):
        down = tensors.get(f"{module}.lora_A.weight")
        up = tensors.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            raise PermanentError(
                f"adapter {adapter_id!r} in {path} has only one of lora_A and lora_B for "
                f"module {module}", adapter=adapter_id)
        rank = down.shape[0]
        alpha = tensors.get(f"{module}.alpha")
        scale = float(alpha) / rank if alpha is not None else 1.0
        layers[module] = LoraLayer(down=down, up=up, scale=scale)
    if not layers:
        raise PermanentError(f"adapter {adapter_id!r} in {path} contains no lora_A/lora_B "
                             "weights", adapter=adapter_id)
    return LoraAdapter(adapter_id, layers)


def _adaptable_modules(pipe: Any) -> Iterator[tuple[str, AdaptableModule]]:
    """Yield ``<component>.<module path>`` and module for every Linear and Conv2d layer."""
    components = getattr(pipe, "components", None)
    parts = components.items() if isinstance(components, dict) else [("", pipe)]
    for component, root in parts:
        if not isinstance(root, torch.nn.Module):
            continue
        for path, module in root.named_modules():
            if isinstance(module, ADAPTABLE):
                yield (f"{component}.{path}" if component else path), module


def random_adapter(
    pipe: Any, adapter_id: str, rank: int = 4, relative_scale: float = 0.5
) -> LoraAdapter:
    """Build a random adapter for the attention projections of ``pipe``, seeded from its id.

    Each layer's update has a standard deviation of ``relative_scale / sqrt(in features)``,
    about the size of the layer's own initial weights, so it changes an image visibly. Only
    the layers' shapes matter, so the same id gives the same adapter on every worker. This is
    the adapter counterpart of the random-weight pipeline, for use where no adapter files exist.
    """
    seed = int.from_bytes(hashlib.sha256(adapter_id.encode("utf-8")).digest()[:8], "big")
    generator = torch.Generator().manual_seed(seed & (2**63 - 1))
    layers: dict[str, LoraLayer] = {}
    for name, module in _adaptable_modules(pipe):
        if not isinstance(module, torch.nn.Linear) or ".to_" not in name:
            continue
        out_features, in_features = module.weight.shape
        down = torch.randn(rank, in_features, generator=generator)
        up = torch.randn(out_features, rank, generator=generator)
        # The product of two standard normal matrices has a standard deviation of sqrt(rank).
        scale = relative_scale / (in_features**0.5 * rank**0.5)
        layers[name] = LoraLayer(down=down, up=up, scale=scale)
    if not layers:
        raise PermanentError(f"the pipeline has no attention projections to adapt for "
                             f"adapter {adapter_id!r}", adapter=adapter_id)
    return LoraAdapter(adapter_id, layers)


def save_adapter(adapter: LoraAdapter, adapter_dir: Path) -> Path:
    """Write an adapter in the file layout that ``load_adapter`` reads; returns the path."""
    path = adapter_path(adapter_dir, adapter.adapter_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in adapter.layers.items():
        rank = layer.down.shape[0]
        tensors[f"{module}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"{module}.lora_B.weight"] = layer.up.contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(layer.scale * rank)
    save_file(tensors, str(path))
    return path


def _check_fits(adapter: LoraAdapter, modules: dict[str, AdaptableModule]) -> None:
    """Raise PermanentError unless every layer of the adapter matches a module's weight."""
    for name in sorted(adapter.layers):
        module = modules.get(name)
        if module is None:
            raise PermanentError(
                f"adapter {adapter.adapter_id!r} does not fit this pipeline: it has no "
                f"module {name}", adapter=adapter.adapter_id)
        layer = adapter.layers[name]
        expected = module.weight.numel()
        found = layer.up.flatten(1).shape[0] * layer.down.flatten(1).shape[1]
        if layer.up.flatten(1).shape[1] != layer.down.shape[0] or found != expected:
            raise PermanentError(
                f"adapter {adapter.adapter_id!r} does not fit this pipeline: its update of "
                f"{name} has shape {tuple(layer.up.shape)} x {tuple(layer.down.shape)}, "
                f"but the weight has shape {tuple(module.weight.shape)}",
                adapter=adapter.adapter_id)


class PipelineAdapters:
    """The adapter set merged into one pipeline's weights; thread-safe.

    Batches with the active set share the pipeline. A batch that needs another set waits until
    no batch uses the pipeline, then the original weights are restored and its set merged.
    NOTE: a steady stream of batches with one set can keep a batch with another set waiting.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.active: tuple[str, ...] = ()
        self._users = 0
        self._originals: dict[str, torch.Tensor] = {}
        self._changed = threading.Condition()

    @contextmanager
    def activate(self, adapters: Sequence[LoraAdapter]) -> Iterator[None]:
        """Hold the pipeline with exactly ``adapters`` merged, in their order, meanwhile."""
        requested = tuple(adapter.adapter_id for adapter in adapters)
        with self._changed:
            while self.active != requested and self._users > 0:
                self._changed.wait()
            if self.active != requested:
                self._restore()
                self._merge(adapters)
                self.active = requested
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                self._changed.notify_all()

    @torch.no_grad()
    def _merge(self, adapters: Sequence[LoraAdapter]) -> None:
        modules = dict(_adaptable_modules(self.pipe))
        for adapter in adapters:
            _check_fits(adapter, modules)
        try:
            for adapter in adapters:
                for name, layer in adapter.layers.items():
                    weight = modules[name].weight
                    if name not in self._originals:
                        self._originals[name] = weight.detach().clone()
                    weight.add_(layer.delta(weight))
        except BaseException:
            # A half-merged set must not serve the next batch, whatever set it requests.
            self._restore()
            raise
        if adapters:
            logger.info("Merged adapters %s into %d layers", ", ".join(
                adapter.adapter_id for adapter in adapters), len(self._originals))

    @torch.no_grad()
    def _restore(self) -> None:
        if not self._originals:
            return
        modules = dict(_adaptable_modules(self.pipe))
        for name, original in self._originals.items():
            modules[name].weight.copy_(original)
        logger.info("Restored the weights of %d layers, removing adapters %s",
                    len(self._originals), ", ".join(self.active))
        self._originals.clear()
        self.active = ()
