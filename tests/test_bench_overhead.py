"""The overhead benchmark: hop timing and profile summary on hand-made data, and a tiny run."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench import overhead
from bench.pipeline_run import AttemptLog, JobOutcome
from infra.kafka_broker import KafkaBroker
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStarted,
    AttemptStatus,
    DeliveryAck,
    GenerationParams,
    JobCompleted,
    JobStatus,
    ResultScored,
    SlotResult,
    Tier,
)
from streams import cli

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def _completed(job_id: str, attempts: list[str], done_ms: float) -> JobCompleted:
    return JobCompleted(
        job_id=job_id, job_key="k", tenant_id="t", user_id="u", status=JobStatus.COMPLETED,
        requested_slots=len(attempts), attempts=len(attempts), tier=Tier.STANDARD,
        requested_at=T0, completed_at=_at(done_ms),
        slots=[SlotResult(slot=index, attempt_id=attempt, artifact_uri="file:///x", score=0.9)
               for index, attempt in enumerate(attempts)],
    )


def _started(job_id: str, attempt: str, at_ms: float) -> AttemptStarted:
    return AttemptStarted(attempt_id=attempt, job_id=job_id, job_key="k", worker_id="w1",
                          started_at=_at(at_ms))


def _finished(job_id: str, attempt: str, at_ms: float) -> AttemptFinished:
    return AttemptFinished(attempt_id=attempt, job_id=job_id, job_key="k", worker_id="w1",
                           status=AttemptStatus.SUCCEEDED, slot=0, gpu_s=0.0,
                           emitted_at=_at(at_ms))


def test_hop_latencies_from_events() -> None:
    completed = _completed("j1", ["a1", "a2"], done_ms=100.0)
    outcome = JobOutcome("j1", 2, submitted_s=0.0, ended_s=0.1, status="completed",
                         completed=completed)
    events = AttemptLog(
        started=[_started("j1", "a1", 10.0), _started("j1", "a2", 20.0),
                 _started("j1", "a3", 90.0)],
        finished=[_finished("j1", "a1", 40.0), _finished("j1", "a2", 70.0)],
        acks=[DeliveryAck(job_id="j1", job_key="k", consumer="delivery", delivered=True,
                          emitted_at=_at(130.0))],
    )

    hops = overhead.hop_latencies([outcome], events, slots_per_job=2)

    # Only the first K starts count, so the late third attempt is left out.
    assert hops["request_to_claim"] == pytest.approx([10.0, 20.0])
    assert hops["finish_to_fill"] == pytest.approx([30.0])
    assert hops["complete_to_ack"] == pytest.approx([30.0])


def _dispatched(job_id: str, attempt: str, at_ms: float) -> AttemptDispatched:
    return AttemptDispatched(attempt_id=attempt, job_id=job_id, job_key="k", tenant_id="t",
                             slot=0, attempt_no=1, seed=1, tier=Tier.STANDARD,
                             params=GenerationParams(model="m", prompt="p", steps=10),
                             deadline_at=_at(60_000.0), emitted_at=_at(at_ms))


def _scored(job_id: str, attempt: str, at_ms: float) -> ResultScored:
    return ResultScored(attempt_id=attempt, job_id=job_id, job_key="k", slot=0,
                        artifact_uri="file:///x", score=0.9, accepted=True, reason="ok",
                        emitted_at=_at(at_ms))


def test_stage_latencies_split_hops() -> None:
    completed = _completed("j1", ["a1", "a2"], done_ms=100.0)
    outcome = JobOutcome("j1", 2, submitted_s=0.0, ended_s=0.1, status="completed",
                         completed=completed)
    events = AttemptLog(
        dispatched=[_dispatched("j1", "a1", 4.0), _dispatched("j1", "a2", 5.0)],
        started=[_started("j1", "a1", 10.0), _started("j1", "a2", 20.0)],
        finished=[_finished("j1", "a1", 40.0), _finished("j1", "a2", 70.0)],
        scored=[_scored("j1", "a1", 50.0), _scored("j1", "a2", 85.0)],
    )

    stages = overhead.stage_latencies([outcome], events, slots_per_job=2)

    assert stages["request_to_dispatch"] == pytest.approx([4.0, 5.0])
    assert stages["dispatch_to_start"] == pytest.approx([6.0, 15.0])
    # The last delivered attempt, a2, splits finish_to_fill at its verdict.
    assert stages["finish_to_score"] == pytest.approx([15.0])
    assert stages["score_to_fill"] == pytest.approx([15.0])


def test_hop_latencies_skip_unended_jobs() -> None:
    outcome = JobOutcome("j1", 2, submitted_s=0.0)

    hops = overhead.hop_latencies([outcome], AttemptLog(), slots_per_job=2)

    assert all(values == [] for values in hops.values())


def test_summarize_profile_shares(tmp_path: Path) -> None:
    # py-spy names files relative to their sys.path entry.
    profile = tmp_path / "profile.txt"
    profile.write_text(
        "main (streams/coordinator.py:10);validate (pydantic/main.py:5) 3\n"
        "main (streams/coordinator.py:10);write (asyncio/selector_events.py:7) 1\n"
    )

    summary = overhead.summarize_profile(profile)

    assert summary["samples"] == 4
    assert summary["self_by_package"]["pydantic"] == pytest.approx(0.75)
    assert summary["self_by_package"]["stdlib asyncio"] == pytest.approx(0.25)
    assert summary["self_by_function"]["validate (pydantic/main.py)"] == pytest.approx(0.75)
    assert summary["inclusive_project_functions"]["main (streams/coordinator.py)"] == 1.0


def test_summarize_profile_empty(tmp_path: Path) -> None:
    profile = tmp_path / "profile.txt"
    profile.write_text("")

    assert overhead.summarize_profile(profile) == {"samples": 0}


@pytest.mark.skipif(not (Path(sys.executable).parent / "py-spy").exists(),
                    reason="py-spy is installed with the bench extra")
def test_profiler_stops_with_burst(tmp_path: Path) -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: sum(range(1000))"])
    try:
        out = tmp_path / "profile.txt"
        started = time.monotonic()
        profiler = overhead._start_profiler(spinner.pid, 60.0, out)
        assert profiler is not None
        time.sleep(2.0)

        sampled_s = overhead._stop_profiler(profiler, started)
    finally:
        spinner.kill()
        spinner.wait()

    # Stopped long before its 60 s, with the samples written.
    assert sampled_s < 30.0
    assert profiler.returncode == 0
    assert overhead.summarize_profile(out)["samples"] > 0


def test_targets_need_every_hop() -> None:
    results = {
        "hops": {"request_to_claim": {"p99_ms": 10.0}, "finish_to_fill": {"p99_ms": 60.0},
                 "complete_to_ack": {"p99_ms": None}},
        "coordinator_jobs_per_s": 600.0,
    }

    checks = {check["name"]: check["met"] for check in overhead.targets(results)}

    assert checks == {
        "hops.request_to_claim.p99_ms": True,
        "hops.finish_to_fill.p99_ms": False,
        "hops.complete_to_ack.p99_ms": False,
        "coordinator_jobs_per_s": True,
    }


@pytest.mark.slow
@pytest.mark.integration
def test_overhead_suite_smoke(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    overhead.add_arguments(parser)
    args = parser.parse_args([
        "--burst-jobs", "20", "--latency-jobs", "10", "--profile-s", "2",
        "--work-dir", str(tmp_path / "work"),
        "--bootstrap-servers", kafka_broker.bootstrap_servers,
    ])
    out = tmp_path / "overhead.json"

    report = overhead.run(out, args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert set(results["hops"]) == set(overhead.HOPS)
    for name, item in results["hops"].items():
        assert item["samples"] > 0, name
        assert item["p50_ms"] is not None, name
        assert item["p99_ms"] >= item["p50_ms"], name
    assert results["throughput"]["completed"] == 20
    assert results["coordinator_jobs_per_s"] > 0
    assert results["latency_stream"]["ended"] == 10
    assert "coordinator" in results["throughput"]["cpu_share"]
    page = overhead.render_markdown(report)
    assert "## Overhead of the pipeline" in page
    assert "| request_to_claim |" in page


@pytest.mark.parametrize(("flag", "value"), [
    ("--load", "0"), ("--workers", "0"), ("--slots-per-job", "65"), ("--steps", "0"),
])
def test_invalid_argument_one_line(flag: str, value: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["bench", "overhead", "--out", str(tmp_path / "o.json"), flag, value])

    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith(f"slotforge: error: {flag} must be")
    assert "Traceback" not in err
    assert not (tmp_path / "o.json").exists()
