"""Start and stop pipeline services as child processes, for the demo, tests and benchmarks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Entry points by service name; each module is imported only in its own process.
SERVICES = {
    "coordinator": "streams.coordinator",
    "gpu-worker": "gpu_inference.worker",
    "postprocess": "gpu_inference.postprocess",
    "delivery": "consumers.delivery",
    "thumbnails": "consumers.thumbnails",
    "webhook": "consumers.webhook",
    "span-sink": "consumers.span_sink",
    "retry-router": "streams.retry",
}


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the same cleanup runs for both.

    Later SIGTERMs are ignored, so a repeated one cannot cut that cleanup short.
    """
    def raise_interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class ServiceProcess:
    name: str
    service: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.process.pid, signum)


@dataclass
class ProcessGroup:
    """Child services started together and stopped together, in reverse start order."""

    log_dir: Path
    base_env: dict[str, str]
    processes: list[ServiceProcess] = field(default_factory=list)
    # Prometheus port by child name. A nonzero SLOTFORGE_METRICS__PORT in base_env is the
    # first of consecutive ports, one per child, and a restarted child keeps its port.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def start(self, service: str, *, name: str | None = None,
              env: dict[str, str] | None = None) -> ServiceProcess:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
        name = name or service
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", SERVICES[service]],
                env={**self.base_env, **self._metrics_env(name), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = ServiceProcess(name, service, process, log_path)
        self.processes.append(child)
        logger.info("Started %s (pid %d), log %s", name, process.pid, log_path)
        return child

    def _metrics_env(self, name: str) -> dict[str, str]:
        base = int(self.base_env.get("SLOTFORGE_METRICS__PORT") or 0)
        if base == 0:
            return {}
        port = self.metrics_ports.setdefault(name, base + len(self.metrics_ports))
        logger.info("%s serves Prometheus metrics on port %d", name, port)
        return {"SLOTFORGE_METRICS__PORT": str(port)}

    def stop(self, child: ServiceProcess, grace_s: float = 30.0) -> int | None:
        """Send SIGTERM, then SIGKILL after ``grace_s``; returns the exit status."""
        if child.alive():
            child.signal(signal.SIGTERM)
        return self._wait(child, grace_s)

    def _wait(self, child: ServiceProcess, grace_s: float) -> int | None:
        try:
            child.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not stop within %.0f s; killing it",
                           child.name, child.pid, grace_s)
            child.process.kill()
            child.process.wait()
        logger.info("Stopped %s (pid %d) with status %s", child.name, child.pid,
                    child.process.returncode)
        return child.process.returncode

    def kill(self, child: ServiceProcess) -> None:
        """Kill a child with SIGKILL, as a crash would."""
        if child.alive():
            child.process.kill()
            child.process.wait()
            logger.info("Killed %s (pid %d)", child.name, child.pid)

    def stop_all(self, grace_s: float = 30.0) -> None:
        """Send SIGTERM to every child at once, then wait for each, killing laggards.

        Each child gets one SIGTERM only, because a second signal cancels a service
        without its graceful drain.
        """
        for child in reversed(self.processes):
            if child.alive():
                child.signal(signal.SIGTERM)
        for child in reversed(self.processes):
            self._wait(child, grace_s)

    def failed(self) -> list[ServiceProcess]:
        """Children that exited on their own."""
        return [child for child in self.processes if not child.alive()]
