"""Prometheus metrics: the endpoint on 127.0.0.1 and consumer lag from a real consumer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.kafka_broker import free_port
from schemas.events import GenerationParams, JobRequested
from streams import metrics
from streams.client import SlotforgeClient
from streams.config import Settings
from streams.kafka import make_consumer, make_producer, topic_partitions
from streams.metrics import MetricsServer, lag_routine, start_metrics_server
from streams.processes import ProcessGroup
from tests.kafka_helpers import TopicReader, produce

METRIC_NAMES = {
    "slotforge_consumer_lag_records",
    "slotforge_attempts_in_flight",
    "slotforge_worker_slot_utilization_ratio",
    "slotforge_admission_decisions",
    "slotforge_cache_lookups",
    "slotforge_dead_letters",
    "slotforge_spans_dropped",
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Fetch /metrics and return every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def families(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name for family in text_string_to_metric_families(text)}


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    started = start_metrics_server(free_port())
    assert started is not None
    try:
        yield started
    finally:
        started.close()


def test_metrics_server_off_for_port_zero() -> None:
    assert start_metrics_server(0) is None


def test_metrics_server_rejects_bad_port() -> None:
    with pytest.raises(ValueError, match="invalid metrics port 70000"):
        start_metrics_server(70_000)


def test_metrics_server_binds_loopback(server: MetricsServer) -> None:
    assert server.server.server_address[0] == "127.0.0.1"
    assert METRIC_NAMES <= families(server.port)


def test_metrics_counters_scraped(server: MetricsServer) -> None:
    metrics.ADMISSION_DECISIONS.labels("interactive", "rejected", "queue_full").inc(2)
    metrics.CACHE_LOOKUPS.labels("hit").inc()
    metrics.DEAD_LETTERS.labels("slotforge.jobs.requested", "coordinator", "json").inc()
    metrics.SPANS_DROPPED.inc(3)
    metrics.ATTEMPTS_IN_FLIGHT.labels("gpu").set(2)
    metrics.SLOT_UTILIZATION.labels("gpu").set(0.5)

    samples = scrape(server.port)

    decision = (("decision", "rejected"), ("reason", "queue_full"), ("tier", "interactive"))
    assert samples[("slotforge_admission_decisions_total", decision)] >= 2
    assert samples[("slotforge_cache_lookups_total", (("result", "hit"),))] >= 1
    letter = (("error_type", "json"), ("group", "coordinator"),
              ("topic", "slotforge.jobs.requested"))
    assert samples[("slotforge_dead_letters_total", letter)] >= 1
    assert samples[("slotforge_spans_dropped_total", ())] >= 3
    assert samples[("slotforge_attempts_in_flight", (("pool", "gpu"),))] == 2
    assert samples[("slotforge_worker_slot_utilization_ratio", (("pool", "gpu"),))] == 0.5


@pytest.mark.integration
async def test_lag_routine_reports_partition_lag(
    settings: Settings, server: MetricsServer
) -> None:
    topic = settings.topics.jobs_completed
    producer = make_producer(settings.kafka)
    await producer.start()
    try:
        for number in range(5):
            await producer.send_and_wait(topic, f"record-{number}".encode(), partition=1)
    finally:
        await producer.stop()
    group = f"{settings.kafka.topic_prefix}lag-test"
    consumer = make_consumer(settings.kafka, group_id=None)
    await consumer.start()
    try:
        consumer.assign(await topic_partitions(settings.kafka, topic))
        await consumer.seek_to_beginning()
        # Read two of the five records of partition 1, so the lag there is three.
        read = 0
        deadline = time.monotonic() + 30
        while read < 2:
            assert time.monotonic() < deadline, "timed out reading two records"
            batches = await consumer.getmany(timeout_ms=500, max_records=2 - read)
            read += sum(len(records) for records in batches.values())

        task = asyncio.create_task(lag_routine(consumer, group, interval_s=0.1))
        try:
            deadline = time.monotonic() + 30
            key = ("slotforge_consumer_lag_records",
                   (("group", group), ("partition", "1"), ("topic", topic)))
            while scrape(server.port).get(key) != 3:
                assert time.monotonic() < deadline, scrape(server.port).get(key)
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await consumer.stop()

    # A stopped routine removes its partitions, so no stale lag stays on the endpoint.
    assert not [sample for sample in scrape(server.port)
                if sample[0] == "slotforge_consumer_lag_records"
                and ("group", group) in sample[1]]


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _lag_groups(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    """Return the consumer groups that have a lag sample."""
    return {dict(labels).get("group", "") for (name, labels) in samples
            if name == "slotforge_consumer_lag_records"}


async def _scrape_until(port: int, check: Any, timeout_s: float = 60.0
                        ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape ``port`` until ``check(samples)`` is true; the endpoint may not be up yet."""
    deadline = time.monotonic() + timeout_s
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    while time.monotonic() < deadline:
        try:
            samples = await asyncio.to_thread(scrape, port)
        except OSError:
            samples = {}
        if samples and check(samples):
            return samples
        await asyncio.sleep(0.5)
    return samples


