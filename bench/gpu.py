"""GPU worker benchmarks: dynamic batching on this machine's CPU, and model-affinity dispatch.

Batching runs the small random-weight diffusers pipeline through the worker's ``Batcher`` and
``DiffusersRunner`` (no Kafka) at several maximum batch sizes with the same backlog of
attempts, one pipeline call at a time as on one GPU. Affinity replays the model and adapter
sequence of the Alibaba Stable Diffusion trace over a simulated pool, dispatching with the
random baseline and with ``gpu_inference.affinity.pick_affinity``.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import csv
import heapq
import importlib.metadata
import os
import platform
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline_run import run_until_sigterm
from gpu_inference.affinity import (
    LoadCosts,
    Placement,
    WorkerView,
    load_s,
    pick_affinity,
    pick_random,
    place,
)

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / (
    "alibaba_genai2026_data_trace_processed_head25000.csv"
)
THROUGHPUT_TARGET = 1.4
P99_LIMIT = 2.0
WARM_HIT_TARGET = 2.0
REPRODUCE = (
    ".venv/bin/slotforge bench gpu --out bench/results/gpu.json\n"
    ".venv/bin/python -m bench.render"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attempts", type=int, default=64,
                        help="attempts per batch size in the batching run (same work for each)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="rounds per batch size, interleaved so that load drift on a "
                             "shared machine hits every batch size alike")
    parser.add_argument("--cpu-dtypes", default="float64,float32",
                        help="comma-separated dtypes to run the pipeline in; the first is the "
                             "worker's default and fills the 'batching' results")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per attempt")
    parser.add_argument("--side-px", type=int, default=32, help="image width and height")
    parser.add_argument("--batch-sizes", default="1,2,4,8",
                        help="comma-separated maximum batch sizes to compare")
    parser.add_argument("--max-batch-wait-ms", type=float, default=20.0,
                        help="maximum milliseconds a batch's first attempt waits for others")
    parser.add_argument("--trace", type=Path, default=TRACE,
                        help="Alibaba data_trace_processed CSV with models and lora_args")
    parser.add_argument("--requests", type=int, default=25_000,
                        help="trace requests to replay in the affinity run")
    parser.add_argument("--workers", type=int, default=8, help="simulated workers")
    parser.add_argument("--warm-models", type=int, default=3,
                        help="base models (and, separately, adapters) each worker keeps warm")
    parser.add_argument("--utilization", type=float, default=0.5,
                        help="offered load as a fraction of the pool's service capacity, "
                             "load time excluded")
    parser.add_argument("--model-load-s", type=float, default=10.0,
                        help="seconds to load a base model that is not warm")
    parser.add_argument("--adapter-load-s", type=float, default=2.0,
                        help="seconds to load an adapter that is not warm")
    parser.add_argument("--seed", type=int, default=1, help="seed of arrivals and random picks")


# Batching on the CPU.


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


async def _drain_backlog(
    runner: Any, batch_size: int, attempts: int, args: argparse.Namespace
) -> tuple[float, list[float], int]:
    """Submit ``attempts`` attempts at once and time each until its image is ready.

    Returns the elapsed seconds, the attempt latencies in seconds and the batch count.
    """
    from gpu_inference.batching import Batcher
    from gpu_inference.generation import GenerationRequest
    from gpu_inference.pipeline import BatchItem

    device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-device")
    loop = asyncio.get_running_loop()

    async def run_batch(items: list[BatchItem], _done: Any) -> list[Any]:
        outcomes: list[Any] = await loop.run_in_executor(device, runner.generate_batch, items)
        return outcomes

    batcher: Batcher[BatchItem, Any] = Batcher(
        run_batch, max_batch_size=batch_size, max_wait_s=args.max_batch_wait_ms / 1000
    )
    latencies_s: list[float] = []

    async def attempt(seed: int) -> None:
        request = GenerationRequest(model="M0012", prompt="bench", steps=args.steps,
                                    width=args.side_px, height=args.side_px, seed=seed)
        submitted = time.perf_counter()
        # One call runs at a time, so later batches queue behind the device like on a GPU.
        outcome = await batcher.submit("bench", BatchItem(request))
        if isinstance(outcome, BaseException):
            raise outcome
        latencies_s.append(time.perf_counter() - submitted)

    started = time.perf_counter()
    await asyncio.gather(*(attempt(seed) for seed in range(attempts)))
    elapsed_s = time.perf_counter() - started
    device.shutdown()
    return elapsed_s, latencies_s, len(batcher.batch_sizes)


def run_batching(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Measure every batch size in every dtype; returns results by dtype, then batch size."""
    import torch

    from gpu_inference.generation import GenerationRequest
    from gpu_inference.pipeline import DiffusersRunner

    dtypes = args.cpu_dtypes.split(",")
    runners = {name: DiffusersRunner(device="cpu", cpu_dtype=getattr(torch, name))
               for name in dtypes}
    # Load the model and warm the kernels so neither lands in the first batch size's time.
    warmup = GenerationRequest(model="M0012", prompt="bench", steps=2, width=args.side_px,
                               height=args.side_px, seed=0)
    for runner in runners.values():
        runner.generate(warmup)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    runs = [(name, size) for name in dtypes for size in sizes]
    per_round = args.attempts // args.rounds
    elapsed_s = {run: 0.0 for run in runs}
    latencies_s: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    batches = {run: 0 for run in runs}
    for round_index in range(args.rounds):
        # Rotate the order each round so no run always comes first or last.
        shift = round_index % len(runs)
        for name, size in runs[shift:] + runs[:shift]:
            seconds, latencies, count = run_until_sigterm(
                _drain_backlog(runners[name], size, per_round, args))
            elapsed_s[name, size] += seconds
            latencies_s[name, size] += latencies
            batches[name, size] += count
    return {
        name: {
            str(size): {
                "images_per_s": per_round * args.rounds / elapsed_s[name, size],
                "p99_attempt_s": _p99(latencies_s[name, size]),
                "p50_attempt_s": float(np.percentile(latencies_s[name, size], 50)),
                "elapsed_s": elapsed_s[name, size],
                "batches": batches[name, size],
            }
            for size in sizes
        }
        for name in dtypes
    }


