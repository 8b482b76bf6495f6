"""Device memory budgets: how many samples a worker may hold at once.

CUDA reports its own memory. On the CPU the configured budget replaces it. Sample sizes
are estimates, so an out-of-memory error during a batch still splits it (see the runner).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

# NOTE: an estimate, not a measurement: about 4 KiB of activations per output pixel keeps a
# 512x512 sample near 1 GiB, the order Stable Diffusion 1.5 needs in float16.
ACTIVATION_BYTES_PER_PIXEL = 4096

MIB = 1024 * 1024


def memory_budget_bytes(device: torch.device, configured_mb: int, cuda_fraction: float) -> int:
    """Bytes that models and samples may occupy on ``device``.

    CUDA: ``cuda_fraction`` of the device's total memory, leaving the rest to the allocator's
    cache and other processes. CPU: the configured budget.
    """
    if device.type == "cuda":
        _free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        return int(total_bytes * cuda_fraction)
    return configured_mb * MIB


def estimate_sample_bytes(width: int, height: int) -> int:
    """Estimate the activation memory of one sample in a batch at this image size."""
    return width * height * ACTIVATION_BYTES_PER_PIXEL


def fit_batch_size(requested: int, free_bytes: int, sample_bytes: int) -> int:
    """Largest batch size up to ``requested`` whose samples fit in ``free_bytes``; at least 1.

    One sample always runs, so a request that fits nowhere fails with an out-of-memory error
    instead of waiting forever.
    """
    if sample_bytes <= 0:
        return max(1, requested)
    return max(1, min(requested, free_bytes // sample_bytes))


def fit_slots(slots: int, budget_bytes: int, sample_bytes: int) -> int:
    """Cap the slot count so every slot's sample fits in the budget at once; at least 1."""
    fitted = fit_batch_size(slots, budget_bytes, sample_bytes)
    if fitted < slots:
        logger.warning(
            "Reducing slots from %d to %d: %d samples of %.1f MiB exceed the %.1f MiB budget",
            slots,
            fitted,
            slots,
            sample_bytes / MIB,
            budget_bytes / MIB,
        )
    return fitted
