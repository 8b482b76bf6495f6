"""Fetch, format, start and stop a local single-node Apache Kafka broker in KRaft mode.

The jars come from Maven Central through ``mvn`` (see ``infra/kafka/pom.xml``) into an
ignored cache folder; the broker listens on 127.0.0.1 only. Tests and the demo use it;
production points ``SLOTFORGE_KAFKA__BOOTSTRAP_SERVERS`` at a real cluster instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import SlotforgeError

logger = logging.getLogger(__name__)

INFRA_DIR = Path(__file__).resolve().parent
POM_PATH = INFRA_DIR / "kafka" / "pom.xml"
LOG4J_PATH = INFRA_DIR / "kafka" / "log4j2.properties"
DEFAULT_LIBS_DIR = Path(".local") / "kafka" / "libs"
STOP_GRACE_S = 20.0


class BrokerError(SlotforgeError):
    """The local broker could not be fetched, formatted or started."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch_jars(libs_dir: Path = DEFAULT_LIBS_DIR) -> Path:
    """Resolve the broker's jars with mvn once; later calls reuse the cache folder."""
    marker = libs_dir / ".complete"
    if marker.exists():
        return libs_dir
    if shutil.which("mvn") is None:
        raise BrokerError("mvn is not on PATH; install Maven to fetch the Kafka jars")

    libs_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Fetching Kafka jars from Maven Central into %s", libs_dir)
    command = [
        "mvn", "-q", "-B", "-f", str(POM_PATH), "dependency:copy-dependencies",
        f"-DoutputDirectory={libs_dir.resolve()}", "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BrokerError(
            f"mvn failed with exit status {result.returncode} while fetching Kafka jars: "
            f"{(result.stdout + result.stderr)[-2_000:]}"
        )
    marker.write_text("ok\n")
    return libs_dir