def summarize_batching(batching: dict[str, Any]) -> dict[str, Any]:
    base = batching["1"]
    best = max(batching, key=lambda size: batching[size]["images_per_s"])
    speedup = batching[best]["images_per_s"] / base["images_per_s"]
    p99_ratio = batching[best]["p99_attempt_s"] / base["p99_attempt_s"]
    return {
        "best_batch_size": int(best),
        "speedup_vs_batch_1": speedup,
        "p99_ratio_vs_batch_1": p99_ratio,
        "target_met": speedup >= THROUGHPUT_TARGET and p99_ratio <= P99_LIMIT,
    }


# Affinity on the trace.


@dataclass(frozen=True)
class TraceRequest:
    model: str
    adapters: tuple[str, ...]
    service_s: float


def read_trace(path: Path, limit: int) -> list[TraceRequest]:
    """Read models, adapters (``lora_args``) and service times (``exec_time_seconds``)."""
    requests: list[TraceRequest] = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if len(requests) >= limit:
                break
            if not row["exec_time_seconds"]:
                continue
            loras = ast.literal_eval(row["lora_args"]) if row["lora_args"] else []
            adapters = tuple(str(lora["modelVersionId"]) for lora in loras)
            requests.append(TraceRequest(row["checkpoint_model_version_id"], adapters,
                                         float(row["exec_time_seconds"])))
    return requests


class _SimWorker:
    """A simulated one-slot worker with LRU sets of warm base models and adapters."""

    def __init__(self, worker_id: str, capacity: int) -> None:
        self.worker_id = worker_id
        self.capacity = capacity
        self.busy = False
        # When the dispatcher expects the running attempt to end: its load time plus the
        # trace's mean service time, not the attempt's real service time.
        self.expected_free_s = 0.0
        self.models: OrderedDict[str, None] = OrderedDict()
        self.adapters: OrderedDict[str, None] = OrderedDict()

    def view(self, now_s: float) -> WorkerView:
        return WorkerView(self.worker_id, 0 if self.busy else 1,
                          frozenset(self.models) | frozenset(self.adapters),
                          frees_in_s=max(0.0, self.expected_free_s - now_s) if self.busy
                          else 0.0)

    def use(self, request: TraceRequest) -> None:
        for name, warm in ((request.model, self.models),
                           *((adapter, self.adapters) for adapter in request.adapters)):
            warm[name] = None
            warm.move_to_end(name)
            while len(warm) > self.capacity:
                warm.popitem(last=False)


# Chooses a worker for a request that has waited ``waited_s``. A placement with ``wait``
# keeps the request queued for that worker, and None leaves it queued for any.
Picker = Callable[[list[WorkerView], TraceRequest, float], Placement | None]

# Queued requests a dispatch round considers, so one waiting request does not block others.
DISPATCH_WINDOW = 64


