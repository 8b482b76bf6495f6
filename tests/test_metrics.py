"""Prometheus metrics: the endpoint on 127.0.0.1 and consumer lag from a real consumer."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.kafka_broker import free_port
from streams import metrics
from streams.config import Settings
from streams.kafka import make_consumer, make_producer, topic_partitions
from streams.metrics import MetricsServer, lag_routine, start_metrics_server

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
