"""Measure the diffusers runner's images/s by batch size on a CUDA device and print JSON.

Usage: ``.venv/bin/python -m bench.gpu_check [--model-path DIR_OR_HUB_ID] [--batch-sizes 1,2,4,8]``.
Without ``--model-path`` it runs the small random-weight pipeline. It exits with status 2
and a message when no CUDA device is present, because CPU numbers belong to ``bench gpu``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None,
                        help="local diffusers pipeline directory or hub id; default: random "
                             "weights")
    parser.add_argument("--batch-sizes", default="1,2,4,8",
                        help="comma-separated batch sizes to measure")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--side-px", type=int, default=None,
                        help="image width and height; default 512 with a model path, else 64")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per batch size")
    return parser.parse_args(argv)


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    """Time ``--repeats`` batches per batch size after one warm-up batch each."""
    import torch

    from gpu_inference.generation import GenerationRequest, GenerationResult
    from gpu_inference.pipeline import BatchItem, DiffusersRunner

    args = parse_arguments(argv)
    side_px = args.side_px or (512 if args.model_path else 64)
    runner = DiffusersRunner(args.model_path, "cuda")
    results: dict[str, Any] = {}
    for size in (int(value) for value in args.batch_sizes.split(",")):
        def batch(offset: int, size: int = size) -> list[BatchItem]:
            return [BatchItem(GenerationRequest(model="M0012", prompt="a floor plan",
                                                steps=args.steps, width=side_px,
                                                height=side_px, seed=offset + index))
                    for index in range(size)]

        runner.generate_batch(batch(0))
        started = time.perf_counter()
        failures = 0
        for repeat in range(args.repeats):
            outcomes = runner.generate_batch(batch(1000 * (repeat + 1)))
            failures += sum(not isinstance(outcome, GenerationResult) for outcome in outcomes)
        elapsed_s = time.perf_counter() - started
        results[str(size)] = {
            "images_per_s": size * args.repeats / elapsed_s,
            "seconds_per_batch": elapsed_s / args.repeats,
            "failed_images": failures,
        }
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": args.model_path or "random-weight DDIM (M0012)",
        "steps": args.steps,
        "side_px": side_px,
        "memory_budget_bytes": runner.memory_budget_bytes,
        "by_batch_size": results,
    }


def main(argv: list[str] | None = None) -> int:
    # Parsed first so that --help and invalid options work without a device.
    parse_arguments(argv)
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write("No CUDA device is available (torch.cuda.is_available() is False), "
                         "so there is nothing to measure. Run `slotforge bench gpu` for the "
                         "CPU batching benchmark.\n")
        return 2
    logging.basicConfig(level=logging.INFO)
    sys.stdout.write(json.dumps(measure(argv), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