def simulate_pool(requests: list[TraceRequest], picker: Picker, args: argparse.Namespace,
                  arrivals_s: list[float], costs: LoadCosts) -> dict[str, Any]:
    """Replay the requests over the pool, oldest first, on every arrival and completion."""
    workers = {f"w{index}": _SimWorker(f"w{index}", args.warm_models)
               for index in range(args.workers)}
    mean_service_s = sum(request.service_s for request in requests) / len(requests)
    completions: list[tuple[float, str]] = []
    queue: list[int] = []
    next_arrival = 0
    hits = 0
    waits = 0
    loads_s: list[float] = []
    latencies_s: list[float] = []
    now = 0.0
    while next_arrival < len(requests) or completions or queue:
        if completions and (next_arrival >= len(requests)
                            or completions[0][0] <= arrivals_s[next_arrival]):
            now, worker_id = heapq.heappop(completions)
            workers[worker_id].busy = False
        else:
            now = arrivals_s[next_arrival]
            queue.append(next_arrival)
            next_arrival += 1
        position = 0
        while position < min(len(queue), DISPATCH_WINDOW):
            views = [worker.view(now) for worker in workers.values()]
            if not any(view.free_slots for view in views):
                break
            index = queue[position]
            request = requests[index]
            placement = picker(views, request, now - arrivals_s[index])
            if placement is None or placement.wait:
                waits += placement is not None
                position += 1
                continue
            queue.pop(position)
            worker = workers[placement.worker_id]
            loading_s = load_s(worker.view(now), request.model, request.adapters, costs)
            hits += loading_s == 0
            loads_s.append(loading_s)
            worker.use(request)
            worker.busy = True
            worker.expected_free_s = now + loading_s + mean_service_s
            finish = now + loading_s + request.service_s
            latencies_s.append(finish - arrivals_s[index])
            heapq.heappush(completions, (finish, placement.worker_id))
    return {
        "warm_hit_fraction": hits / len(requests),
        "load_s_per_attempt": sum(loads_s) / len(requests),
        "p50_latency_s": float(np.percentile(latencies_s, 50)),
        "p99_latency_s": _p99(latencies_s),
        "wait_decisions": waits,
    }


def random_picker(rng: random.Random) -> Picker:
    """Return the baseline picker: any free worker, uniformly at random."""

    def pick(views: list[WorkerView], _request: TraceRequest,
             _waited_s: float) -> Placement | None:
        chosen = pick_random(views, rng)
        return None if chosen is None else Placement(chosen, 0.0)

    return pick


def affinity_picker(costs: LoadCosts, *, wait: bool) -> Picker:
    """Return the affinity picker: ``place`` with waiting, or the coordinator's
    ``pick_affinity`` without."""

    def pick(views: list[WorkerView], request: TraceRequest,
             waited_s: float) -> Placement | None:
        if wait:
            return place(views, request.model, request.adapters, costs, waited_s=waited_s)
        chosen = pick_affinity(views, request.model, request.adapters, costs)
        return None if chosen is None else Placement(chosen, 0.0)

    return pick


def _belady_hits(sequence: list[str], capacity: int) -> list[bool]:
    """Replay ``sequence`` through Belady's MIN cache, which on a miss evicts the entry whose
    next use is furthest away."""
    next_use = [0] * len(sequence)
    upcoming: dict[str, int] = {}
    for index in range(len(sequence) - 1, -1, -1):
        next_use[index] = upcoming.get(sequence[index], len(sequence))
        upcoming[sequence[index]] = index
    cache: dict[str, int] = {}
    hits = [False] * len(sequence)
    for index, name in enumerate(sequence):
        if name in cache:
            hits[index] = True
        elif len(cache) >= capacity:
            del cache[max(cache, key=cache.__getitem__)]
        cache[name] = next_use[index]
    return hits


def belady_hit_fraction(requests: list[TraceRequest], capacity: int) -> float:
    """Hit fraction of one clairvoyant cache holding the whole pool's warm capacity.

    Base models and adapters each get ``capacity`` entries and Belady's MIN replacement; a
    request hits when its model and all its adapters hit. This is a reference for how much
    reuse the trace holds, not a bound that any dispatch policy must respect.
    """
    model_hits = _belady_hits([request.model for request in requests], capacity)
    owners = [index for index, request in enumerate(requests) for _ in request.adapters]
    adapter_hits = _belady_hits(
        [adapter for request in requests for adapter in request.adapters], capacity)
    hits = list(model_hits)
    for owner, hit in zip(owners, adapter_hits, strict=True):
        hits[owner] = hits[owner] and hit
    return sum(hits) / len(requests)