def _random_cluster_id() -> str:
    # The storage tool reads an id that starts with "-" as an option, so draw another.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class KafkaBroker:
    """One broker process with its own data folder and ports.

    Args:
        data_dir: folder for the log segments, configuration and the broker's own log.
        port: client listener port; 0 picks a free one.
        controller_port: KRaft controller listener port; 0 picks a free one.
        extra_properties: more ``server.properties`` lines, for example a SASL listener.
    """

    data_dir: Path
    port: int = 0
    controller_port: int = 0
    libs_dir: Path = DEFAULT_LIBS_DIR
    heap_mb: int = 512
    extra_properties: dict[str, str] = field(default_factory=dict)
    extra_listeners: dict[str, int] = field(default_factory=dict)
    # SCRAM users created when the log folder is formatted: name to password.
    scram_users: dict[str, str] = field(default_factory=dict)
    scram_mechanism: str = "SCRAM-SHA-256"
    jvm_options: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if self.port == 0:
            self.port = free_port()
        if self.controller_port == 0:
            self.controller_port = free_port()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def _config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def _log_dir(self) -> Path:
        return self.data_dir / "logs"

    def _properties(self) -> dict[str, str]:
        listeners = {"PLAINTEXT": self.port, **self.extra_listeners}
        protocol_map = {"CONTROLLER": "PLAINTEXT", "PLAINTEXT": "PLAINTEXT"}
        for name in self.extra_listeners:
            protocol_map.setdefault(name, name)
        listener_text = ",".join(f"{name}://127.0.0.1:{port}" for name, port in listeners.items())
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"{listener_text},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": listener_text,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": ",".join(f"{k}:{v}" for k, v in protocol_map.items()),
            "log.dirs": str(self.data_dir / "data"),
            "num.partitions": "6",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "12",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "log.retention.hours": "24",
            "log.segment.bytes": str(64 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        properties.update(self.extra_properties)
        return properties

    def format(self) -> None:
        """Write the configuration and format a fresh log folder, removing any old one."""
        libs = fetch_jars(self.libs_dir)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self._log_dir.mkdir(parents=True)
        lines = [f"{key}={value}" for key, value in self._properties().items()]
        self._config_path.write_text("\n".join(lines) + "\n")

        command = [
            *self._java_command(libs), "kafka.tools.StorageTool", "format",
            "-t", _random_cluster_id(), "-c", str(self._config_path),
        ]
        for user, password in self.scram_users.items():
            command += ["--add-scram", f"{self.scram_mechanism}=[name={user},password={password}]"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BrokerError(
                f"formatting {self.data_dir} failed: {(result.stdout + result.stderr)[-2_000:]}"
            )

    def _java_command(self, libs: Path) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("java is not on PATH; install a Java 17 runtime to run Kafka")
        return [
            java, f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true", f"-Dkafka.logs.dir={self._log_dir}",
            f"-Dlog4j2.configurationFile={LOG4J_PATH}", *self.jvm_options,
            "-cp", str(libs.resolve() / "*"),
        ]

    def start(self, *, format_first: bool = True, timeout_s: float = 90.0) -> None:
        """Start the broker and wait until it serves metadata requests."""
        if format_first or not self._config_path.exists():
            self.format()
        libs = fetch_jars(self.libs_dir)
        stderr_log = open(self._log_dir / "stderr.log", "ab")  # noqa: SIM115 - child keeps it
        self.process = subprocess.Popen(
            [*self._java_command(libs), "kafka.Kafka", str(self._config_path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr_log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        stderr_log.close()
        (self.data_dir / "broker.pid").write_text(f"{self.process.pid}\n")
        logger.info(
            "Started Kafka broker pid %d on %s (data %s)",
            self.process.pid, self.bootstrap_servers, self.data_dir,
        )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(
                    f"Kafka broker exited with status {self.process.returncode}; "
                    f"see {self._log_dir / 'server.log'}"
                )
            if asyncio.run(_answers_metadata(self.bootstrap_servers)):
                return
            time.sleep(0.5)
        raise BrokerError(
            f"Kafka broker on {self.bootstrap_servers} did not answer within {timeout_s:.0f} s; "
            f"see {self._log_dir / 'server.log'}"
        )

    def kill(self) -> None:
        """Kill the broker with SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            logger.info("Killed Kafka broker pid %d", self.process.pid)

    def stop(self) -> None:
        """Stop the broker with SIGTERM, then SIGKILL if it has not exited within the grace."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("Kafka broker pid %d ignored SIGTERM; killing it", self.process.pid)
            self.process.kill()
            self.process.wait()
        logger.info("Stopped Kafka broker pid %d", self.process.pid)


async def _answers_metadata(bootstrap_servers: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    # A plain connect first keeps aiokafka from logging an error per refused attempt.
    host, _, port = bootstrap_servers.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
        writer.close()
    except (TimeoutError, OSError):
        return False

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=3_000)
    try:
        await admin.start()
        await admin.list_topics()
        return True
    except (TimeoutError, KafkaError, OSError):
        return False
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m infra.kafka_broker fetch|run``."""
    parser = argparse.ArgumentParser(description="Local single-node Kafka broker (KRaft)")
    parser.add_argument("command", choices=["fetch", "run"])
    parser.add_argument("--data-dir", type=Path, default=Path(".local") / "kafka" / "broker")
    parser.add_argument("--port", type=int, default=9092, help="client port on 127.0.0.1")
    args = parser.parse_args(argv)
    # force=True because `slotforge broker` arrives here after the CLI configured logging at
    # WARNING, which would hide the ready and stopped lines.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)

    if args.command == "fetch":
        fetch_jars()
        return 0
    from streams.processes import sigterm_as_interrupt

    broker = KafkaBroker(args.data_dir, port=args.port)
    # The broker runs in its own session, so only this process can stop it. SIGTERM from a
    # process manager must reach the cleanup below, or the Java process keeps running.
    with sigterm_as_interrupt():
        try:
            broker.start()
            logger.info("Broker ready on %s; press Ctrl-C to stop", broker.bootstrap_servers)
            assert broker.process is not None
            broker.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
