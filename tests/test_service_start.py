"""Services that cannot start: one line with the reason, and exit status 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def _run_service(service: str = "postprocess", **env: str) -> subprocess.CompletedProcess[str]:
    variables = {key: value for key, value in os.environ.items()
                 if not key.startswith("SLOTFORGE_")}
    variables.update(env)
    return subprocess.run([sys.executable, "-m", "streams.cli", "run", service],
                          env=variables, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.integration
@pytest.mark.parametrize("service", ["postprocess", "coordinator"])
def test_unreachable_broker_named(service: str) -> None:
    # Nothing listens on port 1, so the connection is refused at once.
    result = _run_service(service, SLOTFORGE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1")

    assert result.returncode == 2
    assert "cannot reach Kafka at 127.0.0.1:1" in result.stderr
    assert "SLOTFORGE_KAFKA__BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_taken_metrics_port_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_service(SLOTFORGE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1",
                              SLOTFORGE_METRICS__PORT=str(port))

    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert "SLOTFORGE_METRICS__PORT" in result.stderr
    assert "Traceback" not in result.stderr
