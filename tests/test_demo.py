"""The main job, end to end, on a few trace requests."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from streams.cli import build_parser
from streams.config import ClickHouseSettings, Settings
from streams.demo import DemoOptions, _progress_routine, run_demo
from streams.processes import ProcessGroup, ServiceProcess


@pytest.mark.integration
@pytest.mark.slow
def test_small_demo_end_to_end(tmp_path: Path) -> None:
    settings = Settings(
        artifact_dir=tmp_path / "artifacts",
        delivery_dir=tmp_path / "deliveries",
        clickhouse=ClickHouseSettings(dsn=f"chdb://{tmp_path / 'clickhouse'}"),
    )
    options = DemoOptions(jobs=8, arrival_window_s=5.0, workers=2, worker_slots=2,
                          timeout_s=300.0, out_dir=tmp_path / "demo")

    summary = run_demo(settings, options)

    assert summary["submitted"] == 8
    ended = summary["completed"] + summary["partial"] + summary["failed"]
    assert ended == 8
    assert summary["completed"] + summary["partial"] >= 7
    assert summary["clickhouse_spans"] > 0
    for stage in ("admission", "queue_wait", "generation", "postprocess", "job", "delivery"):
        assert stage in summary["stages"], f"no spans for stage {stage}"
        row = summary["stages"][stage]
        assert row["count"] > 0
        assert 0 <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    written = json.loads((options.out_dir / "summary.json").read_text())
    assert written == summary
    assert len(list((tmp_path / "deliveries").glob("*.json"))) == ended


def test_demo_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])

    text = " ".join(capsys.readouterr().out.split())
    assert "trace requests to replay (default: 80)" in text
    assert "seconds over which the requests arrive (default: 60.0)" in text
    assert "concurrent attempts per worker process (default: 2)" in text


@pytest.mark.parametrize(("arguments", "message"), [
    (["--workers", "0"], "argument --workers: must be at least 1, got 0"),
    (["--jobs", "ten"], "argument --jobs: invalid count 'ten'"),
    (["--timeout", "-1"], "argument --timeout: must be above 0, got -1"),
    (["--trace", "missing.csv"], "argument --trace: file not found: missing.csv"),
])
def test_invalid_demo_option_rejected(arguments: list[str], message: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Rejected while parsing, before the demo deletes the last run's results.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", *arguments])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _exited_child(tmp_path: Path, name: str, status: int) -> ServiceProcess:
    process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({status})"])
    process.wait()
    return ServiceProcess(name, "gpu-worker", process, tmp_path / f"{name}.log")


async def test_progress_warns_once_per_exit(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    processes = ProcessGroup(tmp_path, {})
    first = _exited_child(tmp_path, "gpu-worker-1", 3)
    processes.processes.append(first)
    caplog.set_level(logging.WARNING, logger="streams.demo")

    routine = asyncio.create_task(_progress_routine({}, 4, processes, interval_s=0.01))
    await asyncio.sleep(0.2)
    second = _exited_child(tmp_path, "gpu-worker-2", 1)
    processes.processes.append(second)
    await asyncio.sleep(0.2)
    routine.cancel()
    with pytest.raises(asyncio.CancelledError):
        await routine

    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0] == (f"gpu-worker-1 (pid {first.pid}) exited with status 3; "
                           f"see {first.log_path}")
    assert warnings[1] == (f"gpu-worker-2 (pid {second.pid}) exited with status 1; "
                           f"see {second.log_path}")
    progress_lines = capsys.readouterr().out.splitlines()
    assert len(progress_lines) > 10
    assert all(line == "  0/4 jobs ended {}" for line in progress_lines), progress_lines
