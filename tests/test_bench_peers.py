"""The peers benchmark: its metrics on hand-made runs, the Celery pieces, and a tiny real run."""

from __future__ import annotations

import argparse
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from bench import peers
from bench.celery_app import CelerySettings, attempt_seed, retry_countdown_s
from bench.celery_peer import Execution
from bench.pipeline_run import AttemptLog, JobOutcome
from bench.redis_server import RedisServer, find_redis_server, redis_server_version
from infra.kafka_broker import KafkaBroker
from schemas.events import AttemptFinished, AttemptStarted, AttemptStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)

TRACE_HEADER = ("gmt_create,predict_type,predict_status,exec_time_seconds,groupId,prompt_length,"
                "negative_prompt_length,num_images_per_prompt,num_inference_steps,"
                "checkpoint_model_version_id,num_lora")


def _run(attempt: str, worker: str, start: float, end: float,
         finished: bool = True) -> Execution:
    return Execution(attempt, worker, start, end, end - start, finished)


def _celery_settings(**overrides: object) -> CelerySettings:
    values: dict[str, object] = {
        "redis_url": "redis://127.0.0.1:1", "artifact_dir": "/tmp/unused", "p50_s": 0.2,
        "sigma": 0.99, "acceptance": 0.5, "accept_threshold": 0.49, "max_attempts_per_slot": 4,
        "retry_backoff_base_s": 0.1, "retry_backoff_max_s": 1.6, "visibility_timeout_s": 15.0,
    }
    values.update(overrides)
    return CelerySettings(**values)  # type: ignore[arg-type]


def test_duplicates_overlap_on_two_workers() -> None:
    runs = [_run("a", "w1", 0.0, 2.0), _run("a", "w2", 1.0, 3.0), _run("b", "w1", 0.0, 1.0)]

    assert peers.duplicate_attempts(runs) == ["a"]


def test_duplicates_ignore_sequential_runs() -> None:
    # A redelivery after the first run ended, or a retry on the same worker, is no duplicate.
    runs = [_run("a", "w1", 0.0, 1.0), _run("a", "w2", 1.5, 2.0),
            _run("b", "w1", 0.0, 1.0), _run("b", "w1", 0.5, 2.0)]

    assert peers.duplicate_attempts(runs) == []


def test_metrics_count_lost_jobs() -> None:
    outcomes = [
        JobOutcome("j1", 4, submitted_s=0.0, ended_s=2.0, status="completed"),
        JobOutcome("j2", 4, submitted_s=1.0, ended_s=5.0, status="completed"),
        JobOutcome("j3", 4, submitted_s=2.0),
    ]
    runs = [_run("a", "w1", 0.0, 2.0), _run("b", "w2", 1.0, 4.0)]

    metrics = peers.system_metrics(outcomes, runs, pool_slots=2, delivered_slots=8,
                                   fallback_slots=1)

    assert metrics["jobs"] == 3
    assert metrics["jobs_lost"] == 1
    assert metrics["timed_out"] == 1
    assert metrics["p50_job_s"] == pytest.approx(3.0)
    assert metrics["gpu_s"] == pytest.approx(5.0)
    # 5 GPU seconds over 2 slots for the 5 s from first submission to last outcome.
    assert metrics["gpu_busy_fraction"] == pytest.approx(0.5)
    assert metrics["gpu_s_per_delivered_slot"] == pytest.approx(5.0 / 8)
    assert metrics["duplicate_executions"] == 0


def test_metrics_all_lost() -> None:
    outcomes = [JobOutcome("j1", 4, submitted_s=0.0)]

    metrics = peers.system_metrics(outcomes, [], pool_slots=2, delivered_slots=0,
                                   fallback_slots=0)

    assert metrics["jobs_lost"] == 1
    assert metrics["p99_job_s"] is None
    assert metrics["gpu_busy_fraction"] is None
    assert metrics["gpu_s_per_delivered_slot"] is None


def test_slotforge_runs_end_at_kill() -> None:
    started = [
        AttemptStarted(attempt_id="a", job_id="j", job_key="k", worker_id="w1",
                       started_at=T0),
        AttemptStarted(attempt_id="a", job_id="j", job_key="k", worker_id="w2", epoch=2,
                       started_at=T0 + timedelta(seconds=20)),
    ]
    finished = [AttemptFinished(attempt_id="a", job_id="j", job_key="k", worker_id="w2",
                                epoch=2, status=AttemptStatus.SUCCEEDED, slot=0, gpu_s=1.0,
                                emitted_at=T0 + timedelta(seconds=21))]
    log = AttemptLog(started=started, finished=finished)
    kills = {"w1": (T0 + timedelta(seconds=3)).timestamp()}

    runs = peers.slotforge_executions(log, kills)

    killed = next(run for run in runs if run.worker == "w1")
    assert not killed.finished
    assert killed.gpu_s == pytest.approx(3.0)
    assert peers.duplicate_attempts(runs) == []