def run_affinity(args: argparse.Namespace) -> dict[str, Any]:
    requests = read_trace(args.trace, args.requests)
    costs = LoadCosts(model_load_s=args.model_load_s, adapter_load_s=args.adapter_load_s)
    mean_service_s = sum(request.service_s for request in requests) / len(requests)
    rate_per_s = args.utilization * args.workers / mean_service_s
    arrivals = random.Random(args.seed)
    arrivals_s: list[float] = []
    clock = 0.0
    for _ in requests:
        clock += arrivals.expovariate(rate_per_s)
        arrivals_s.append(clock)

    pickers: dict[str, Picker] = {
        "random": random_picker(random.Random(args.seed)),
        "affinity": affinity_picker(costs, wait=True),
        "affinity_no_wait": affinity_picker(costs, wait=False),
    }
    results: dict[str, Any] = {
        name: simulate_pool(requests, picker, args, arrivals_s, costs)
        for name, picker in pickers.items()
    }
    counts = Counter(request.model for request in requests)
    results["pool_wide_belady_hit_fraction"] = belady_hit_fraction(
        requests, args.workers * args.warm_models)
    results["top_3_model_share"] = sum(count for _, count in counts.most_common(3)) / len(
        requests)
    results["requests"] = len(requests)
    results["distinct_models"] = len({request.model for request in requests})
    results["distinct_adapters"] = len({a for request in requests for a in request.adapters})
    results["arrival_rate_per_s"] = rate_per_s
    results["mean_service_s"] = mean_service_s
    return results


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = os.getloadavg()[0]
    by_dtype = run_batching(args)
    default_dtype = args.cpu_dtypes.split(",")[0]
    batching = by_dtype[default_dtype]
    affinity = run_affinity(args)
    hit_ratio = (affinity["affinity"]["warm_hit_fraction"]
                 / max(affinity["random"]["warm_hit_fraction"], 1e-9))
    return {
        "batching": batching,
        "batching_summary": summarize_batching(batching),
        "batching_dtype": default_dtype,
        "batching_by_dtype": {name: {"batching": results, "summary": summarize_batching(results)}
                              for name, results in by_dtype.items()},
        "affinity": affinity,
        "affinity_summary": {"warm_hit_ratio_vs_random": hit_ratio,
                             "target_met": hit_ratio >= WARM_HIT_TARGET},
        "setup": {
            "command": REPRODUCE,
            "parameters": {key: str(value) if isinstance(value, Path) else value
                           for key, value in vars(args).items()
                           if key not in ("handler", "out", "suite", "command")},
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                # Other processes on the machine slow the runs; the ratios compare runs that
                # shared it alike, because batch sizes alternate in rounds.
                "load_average_1m": [load_at_start, os.getloadavg()[0]],
            },
            "versions": {package: _version(package) for package in ("torch", "diffusers")},
            "batching_workload": "random-weight UNet2DModel DDIM pipeline on the CPU, one "
                                 "pipeline call at a time",
            "affinity_workload": "FIFO queue, Poisson arrivals, one slot per worker, "
                                 "service time from exec_time_seconds plus load time; warm "
                                 "sets are LRU per worker, base models and adapters apart",
        },
    }


def _shared_machine_note(machine: dict[str, Any]) -> list[str]:
    """State how busy the machine was when the run recorded its load average."""
    load = machine.get("load_average_1m")
    if not load:
        return []
    shared = " It was shared with other jobs." if max(load) > machine["cpus"] else ""
    return ["", f"The 1-minute load average was {load[0]:.1f} at the start and {load[1]:.1f} "
                f"at the end, on {machine['cpus']} CPUs.{shared}"]


