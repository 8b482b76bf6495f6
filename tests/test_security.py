"""SASL/SCRAM on a second broker listener, and prompt redaction in spans."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from infra.kafka_broker import KafkaBroker, free_port
from schemas.events import GenerationParams, JobRequested, Tier
from streams.client import SlotforgeClient
from streams.config import KafkaSettings, settings_to_env
from streams.kafka import create_topics, make_producer
from streams.processes import ProcessGroup
from tests.conftest import make_settings
from tests.kafka_helpers import TopicReader

pytestmark = pytest.mark.integration

USER = "slotforge-app"
PASSWORD = "correct-horse-battery"


@pytest.fixture(scope="module")
def scram_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    sasl_port = free_port()
    broker = KafkaBroker(
        tmp_path_factory.mktemp("kafka-scram"),
        extra_listeners={"SASL_PLAINTEXT": sasl_port},
        scram_users={USER: PASSWORD},
        extra_properties={
            "sasl.enabled.mechanisms": "SCRAM-SHA-256",
            "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        },
    )
    broker.sasl_port = sasl_port  # type: ignore[attr-defined]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _sasl(broker: KafkaBroker, password: str | None) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{broker.sasl_port}",  # type: ignore[attr-defined]
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256",
        sasl_username=USER, sasl_password=password, topic_prefix="secure.",
        partitions=3, request_timeout_ms=5_000,
    )


async def test_wrong_password_refused(scram_broker: KafkaBroker) -> None:
    producer = make_producer(_sasl(scram_broker, "wrong-password"))
    with pytest.raises(KafkaError):
        await asyncio.wait_for(producer.start(), 30)
    await producer.stop()


async def test_pipeline_runs_with_credentials(scram_broker: KafkaBroker,
                                              tmp_path: Path) -> None:
    kafka = _sasl(scram_broker, PASSWORD)
    settings = make_settings(kafka.bootstrap_servers, tmp_path)
    settings = settings.model_copy(update={"kafka": kafka.model_copy(update={
        "topic_prefix": settings.kafka.topic_prefix})})
    await create_topics(settings.kafka, settings.topics.all)
    env = {**settings_to_env(settings), "PATH": "/usr/bin:/bin",
           "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential"}
    group = ProcessGroup(tmp_path / "logs", env)
    group.start("coordinator")
    request = JobRequested(tenant_id="acme", user_id="u1",
                           params=GenerationParams(model="M1", prompt="secure plan", steps=4),
                           slots=1)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
            await client.submit(request)
            await attempts.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
    finally:
        await asyncio.to_thread(group.stop_all, 15)
    log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert PASSWORD not in log


@pytest.mark.slow
@pytest.mark.parametrize("redact", [True, False])
async def test_redacted_prompt_never_stored(settings, service_env: dict[str, str],
                                            tmp_path: Path, redact: bool) -> None:
    from infra.clickhouse import open_client
    from streams.kafka import group_partition_lags

    secret_prompt = "penthouse plan for the ceo of initech"
    group = ProcessGroup(tmp_path / "logs", {
        **service_env,
        "SLOTFORGE_COORDINATOR__RACING_POLICY": "sequential",
        "SLOTFORGE_TRACING__REDACT_PROMPTS": str(redact).lower(),
    })
    group.start("coordinator")
    sink = group.start("span-sink")
    request = JobRequested(tenant_id="acme", user_id="user-42",
                           params=GenerationParams(model="M1", prompt=secret_prompt, steps=4),
                           slots=1)
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.attempts(Tier.STANDARD)) as attempts:
            await client.submit(request)
            await attempts.wait_for(lambda seen: len(seen) >= 1, timeout_s=120)
        assert group.stop(group.processes[0]) == 0
        # The sink has stored every span once its group has committed up to the end of
        # each partition. The wait is long because the sink starts slowly on a loaded machine.
        lags: dict[object, int] = {}
        for _ in range(360):
            lags = await group_partition_lags(settings.kafka, settings.clickhouse.sink_group_id,
                                              [settings.topics.spans])
            if lags and not any(lags.values()):
                break
            await asyncio.sleep(0.5)
        assert lags and not any(lags.values()), f"span sink still behind: {lags}"
    finally:
        await asyncio.to_thread(group.stop_all, 15)
    assert not sink.alive()

    client = open_client(settings.clickhouse)
    try:
        table = settings.clickhouse.table
        leaked = client.query(
            f"SELECT count() FROM {table} WHERE position(toString(SpanAttributes), %(p)s) > 0",
            parameters={"p": secret_prompt}).result_rows[0][0]
        stored = client.query(
            f"SELECT SpanAttributes['slotforge.prompt'], SpanAttributes['slotforge.user.id'] "
            f"FROM {table} WHERE SpanName = 'admission'").result_rows
    finally:
        client.close()
    assert len(stored) == 1
    if redact:
        assert leaked == 0
        assert stored[0][0].startswith("sha256:")
        assert stored[0][1].startswith("sha256:")
    else:
        assert leaked >= 1
        assert stored[0] == (secret_prompt, "user-42")
