"""The racing benchmark: its metrics on hand-made events, and a tiny run on the real pipeline."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from bench import racing
from bench.pipeline_run import AttemptLog, JobOutcome, duplicate_executions
from bench.racing_sim import (
    RacingSimulation,
    SimConfig,
    last_report_step,
    pooled_metrics,
    replicate_schedule,
)
from infra.kafka_broker import KafkaBroker
from schemas.events import (
    AttemptDispatched,
    AttemptFinished,
    AttemptStarted,
    AttemptStatus,
    GenerationParams,
    JobCompleted,
    JobRequested,
    JobStatus,
    SlotResult,
    Tier,
)
from streams.racing import RacingPolicy
from streams.trace_replay import TraceRequest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _started(attempt_id: str, worker_id: str, at_s: float, epoch: int = 1) -> AttemptStarted:
    return AttemptStarted(attempt_id=attempt_id, job_id="job", job_key="k", epoch=epoch,
                          worker_id=worker_id, started_at=T0 + timedelta(seconds=at_s))


def _finished(attempt_id: str, worker_id: str, at_s: float, gpu_s: float, epoch: int = 1,
              status: AttemptStatus = AttemptStatus.SUCCEEDED) -> AttemptFinished:
    return AttemptFinished(attempt_id=attempt_id, job_id="job", job_key="k", epoch=epoch,
                           worker_id=worker_id, status=status, slot=0, gpu_s=gpu_s,
                           emitted_at=T0 + timedelta(seconds=at_s))


def _dispatched(attempt_id: str, at_s: float, followup: bool = False,
                epoch: int = 1) -> AttemptDispatched:
    return AttemptDispatched(
        attempt_id=attempt_id, job_id="job", job_key="k", tenant_id="t", slot=0, attempt_no=1,
        epoch=epoch, params=GenerationParams(model="M0", prompt="p", steps=4), seed=1,
        tier=Tier.STANDARD, dispatched_at=T0 + timedelta(seconds=at_s),
        deadline_at=T0 + timedelta(seconds=60), followup=followup)


def _row(user: str, arrival_s: float = 0.0, slots: int = 1) -> TraceRequest:
    return TraceRequest(arrival_s=arrival_s, user=user, model="M0", steps=30, slots=slots,
                        prompt_length=40, negative_prompt_length=0, predict_type="TXT_2_IMG",
                        exec_time_s=1.0)


def test_duplicates_none_for_sequential_runs() -> None:
    # A re-dispatch after the first run ended is a retry, not a duplicate.
    log = AttemptLog(
        started=[_started("a-1", "w1", 0.0), _started("a-1", "w2", 2.0, epoch=2)],
        finished=[_finished("a-1", "w1", 1.0, 1.0), _finished("a-1", "w2", 3.0, 1.0, epoch=2)],
    )

    assert duplicate_executions(log) == []


def test_duplicates_same_epoch_two_workers() -> None:
    log = AttemptLog(
        started=[_started("a-1", "w1", 0.0), _started("a-1", "w2", 5.0)],
        finished=[_finished("a-1", "w1", 1.0, 1.0), _finished("a-1", "w2", 6.0, 1.0)],
    )

    [duplicate] = duplicate_executions(log)
    assert duplicate.same_epoch
    assert not duplicate.overlapping
    assert duplicate.workers == ("w1", "w2")


def test_duplicates_overlap_across_epochs() -> None:
    # The first worker never reported a finish, so it counts as running to the end.
    log = AttemptLog(
        started=[_started("a-1", "w1", 0.0), _started("a-1", "w2", 2.0, epoch=2)],
        finished=[_finished("a-1", "w2", 3.0, 1.0, epoch=2)],
    )

    [duplicate] = duplicate_executions(log)
    assert duplicate.overlapping
    assert not duplicate.same_epoch


def test_queue_waits_split_by_kind() -> None:
    # The re-dispatch under epoch 2 waits from its own dispatch, and the attempt that
    # never started has no wait.
    log = AttemptLog(
        dispatched=[_dispatched("a-1", 0.0), _dispatched("a-2", 0.0),
                    _dispatched("a-3", 1.0, followup=True),
                    _dispatched("a-3", 4.0, followup=True, epoch=2),
                    _dispatched("a-4", 1.0, followup=True)],
        started=[_started("a-1", "w1", 0.1), _started("a-2", "w2", 0.3),
                 _started("a-3", "w1", 1.5), _started("a-3", "w2", 4.2, epoch=2),
                 _started("a-3", "w1", 6.0, epoch=2)],
    )

    waits = racing.queue_waits(log)

    assert waits["first"]["count"] == 2
    assert waits["first"]["max_ms"] == pytest.approx(300.0)
    assert waits["followup"]["count"] == 2
    assert waits["followup"]["max_ms"] == pytest.approx(500.0)
    assert waits["followup"]["p50_ms"] == pytest.approx(350.0)


def test_slowest_jobs_describe_tail() -> None:
    completed = JobCompleted(
        job_id="job", job_key="k", tenant_id="t", user_id="u", status=JobStatus.COMPLETED,
        requested_slots=1, attempts=2, tier=Tier.STANDARD, requested_at=T0,
        slots=[SlotResult(slot=0, attempt_id="a-2", artifact_uri="file:///x", score=0.4,
                          fallback=True)],
    )
    slow = JobOutcome("job", 1, submitted_s=0.0, ended_s=5.0, status="completed",
                      completed=completed)
    fast = JobOutcome("other", 1, submitted_s=0.0, ended_s=1.0, status="completed")
    log = AttemptLog(
        dispatched=[_dispatched("a-1", 0.0), _dispatched("a-2", 1.0, followup=True)],
        started=[_started("a-1", "w1", 0.2), _started("a-2", "w1", 3.0)],
    )

    [first, second] = racing.slowest_jobs([fast, slow], log, count=2)

    assert first["job_id"] == "job"
    assert first["attempts_dispatched"] == 2
    assert first["followups_dispatched"] == 1
    assert first["fallback_slots"] == 1
    assert first["max_queue_wait_ms"] == pytest.approx(2000.0)
    assert second["job_id"] == "other"
    assert second["attempts_charged"] is None


def test_run_metrics_gpu_accounting() -> None:
    completed = JobCompleted(
        job_id="job", job_key="k", tenant_id="t", user_id="u", status=JobStatus.COMPLETED,
        requested_slots=1, attempts=3, tier=Tier.STANDARD, requested_at=T0,
        slots=[SlotResult(slot=0, attempt_id="a-2", artifact_uri="file:///x", score=0.9)],
    )
    outcome = JobOutcome("job", 1, submitted_s=0.0, ended_s=2.0, status="completed",
                         completed=completed)
    log = AttemptLog(
        started=[_started("a-1", "w1", 0.0), _started("a-2", "w2", 0.0),
                 _started("a-3", "w1", 0.5)],
        finished=[
            _finished("a-1", "w1", 1.0, 1.0),
            _finished("a-2", "w2", 1.5, 1.5),
            _finished("a-3", "w1", 1.0, 0.5, status=AttemptStatus.CANCELLED),
        ],
    )

    metrics = racing.run_metrics([outcome], log)

    assert metrics["gpu_s"] == pytest.approx(3.0)
    assert metrics["gpu_s_per_delivered_slot"] == pytest.approx(3.0)
    assert metrics["wasted_gpu_fraction"] == pytest.approx(0.5)
    assert metrics["p50_job_s"] == pytest.approx(2.0)
    assert metrics["duplicate_executions"] == 0
    assert metrics["completed"] == 1


def test_regeneration_flags_repeat_keys() -> None:
    rows = [_row("G1"), _row("G2"), _row("G1"), _row("G1")]

    assert racing.regeneration_flags(rows) == [False, False, True, True]


def test_representative_stretch_matches_share() -> None:
    # Stretch 0 has no repeats, stretch 1 has the whole trace's share of repeats.
    trace = [_row(f"U{index}") for index in range(4)] + [_row("R"), _row("R"), _row("S"),
                                                         _row("T")]

    start, share = racing.representative_stretch(trace, 4)

    assert share == pytest.approx(1 / 8)
    assert start == 0 or racing.regeneration_flags(trace[start:start + 4]).count(True) == 1


def test_job_seed_is_stable() -> None:
    assert racing.job_seed(7, 3) == racing.job_seed(7, 3)
    assert racing.job_seed(7, 3) != racing.job_seed(7, 4)


SIM = SimConfig(replicates=2)


def _sim_schedule(jobs: int = 12, window_s: float = 4.0, replicate: int = 0
                  ) -> list[tuple[float, JobRequested]]:
    rows = [_row(f"U{index}", arrival_s=float(index)) for index in range(jobs)]
    return replicate_schedule(rows, window_s, replicate, SIM, racing.job_seed)


@pytest.mark.parametrize("policy", list(RacingPolicy))
def test_simulation_ends_every_job(policy: RacingPolicy) -> None:
    result = RacingSimulation(SIM, policy, _sim_schedule()).run()

    assert len(result.statuses) == 12
    assert set(result.statuses) <= {"completed", "partial", "failed"}
    assert len(result.latencies_s) == 12
    assert min(result.latencies_s) > 0
    assert result.delivered_slots == 12 * SIM.slots_per_job
    assert result.duplicate_executions == 0
    assert 0 < result.useful_gpu_s <= result.gpu_s
    assert result.attempts_started <= sum(result.attempts_per_job)


def test_simulation_repeats_for_same_seeds() -> None:
    first = RacingSimulation(SIM, RacingPolicy.ADAPTIVE, _sim_schedule()).run()
    second = RacingSimulation(SIM, RacingPolicy.ADAPTIVE, _sim_schedule()).run()
    other = RacingSimulation(SIM, RacingPolicy.ADAPTIVE, _sim_schedule(replicate=1)).run()

    assert first == second
    assert first.latencies_s != other.latencies_s


def test_simulated_sequential_never_cancels() -> None:
    result = RacingSimulation(SIM, RacingPolicy.SEQUENTIAL, _sim_schedule()).run()

    assert result.cancel_reasons == {}
    assert result.attempts_started == sum(result.attempts_per_job)


def test_simulated_adaptive_replaces_stragglers() -> None:
    # Enough jobs that the typical service time is known before most attempts start.
    result = RacingSimulation(SIM, RacingPolicy.ADAPTIVE, _sim_schedule(jobs=40)).run()

    # Workers stop the stragglers they judge. The flight replaces the others.
    assert result.cancel_reasons.get("straggler stopped by its worker", 0) > 0
    assert result.cancel_reasons.get("slots filled", 0) > 0


def test_simulated_report_steps() -> None:
    # 0.1 s steps against a 0.25 s interval: reports at steps 1, 4, 7, ...
    assert [last_report_step(done, 0.1, 30, 0.25, None) for done in (0, 1, 3, 4, 8)] == \
        [0, 1, 1, 4, 7]
    # 27 steps of 0.1 s are left after step 3, past a 2 s threshold: step 3 reports.
    assert last_report_step(3, 0.1, 30, 0.25, 2.0) == 3
    assert last_report_step(3, 0.1, 30, 0.25, 3.0) == 1
    assert last_report_step(2, 0.1, 30, 0.25, 2.0) == 1


def test_pooled_metrics_spread_per_group() -> None:
    runs = [RacingSimulation(SIM, RacingPolicy.FIXED_RACE, _sim_schedule(replicate=index)).run()
            for index in range(4)]

    metrics = pooled_metrics(runs, groups=2)

    assert metrics["jobs"] == 48
    assert metrics["completed"] + metrics["partial"] + metrics["failed"] == 48
    assert len(metrics["p99_job_s_spread"]) == 2
    assert metrics["p99_job_s"] >= metrics["p50_job_s"]
    assert metrics["gpu_s_per_delivered_slot"] == pytest.approx(
        metrics["gpu_s"] / metrics["delivered_slots"])
    assert metrics["duplicate_executions"] == 0


def _write_trace(path: Path, rows: int) -> None:
    lines = ["gmt_create,predict_type,predict_status,exec_time_seconds,groupId,prompt_length,"
             "negative_prompt_length,num_images_per_prompt,num_inference_steps,"
             "checkpoint_model_version_id,num_lora"]
    lines += [f"2024-11-15 16:57:{index:02d},TXT_2_IMG,SUCCEED,30.0,G{index:04d},60.0,,1.0,"
              "30.0,M0000,0" for index in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_simulated_only_keeps_real_results(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    _write_trace(trace, 8)
    out = tmp_path / "racing.json"
    out.write_text(json.dumps({"results": {"load_1.0": {}}, "cache": {"requests": 3}}))
    parser = argparse.ArgumentParser()
    racing.add_arguments(parser)
    args = parser.parse_args(["--simulated-only", "--jobs", "6", "--loads", "1.0",
                              "--sim-replicates", "2", "--trace", str(trace)])

    report = racing.run(out, args)

    assert json.loads(out.read_text()) == report
    assert report["results"] == {"load_1.0": {}}
    assert report["cache"] == {"requests": 3}
    simulated = report["simulated"]
    assert set(simulated["results"]["load_1.0"]) == set(racing.POLICIES)
    assert simulated["results"]["load_1.0"]["adaptive"]["jobs"] == 12
    assert any(target["name"].startswith("load_1.0") for target in simulated["targets"])


def test_simulated_section_rendered(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    _write_trace(trace, 8)
    parser = argparse.ArgumentParser()
    racing.add_arguments(parser)
    config = racing.RacingConfig.from_args(parser.parse_args(
        ["--jobs", "6", "--loads", "0.5", "--sim-replicates", "2", "--trace", str(trace)]))

    simulated = racing.run_simulated(config, racing.load_trace(trace))
    lines = racing._simulated_section(simulated)

    assert "### Racing, simulated" in lines
    assert any(line.startswith("| 0.5 | adaptive | 12 |") for line in lines)
    assert any("--simulated-only" in line for line in lines)


@pytest.mark.slow
@pytest.mark.integration
def test_racing_suite_smoke(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    racing.add_arguments(parser)
    args = parser.parse_args([
        "--jobs", "4", "--loads", "1.5", "--cache-requests", "6", "--sim-replicates", "2",
        "--work-dir", str(tmp_path / "work"),
        "--bootstrap-servers", kafka_broker.bootstrap_servers,
    ])
    out = tmp_path / "racing.json"

    report = racing.run(out, args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) >= {"results", "cache", "setup"}
    assert set(report["results"]) == {"load_1.5"}
    assert set(report["results"]["load_1.5"]) == set(racing.POLICIES)
    for policy, item in report["results"]["load_1.5"].items():
        assert item["jobs"] == 4, policy
        assert item["completed"] + item["partial"] + item["failed"] == 4, policy
        assert item["timed_out"] == 0, policy
        assert item["duplicate_executions"] == 0, policy
        assert item["delivered_slots"] > 0, policy
        for metric in ("p50_job_s", "p99_job_s", "gpu_s_per_delivered_slot",
                       "wasted_gpu_fraction", "fallback_slots"):
            assert item[metric] is not None, (policy, metric)

    cache = report["cache"]
    assert cache["requests"] == 6
    assert cache["completed"] + cache["partial"] + cache["failed"] == 6
    assert cache["timed_out"] == 0
    for metric in ("regeneration_requests", "regenerated_slots", "slots_from_cache",
                   "p50_cached_slot_ms"):
        assert metric in cache

    setup = report["setup"]
    assert setup["cpu_count"] >= 1
    assert setup["kafka"] != "unknown"
    assert "slotforge bench racing" in setup["commands"]["reproduce"]
    assert set(report["simulated"]["results"]["load_1.5"]) == set(racing.POLICIES)
    page = racing.render_markdown(report)
    assert "## Racing" in page
    assert "| 1.5 | adaptive |" in page
    assert "### Racing, simulated" in page


@pytest.mark.slow
@pytest.mark.integration
def test_sigterm_stops_suite_processes(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "streams.cli", "bench", "racing",
               "--jobs", "40", "--loads", "0.5", "--cache-requests", "2",
               "--sim-replicates", "1", "--work-dir", str(tmp_path / "work"),
               "--bootstrap-servers", kafka_broker.bootstrap_servers,
               "--out", str(tmp_path / "racing.json")]
    suite = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    alive: list[psutil.Process] = []
    try:
        parent = psutil.Process(suite.pid)
        deadline = time.monotonic() + 120.0
        # The signal must land in the middle of a run, once its services are up.
        while len(parent.children(recursive=True)) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        children = parent.children(recursive=True)
        assert len(children) >= 4, "the suite never started its services"

        suite.send_signal(signal.SIGTERM)
        suite.wait(timeout=120.0)
        _, alive = psutil.wait_procs(children, timeout=30.0)
    finally:
        if suite.poll() is None:
            suite.kill()
            suite.wait()
        # A failing run must not leave services behind for the rest of the session.
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()

    assert suite.returncode == 128 + signal.SIGTERM
    assert alive == []
    assert not (tmp_path / "racing.json").exists()