def render_markdown(results: dict[str, Any]) -> str:
    setup = results["setup"]
    parameters = setup["parameters"]
    affinity = results["affinity"]
    affinity_summary = results["affinity_summary"]

    def verdict(met: bool) -> str:
        return "met" if met else "not met"

    lines = [
        "## GPU worker: dynamic batching and model affinity",
        "",
        "### Batching (CPU, small random-weight pipeline)",
        "",
        f"{parameters['attempts']} attempts of {parameters['steps']} steps at "
        f"{parameters['side_px']}x{parameters['side_px']} px per batch size, in "
        f"{parameters['rounds']} interleaved rounds whose backlog is submitted at once; "
        f"{setup['batching_workload']}. Latency runs from submission to a ready image.",
        "",
        "| dtype | max batch size | images/s | p50 attempt s | p99 attempt s | batches |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype, measured in results["batching_by_dtype"].items():
        for size, row in measured["batching"].items():
            lines.append(f"| {dtype} | {size} | {row['images_per_s']:.2f} | "
                         f"{row['p50_attempt_s']:.2f} | {row['p99_attempt_s']:.2f} | "
                         f"{row['batches']} |")
    lines.append("")
    for dtype, measured in results["batching_by_dtype"].items():
        summary = measured["summary"]
        default = " (the worker's default, so the target applies)" if (
            dtype == results["batching_dtype"]) else ""
        lines.append(
            f"- {dtype}{default}: best batch size {summary['best_batch_size']} reaches "
            f"{summary['speedup_vs_batch_1']:.2f}x the images/s of batch size 1 with "
            f"{summary['p99_ratio_vs_batch_1']:.2f}x its p99 (target: at least "
            f"{THROUGHPUT_TARGET}x with at most {P99_LIMIT}x p99): "
            f"{verdict(summary['target_met'])}."
        )
    lines += [
        "",
        "The worker runs float64 on the CPU so that a batched image equals the lone one; "
        "float32 kernels round differently at each batch size.",
        "",
        "### Affinity (Alibaba trace, simulated pool)",
        "",
        f"{affinity['requests']} requests ({affinity['distinct_models']} base models, "
        f"{affinity['distinct_adapters']} adapters) over {parameters['workers']} workers, each "
        f"keeping {parameters['warm_models']} base models and {parameters['warm_models']} "
        f"adapters warm; loads take {parameters['model_load_s']} s per base model and "
        f"{parameters['adapter_load_s']} s per adapter; offered load "
        f"{parameters['utilization']} of capacity; {setup['affinity_workload']}.",
        "",
        "| policy | warm hit fraction | load s per attempt | p50 latency s | p99 latency s | "
        "wait decisions |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for policy in ("random", "affinity_no_wait", "affinity"):
        row = affinity[policy]
        lines.append(f"| {policy} | {row['warm_hit_fraction']:.3f} | "
                     f"{row['load_s_per_attempt']:.2f} | {row['p50_latency_s']:.1f} | "
                     f"{row['p99_latency_s']:.1f} | {row['wait_decisions']} |")
    lines += [
        "",
        "`affinity_no_wait` is the coordinator's policy (`pick_affinity`): the free worker "
        "with the least load time, ties broken by rendezvous hashing of the model. "
        "`affinity` (`place`) also keeps a request queued for a busy worker that holds more "
        "of it warm when that worker's slot is expected to free (its load time plus the "
        "trace's mean service time after it started) before the saved load time has passed. "
        "A wait decision counts each time a queued request is left for a busy worker.",
        "",
        f"Affinity reaches {affinity_summary['warm_hit_ratio_vs_random']:.2f}x the warm hit "
        f"fraction of random (target: at least {WARM_HIT_TARGET}x): "
        f"{verdict(affinity_summary['target_met'])}. Random placement already hits "
        f"{affinity['random']['warm_hit_fraction']:.0%} because a few base models dominate "
        f"the trace ({affinity['top_3_model_share']:.0%} of requests use the three most "
        "common), so the target needs a hit fraction of "
        f"{min(1.0, WARM_HIT_TARGET * affinity['random']['warm_hit_fraction']):.0%}. "
        "For scale: one clairvoyant cache holding the whole pool's warm capacity "
        f"({parameters['workers'] * parameters['warm_models']} base models and as many "
        "adapters, Belady's MIN replacement) hits "
        f"{affinity['pool_wide_belady_hit_fraction']:.0%}, while the pool splits that "
        f"capacity into {parameters['workers']} LRU caches, each request runs on one of "
        "them, and no policy here knows future requests. Most remaining misses are base "
        "models: when every worker with a popular model warm is busy, loading it on a free "
        f"worker ({parameters['model_load_s']} s) beats waiting for a slot (mean service "
        f"{affinity['mean_service_s']:.0f} s), so popular models spread over most workers "
        "and push other models out of their three slots.",
        "",
        f"Machine: {setup['machine']['platform']}, {setup['machine']['cpus']} CPUs, Python "
        f"{setup['machine']['python']}; "
        + ", ".join(f"{name} {version}" for name, version in setup["versions"].items()) + ".",
        *_shared_machine_note(setup["machine"]),
        "",
        "Reproduce:",
        "",
        "```",
        setup["command"],
        "```",
        "",
    ]
    return "\n".join(lines)