def test_slotforge_unfinished_run_overlaps() -> None:
    # Without a kill, a start with no finish runs to the end of the log, so it overlaps.
    started = [
        AttemptStarted(attempt_id="a", job_id="j", job_key="k", worker_id="w1",
                       started_at=T0),
        AttemptStarted(attempt_id="a", job_id="j", job_key="k", worker_id="w2", epoch=2,
                       started_at=T0 + timedelta(seconds=5)),
    ]
    finished = [AttemptFinished(attempt_id="a", job_id="j", job_key="k", worker_id="w2",
                                epoch=2, status=AttemptStatus.SUCCEEDED, slot=0, gpu_s=1.0,
                                emitted_at=T0 + timedelta(seconds=6))]

    runs = peers.slotforge_executions(AttemptLog(started=started, finished=finished), {})

    assert peers.duplicate_attempts(runs) == ["a"]


def test_targets_compare_p99() -> None:
    results = {
        "steady": {"slotforge": {"p99_job_s": 2.0}, "celery": {"p99_job_s": 5.0}},
        "kills": {"slotforge": {"p99_job_s": 4.0, "jobs_lost": 1, "duplicate_executions": 0},
                  "celery": {"p99_job_s": 6.0}},
    }

    checks = {check["name"]: check for check in peers.targets(results)}

    assert checks["steady: slotforge p99_job_s / Celery p99_job_s"]["met"]
    assert checks["steady: slotforge p99_job_s / Celery p99_job_s"]["measured"] == 0.4
    assert not checks["kills: slotforge p99_job_s / Celery p99_job_s"]["met"]
    assert not checks["kills: slotforge jobs_lost"]["met"]
    assert checks["kills: slotforge duplicate_executions"]["met"]


def test_config_parses_systems() -> None:
    parser = argparse.ArgumentParser()
    peers.add_arguments(parser)

    config = peers.PeersConfig.from_args(parser.parse_args(["--systems", "slotforge"]))
    assert config.systems == ("slotforge",)

    with pytest.raises(ValueError, match="--systems"):
        peers.PeersConfig.from_args(parser.parse_args(["--systems", "dask"]))


def test_retry_countdown_full_jitter() -> None:
    settings = _celery_settings()
    rng = random.Random(1)

    for retry in range(8):
        ceiling = min(1.6, 0.1 * 2 ** retry)
        countdowns = [retry_countdown_s(settings, retry, rng) for _ in range(50)]
        assert all(0.0 <= value <= ceiling for value in countdowns), retry


def test_attempt_seed_differs_per_retry() -> None:
    assert attempt_seed(7, 0, 0) == attempt_seed(7, 0, 0)
    assert attempt_seed(7, 0, 0) != attempt_seed(7, 0, 1)
    assert attempt_seed(7, 0, 0) != attempt_seed(7, 1, 0)


def test_celery_settings_env_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _celery_settings(visibility_timeout_s=9.0)
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)

    assert CelerySettings.from_env() == settings


def test_redis_server_starts_and_stops(tmp_path: Path) -> None:
    assert find_redis_server().exists()
    assert redis_server_version() != "unknown"

    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
        process = server.process
        assert process is not None

    assert process.poll() is not None


def _write_trace(path: Path, rows: int) -> Path:
    lines = [TRACE_HEADER]
    for index in range(rows):
        lines.append(f"2024-11-15 16:57:{index:02d},TXT_2_IMG,SUCCEED,30.0,G{index % 3:04d},"
                     f"60.0,10.0,1.0,10.0,M0001,0")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.integration
def test_peers_suite_smoke(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    peers.add_arguments(parser)
    # Four jobs end within seconds, so kills come every second to land while they run.
    args = parser.parse_args([
        "--jobs", "4", "--kill-interval-s", "1", "--wait-s", "120",
        "--trace", str(_write_trace(tmp_path / "trace.csv", 20)),
        "--work-dir", str(tmp_path / "work"),
        "--bootstrap-servers", kafka_broker.bootstrap_servers,
    ])
    out = tmp_path / "peers.json"

    report = peers.run(out, args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["results"]) == set(peers.SCENARIOS)
    for scenario, by_system in report["results"].items():
        assert set(by_system) == set(peers.SYSTEMS), scenario
        for system, item in by_system.items():
            label = (scenario, system)
            assert item["jobs"] == 4, label
            ended = item["completed"] + item["partial"] + item["failed"] + item["cancelled"]
            assert item["jobs_lost"] == item["jobs"] - ended - item["rejected"], label
            assert item["duplicate_executions"] >= 0, label
            if item["jobs_lost"] < item["jobs"]:
                for metric in ("p50_job_s", "p99_job_s", "gpu_busy_fraction",
                               "gpu_s_per_delivered_slot"):
                    assert item[metric] is not None, (label, metric)
    assert report["results"]["steady"]["celery"]["jobs_lost"] == 0
    assert report["results"]["steady"]["slotforge"]["jobs_lost"] == 0
    assert report["results"]["steady"]["celery"]["kills"] == 0
    assert report["results"]["kills"]["celery"]["kills"] >= 1
    assert report["results"]["kills"]["slotforge"]["kills"] >= 1

    setup = report["setup"]
    assert setup["redis_server"] != "unknown"
    assert setup["machine"]["packages"]["celery"] != "not installed"
    assert "slotforge bench peers" in setup["commands"]["reproduce"]
    page = peers.render_markdown(report)
    assert "## Peers: slotforge and Celery" in page
    assert "| steady | celery |" in page
    assert "visibility_timeout" in page