def _free_port_run(count: int) -> int:
    """Return a port that starts ``count`` free ports, one per service of a process group."""
    for _ in range(50):
        base = free_port()
        with contextlib.ExitStack() as sockets:
            try:
                for port in range(base, base + count):
                    sockets.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return base
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1")


@pytest.mark.integration
@pytest.mark.slow
async def test_services_serve_metrics(
    settings: Settings, service_env: dict[str, str], tmp_path: Path
) -> None:
    base_port = _free_port_run(4)
    group = ProcessGroup(tmp_path / "logs", {
        **service_env,
        "SLOTFORGE_METRICS__PORT": str(base_port),
        "SLOTFORGE_METRICS__LAG_INTERVAL_S": "0.5",
        "SLOTFORGE_WORKER__SIMULATION__ENABLED": "true",
        "SLOTFORGE_WORKER__SIMULATION__P50_S": "0.05",
        "SLOTFORGE_WORKER__SIMULATION__ACCEPTANCE": "0.9",
        "SLOTFORGE_WORKER__SLOTS": "2",
        "SLOTFORGE_TRACING__ENABLED": "false",
    })
    coordinator = group.start("coordinator")
    worker = group.start("gpu-worker", name="gpu-1", env={"SLOTFORGE_WORKER__WORKER_ID": "gpu-1"})
    group.start("postprocess")
    delivery = group.start("delivery")
    requests = [JobRequested(tenant_id="acme", user_id=f"u{index}",
                             params=GenerationParams(model="M1", prompt=f"plan {index}",
                                                     steps=5), slots=1)
                for index in range(5)]
    try:
        async with SlotforgeClient(settings.kafka) as client, \
                TopicReader(settings.kafka, settings.topics.jobs_delivered) as delivered:
            for request in requests:
                await client.submit(request)
            await delivered.wait_for(lambda seen: len(seen) >= len(requests), timeout_s=180)
        await produce(settings.kafka, settings.topics.jobs_completed, b"{not json",
                      key=b"bad-record")

        coordinator_port = group.metrics_ports[coordinator.name]
        admitted = await _scrape_until(coordinator_port, lambda samples: (_value(
            samples, "slotforge_admission_decisions_total", tier="standard",
            decision="admitted", reason="none") or 0) >= len(requests))
        worker_samples = await _scrape_until(
            group.metrics_ports[worker.name],
            lambda samples: _value(samples, "slotforge_worker_slot_utilization_ratio",
                                   pool=settings.worker.group_id) is not None)
        delivery_group = settings.consumers.critical_group_id
        delivery_samples = await _scrape_until(
            group.metrics_ports[delivery.name],
            lambda samples: _value(samples, "slotforge_dead_letters_total",
                                   topic=settings.topics.jobs_completed, group=delivery_group,
                                   error_type="json") == 1)
    finally:
        await asyncio.to_thread(group.stop_all, 15)

    assert len(set(group.metrics_ports.values())) == 4
    assert _value(admitted, "slotforge_admission_decisions_total", tier="standard",
                  decision="admitted", reason="none") == len(requests)
    assert _value(admitted, "slotforge_cache_lookups_total", result="miss") == len(requests)
    coordinator_group = settings.kafka.topic_prefix + settings.coordinator.app_id
    assert coordinator_group in _lag_groups(admitted)
    assert _value(worker_samples, "slotforge_attempts_in_flight",
                  pool=settings.worker.group_id) is not None
    assert _value(delivery_samples, "slotforge_dead_letters_total",
                  topic=settings.topics.jobs_completed, group=delivery_group,
                  error_type="json") == 1
    assert delivery_group in _lag_groups(delivery_samples)
