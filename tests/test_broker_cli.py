"""``python -m infra.kafka_broker run`` (``slotforge broker run``) stops its broker on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.kafka_broker import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 40.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_line(log_path: Path, pattern: str, timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log_path.read_text())
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in {log_path} after {timeout_s:.0f} s:\n"
                         f"{log_path.read_text()[-2_000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_broker_run_stops_java_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "launcher.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "infra.kafka_broker", "run", "--port", str(free_port()),
             "--data-dir", str(tmp_path / "broker")],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    java_pid = 0
    try:
        java_pid = int(_wait_for_line(log_path, r"Started Kafka broker pid (\d+)",
                                      READY_TIMEOUT_S).group(1))
        _wait_for_line(log_path, r"Broker ready on", READY_TIMEOUT_S)

        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=EXIT_TIMEOUT_S)

        assert launcher.returncode == 0
        assert not _alive(java_pid), f"Kafka broker pid {java_pid} outlived its launcher"
        assert f"Stopped Kafka broker pid {java_pid}" in log_path.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if java_pid and _alive(java_pid):
            os.kill(java_pid, signal.SIGKILL)


@pytest.mark.integration
@pytest.mark.slow
def test_slotforge_broker_run_logs_ready(tmp_path: Path) -> None:
    # The CLI reads the jars and writes the broker's data under the working directory.
    libs = tmp_path / ".local" / "kafka" / "libs"
    libs.parent.mkdir(parents=True)
    libs.symlink_to(REPO_ROOT / ".local" / "kafka" / "libs")
    log_path = tmp_path / "cli.log"
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "broker", "run", "--port", str(free_port())],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
    java_pid = 0
    try:
        java_pid = int(_wait_for_line(log_path, r"Started Kafka broker pid (\d+)",
                                      READY_TIMEOUT_S).group(1))
        _wait_for_line(log_path, r"Broker ready on 127\.0\.0\.1:\d+", READY_TIMEOUT_S)

        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=EXIT_TIMEOUT_S)

        assert launcher.returncode == 0
        assert f"Stopped Kafka broker pid {java_pid}" in log_path.read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        # Without the log line, the pid file is the only way to find the broker.
        pid_file = tmp_path / ".local" / "kafka" / "broker" / "broker.pid"
        if not java_pid and pid_file.exists():
            java_pid = int(pid_file.read_text())
        if java_pid and _alive(java_pid):
            os.kill(java_pid, signal.SIGKILL)
