"""Compare attempt timeout policies (fixed p99, fixed 3x p50, heartbeat, adaptive) in simulation.

All four policies run the same simulated workload (same seed, same per-attempt draws) in
one process. The fixed baselines take their thresholds from a calibration run of another
seed with no hangs and no kills, so they are tuned to the workload as an operator would
tune them from healthy production data. The adaptive policy starts with an empty
estimator and learns step times online during its run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.simulator import NeverKill, WorkloadConfig, simulate
from streams.step_times import EstimatorConfig, StepTimeEstimator
from streams.timeouts import (
    POLICY_NAMES,
    AdaptiveConfig,
    FixedTimeout,
    HeartbeatTimeout,
    TimeoutPolicy,
    adaptive,
    fixed_3x_p50,
    fixed_p99,
    heartbeat_fixed,
)

FALSE_KILL_TARGET = 0.001
DETECTION_RATIO_TARGET = 0.1
# The heartbeat baseline allows this multiple of the p99.9 of healthy mean step time.
HEARTBEAT_SLACK = 2.0
REPRODUCE = (
    ".venv/bin/slotforge bench timeouts --out bench/results/timeouts.json\n"
    ".venv/bin/python -m bench.render"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WorkloadConfig()
    parser.add_argument("--attempts", type=int, default=defaults.attempts,
                        help="first attempts to simulate per policy (retries come on top)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the measured workload; calibration uses seed + 1")
    parser.add_argument("--devices", type=int, default=defaults.devices,
                        help="simulated GPU devices")
    parser.add_argument("--slots-per-device", type=int, default=defaults.slots_per_device,
                        help="attempts one device runs at once")
    parser.add_argument("--hang-fraction", type=float, default=defaults.hang_fraction,
                        help="fraction of attempts that hang at a random step")
    parser.add_argument("--deadline-s", type=float, default=defaults.deadline_s,
                        help="job deadline in seconds after arrival")


def _calibrate(config: WorkloadConfig) -> dict[str, float]:
    """Measure healthy attempt durations on another seed, with no hangs and no kills."""
    calibration = dataclasses.replace(config, seed=config.seed + 1, hang_fraction=0.0)
    result = simulate(calibration, NeverKill())
    durations_s = np.asarray(result.healthy_duration_s)
    mean_steps_s = np.asarray(result.healthy_mean_step_s)
    service_s = np.asarray(result.service_s)
    return {
        "seed": calibration.seed,
        "attempts": result.attempts,
        "duration_p50_s": float(np.quantile(durations_s, 0.5)),
        "duration_p99_s": float(np.quantile(durations_s, 0.99)),
        "mean_step_p999_s": float(np.quantile(mean_steps_s, 0.999)),
        "service_p50_s": float(np.quantile(service_s, 0.5)),
        "service_p99_over_p50": float(
            np.quantile(service_s, 0.99) / np.quantile(service_s, 0.5)
        ),
    }


def _build_policies(
    calibration: dict[str, float],
) -> list[tuple[TimeoutPolicy, StepTimeEstimator | None]]:
    estimator = StepTimeEstimator()
    policies: list[tuple[TimeoutPolicy, StepTimeEstimator | None]] = [
        (fixed_p99(calibration["duration_p99_s"]), None),
        (fixed_3x_p50(calibration["duration_p50_s"]), None),
        (heartbeat_fixed(HEARTBEAT_SLACK * calibration["mean_step_p999_s"]), None),
        (adaptive(estimator), estimator),
    ]
    assert tuple(policy.name for policy, _ in policies) == POLICY_NAMES
    return policies


def _targets(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    adaptive_result = results["adaptive"]
    baseline_detection_s = results["fixed_p99"]["mean_hang_detection_s"]
    detection_s = adaptive_result["mean_hang_detection_s"]
    ratio = None
    if detection_s is not None and baseline_detection_s:
        ratio = detection_s / baseline_detection_s
    return [
        {
            "name": "adaptive false_kill_fraction",
            "limit": f"<= {FALSE_KILL_TARGET}",
            "measured": adaptive_result["false_kill_fraction"],
            "met": adaptive_result["false_kill_fraction"] <= FALSE_KILL_TARGET,
        },
        {
            "name": "adaptive mean_hang_detection_s / fixed_p99 mean_hang_detection_s",
            "limit": f"<= {DETECTION_RATIO_TARGET}",
            "measured": ratio,
            "met": ratio is not None and ratio <= DETECTION_RATIO_TARGET,
        },
    ]


def run(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate the baselines, simulate every policy and write the results JSON to ``out``."""
    config = WorkloadConfig(
        attempts=args.attempts,
        seed=args.seed,
        devices=args.devices,
        slots_per_device=args.slots_per_device,
        hang_fraction=args.hang_fraction,
        deadline_s=args.deadline_s,
    )
    config.validate()

    started = time.perf_counter()
    calibration = _calibrate(config)
    calibration["wall_s"] = time.perf_counter() - started
    # Progress goes to stderr because a full run takes about a minute and stdout is the page.
    print(f"calibrated on seed {calibration['seed']} in {calibration['wall_s']:.1f} s",  # noqa: T201
          file=sys.stderr)

    results: dict[str, dict[str, Any]] = {}
    thresholds: dict[str, float] = {}
    for policy, estimator in _build_policies(calibration):
        started = time.perf_counter()
        result = simulate(config, policy, estimator)
        wall_s = time.perf_counter() - started
        summary = result.summary()
        summary["simulator_wall_s"] = wall_s
        summary["simulated_attempts_per_s"] = result.attempts / wall_s
        results[policy.name] = summary
        if isinstance(policy, FixedTimeout):
            thresholds[policy.name] = float(policy.timeout_s)
        elif isinstance(policy, HeartbeatTimeout):
            thresholds[policy.name] = float(policy.silence_s)
        print(f"simulated {policy.name}: {result.attempts} attempts in {wall_s:.1f} s",  # noqa: T201
              file=sys.stderr)

    report = {
        "results": results,
        "targets": _targets(results),
        "setup": {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "versions": {
                name: importlib.metadata.version(name)
                for name in ("slotforge", "ddsketch", "numpy", "protobuf")
            },
            "seed": config.seed,
            "workload": dataclasses.asdict(config),
            "service_sigma": config.service_sigma,
            "calibration": calibration,
            "baseline_thresholds_s": thresholds,
            "heartbeat_slack": HEARTBEAT_SLACK,
            "adaptive": dataclasses.asdict(AdaptiveConfig()),
            "estimator": dataclasses.asdict(EstimatorConfig()),
            "reproduce": REPRODUCE,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and abs(value) < 0.01 and value != 0.0:
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=92, break_on_hyphens=False, break_long_words=False)


def render_markdown(results: dict[str, Any]) -> str:
    """Render the timeouts section of docs/benchmarks.md."""
    setup = results["setup"]
    ordered = [
        (name, results["results"][name]) for name in POLICY_NAMES if name in results["results"]
    ]
    lines = ["## Timeouts", ""]
    for paragraph in _setup_paragraphs(setup):
        lines += [_wrap(paragraph), ""]

    lines += _results_table(ordered)
    lines += ["", "Targets for the adaptive policy:", ""]
    for target in results["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(
            f"- {target['name']} {target['limit']}: measured "
            f"{_number(target['measured'], 4)}, {verdict}."
        )
    lines.append("")

    for paragraph in _limit_paragraphs(setup, ordered):
        lines += [_wrap(paragraph), ""]
    lines += ["Reproduce:", "", "```", setup["reproduce"], "```", ""]
    return "\n".join(lines)


def _setup_paragraphs(setup: dict[str, Any]) -> list[str]:
    workload = setup["workload"]
    calibration = setup["calibration"]
    thresholds = setup["baseline_thresholds_s"]
    return [
        "Attempt timeout policies on a simulated GPU pool: "
        f"{workload['devices']} devices with {workload['slots_per_device']} slots each, "
        f"step time up to {workload['max_slowdown']:g}x slower when all slots are busy, "
        f"lognormal service time alone on a device (median {workload['service_p50_s']:g} s, "
        f"p99/p50 {workload['service_p99_over_p50']:g}, sigma {setup['service_sigma']:.2f}, "
        f"measured p99/p50 {calibration['service_p99_over_p50']:.2f} in calibration), "
        f"{workload['hang_fraction']:.0%} of attempts hanging at a random step, "
        f"a {workload['deadline_s']:g} s job deadline and at most "
        f"{workload['max_attempts_per_slot']} attempts per slot. Load alternates every "
        f"{workload['phase_s']:g} s between {workload['busy_load']:.0%} and "
        f"{workload['quiet_load']:.0%} of full-concurrency capacity. Seed {setup['seed']}, "
        f"{workload['attempts']} first attempts per policy, with retries on top.",
        "Baseline thresholds come from a calibration run on seed "
        f"{calibration['seed']} with no hangs: fixed_p99 kills after "
        f"{_number(thresholds.get('fixed_p99'), 1)} s (p99 of healthy duration), "
        f"fixed_3x_p50 after {_number(thresholds.get('fixed_3x_p50'), 1)} s, and "
        f"heartbeat_fixed after {_number(thresholds.get('heartbeat_fixed'), 1)} s without "
        f"progress ({setup['heartbeat_slack']:g}x the p99.9 of healthy mean step time). "
        "The adaptive policy starts from an empty estimator and learns during the run.",
        "A false kill is a kill of an attempt that was not hung and whose remaining work, "
        "run alone on a device, would still have finished before its job deadline. Hang "
        "detection runs from the moment an attempt stops progressing to its release, by a "
        "kill or by its job's deadline. A hung attempt killed before it reached its hang "
        "point counts as 0 s. Wasted GPU is the slot time of attempts that produced no "
        "result, over all slot time, where a hung attempt holds its slot without computing. "
        "A job that did not fill every slot counts as taking its whole deadline in p99 job.",
    ]


def _results_table(ordered: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = [
        "| policy | false kills | hangs killed | mean hang detection (s) "
        "| p99 hang detection (s) | wasted GPU | p99 job (s) | jobs completed | attempts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, item in ordered:
        lines.append(
            f"| {name} | {_number(item['false_kill_fraction'], 4)} "
            f"| {_number(item['hangs_killed_fraction'], 3)} "
            f"| {_number(item['mean_hang_detection_s'], 1)} "
            f"| {_number(item['p99_hang_detection_s'], 1)} "
            f"| {_number(item['wasted_gpu_fraction'], 3)} "
            f"| {_number(item['p99_job_s'], 1)} "
            f"| {_number(item['jobs_completed_fraction'], 4)} "
            f"| {item['attempts']} |"
        )
    return lines


def _limit_paragraphs(
    setup: dict[str, Any], ordered: list[tuple[str, dict[str, Any]]]
) -> list[str]:
    machine = setup["machine"]
    wall = ", ".join(f"{name} {item['simulator_wall_s']:.1f} s" for name, item in ordered)
    shares = dict(ordered).get("adaptive", {}).get("slot_time_by_concurrency", {})
    levels = ", ".join(f"{level}: {share:.0%}" for level, share in shares.items())
    return [
        f"Share of slot time by concurrency level in the adaptive run: {levels}.",
        f"Simulator wall time per policy: {wall} (Python {machine['python']}, "
        f"{machine['cpus']} CPUs, {machine['platform']}). Other work shares this machine, "
        "so wall times are only comparable within one run.",
        "Limits of the model: concurrency comes from least-loaded placement of one FIFO "
        "queue. Steps of one attempt differ only by a lognormal jitter of sigma "
        f"{setup['workload']['step_jitter_sigma']:g}. There is no warm-up before the first "
        "step and no decode time after the last. Progress reaches the policy as coalesced "
        "reports at each check and concurrency change, with no delivery delay.",
    ]
