"""Shared fixtures: one real Kafka broker per test session, unique topics per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.kafka_broker import KafkaBroker
from streams.config import (
    ClickHouseSettings,
    ConsumerSettings,
    CoordinatorSettings,
    KafkaSettings,
    PostprocessSettings,
    Settings,
    WorkerSettings,
)
from streams.kafka import create_topics

TEST_PARTITIONS = 3
# Lines of each service log shown in a failed test's report, so a CI failure can be
# diagnosed without the machine it ran on.
LOG_TAIL_LINES = 80


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """Attach the end of each service log under a failed test's tmp_path to its report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if not isinstance(tmp_path, Path):
        return
    for log_path in sorted(tmp_path.glob("**/*.log")):
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        report.sections.append((
            f"service log {log_path.relative_to(tmp_path)} (last {LOG_TAIL_LINES} lines)",
            "\n".join(lines[-LOG_TAIL_LINES:]),
        ))


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real single-node Kafka broker in KRaft mode, on a free port of 127.0.0.1."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def make_settings(bootstrap_servers: str, tmp_path: Path, **overrides: object) -> Settings:
    """Build settings whose topics and consumer groups no other test shares."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    values: dict[str, object] = {
        "kafka": KafkaSettings(
            bootstrap_servers=bootstrap_servers, topic_prefix=prefix, partitions=TEST_PARTITIONS
        ),
        "coordinator": CoordinatorSettings(app_id="coordinator", sweep_interval_s=0.5),
        "worker": WorkerSettings(group_id=f"{prefix}gpu", slots=2),
        "postprocess": PostprocessSettings(group_id=f"{prefix}postprocess"),
        "consumers": ConsumerSettings(
            critical_group_id=f"{prefix}delivery", best_effort_group_id=f"{prefix}thumbnails"
        ),
        "clickhouse": ClickHouseSettings(
            dsn=f"chdb://{tmp_path / 'clickhouse'}", sink_group_id=f"{prefix}span-sink",
            batch_wait_s=0.2,
        ),
        "artifact_dir": tmp_path / "artifacts",
        "delivery_dir": tmp_path / "deliveries",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(kafka_broker: KafkaBroker, tmp_path: Path) -> Settings:
    """Settings with a fresh topic prefix and group ids; every topic already exists."""
    result = make_settings(kafka_broker.bootstrap_servers, tmp_path)
    asyncio.run(create_topics(result.kafka, result.topics.all))
    return result


@pytest.fixture
def service_env(settings: Settings) -> dict[str, str]:
    """Environment for a pipeline process started as a subprocess with the test's settings."""
    from streams.config import settings_to_env

    env = {key: value for key, value in os.environ.items() if not key.startswith("SLOTFORGE_")}
    env.update(settings_to_env(settings))
    return env
