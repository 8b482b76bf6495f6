"""Helpers every benchmark suite shares: the broker, the job schedule, progress and page text."""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from infra.kafka_broker import KafkaBroker
from schemas.errors import SlotforgeError
from schemas.events import MAX_PROMPT_CHARS, JobRequested
from streams.trace_replay import TraceRequest, to_job_request


class BenchArgumentError(SlotforgeError, ValueError):
    """An invalid benchmark argument, rejected before any broker or service starts."""


@contextlib.contextmanager
def local_broker(work_dir: Path, bootstrap_servers: str | None) -> Iterator[str]:
    """Yield ``bootstrap_servers`` when given, else start a broker under ``work_dir``."""
    if bootstrap_servers:
        yield bootstrap_servers
        return
    broker = KafkaBroker(work_dir / "kafka")
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


# Arguments naming this machine's folders or broker, which a rerun picks for itself.
LOCAL_ARGUMENTS = frozenset({"--out", "--work-dir", "--bootstrap-servers"})


def reproduce_command(argv: Sequence[str] | None, results_path: str, default: str) -> str:
    """Return the commands that repeat a recorded run and render the page again.

    ``argv`` is the run's command line, from ``slotforge`` on. Its own arguments are kept,
    apart from local folders and brokers, and the results go to ``results_path``. A run not
    started as ``slotforge bench``, such as one from a test, gives ``default``.
    """
    if not argv or list(argv[1:2]) != ["bench"]:
        return default
    arguments: list[str] = []
    skip_value = False
    for argument in argv[1:]:
        if skip_value:
            skip_value = False
            continue
        name, has_value, _ = argument.partition("=")
        # argparse also takes an unambiguous prefix, such as --work for --work-dir.
        if len(name) > 2 and name.startswith("--") and \
                any(option.startswith(name) for option in LOCAL_ARGUMENTS):
            skip_value = not has_value
            continue
        arguments.append(shlex.quote(argument))
    return (f".venv/bin/slotforge {' '.join(arguments)} --out {results_path}\n"
            ".venv/bin/python -m bench.render")


def run_commands(results_path: str, default: str) -> dict[str, Any]:
    """Return the ``commands`` record of this run: its command line and the Reproduce lines."""
    argv = ["slotforge", *sys.argv[1:]]
    return {"reproduce": reproduce_command(argv, results_path, default), "argv": argv}


def progress(message: str) -> None:
    # Progress goes to stderr because a suite runs for minutes and stdout is the page.
    print(message, file=sys.stderr, flush=True)  # noqa: T201


def job_seed(seed: int, index: int) -> int:
    """Return the index-th job's seed, equal across runs so attempts draw alike."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def unique_job_schedule(rows: Sequence[TraceRequest], *, tenant_id: str, deadline_s: float,
                        slots: int, seed: int) -> list[tuple[float, JobRequested]]:
    """Build jobs of ``slots`` slots at the trace's arrivals, each with its own prompt and seed.

    A unique prompt gives every job its own cache key, so neither the cache nor sharing
    attempts between identical jobs mixes into a comparison.
    """
    schedule = []
    for index, row in enumerate(rows):
        request = to_job_request(row, tenant_id=tenant_id, deadline_s=deadline_s)
        prompt = f"job {index}: {request.params.prompt}"[:MAX_PROMPT_CHARS]
        params = request.params.model_copy(update={"prompt": prompt})
        schedule.append((row.arrival_s, request.model_copy(update={
            "params": params, "slots": slots, "seed": job_seed(seed, index),
        })))
    return schedule


def git_state() -> dict[str, Any]:
    """Return the commit the suite ran on and the pipeline files changed since."""
    def git(*arguments: str) -> str:
        result = subprocess.run(["git", *arguments], capture_output=True, text=True,
                                check=False)
        return result.stdout if result.returncode == 0 else ""

    # Porcelain lines are "XY path", and the status column X may be a space.
    changed = git("status", "--porcelain", "--", "streams", "gpu_inference", "schemas")
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown",
            "uncommitted_pipeline_files": [line[3:] for line in changed.splitlines()
                                           if len(line) > 3]}


def format_number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, width=92, break_on_hyphens=False, break_long_words=False)


def machine_paragraph(setup: dict[str, Any], *, software: str = "", compare: str) -> str:
    """Describe the machine, versions, commit and duration of a suite's run for its page.

    ``software`` names versions beyond Kafka and the Python packages; ``compare`` names
    the numbers to compare, because other work shares the machines these run on.
    """
    machine = setup["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    source = setup["source"]
    changed = (f", with uncommitted changes to {', '.join(source['uncommitted_pipeline_files'])}"
               if source["uncommitted_pipeline_files"] else "")
    extra = f"{software}, " if software else ""
    return (
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, Python {machine['python']}, "
        f"Kafka {setup['kafka']}, {extra}{packages}; commit {source['commit'][:12]}{changed}. "
        f"The suite took {setup['wall_s'] / 60:.1f} minutes. Other work shared the machine, "
        f"so {compare}."
    )
