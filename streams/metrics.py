"""Prometheus metrics of slotforge processes, and the HTTP endpoint that serves them.

Every process registers the same metric names in prometheus_client's default registry and
serves only its own values. Prometheus adds the ``instance`` label, which separates the
processes. Metrics a process does not use are listed with no samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from prometheus_client import Counter, Gauge, start_http_server

logger = logging.getLogger(__name__)

DEFAULT_METRICS_ADDRESS = "127.0.0.1"
DEFAULT_LAG_INTERVAL_S = 5.0

CONSUMER_LAG = Gauge(
    "slotforge_consumer_lag_records",
    "Records between a partition's high watermark and this consumer's position, as of the "
    "last check",
    ["group", "topic", "partition"],
)
ATTEMPTS_IN_FLIGHT = Gauge(
    "slotforge_attempts_in_flight",
    "Attempts this GPU worker process is running now",
    ["pool"],
)
SLOT_UTILIZATION = Gauge(
    "slotforge_worker_slot_utilization_ratio",
    "Busy slots divided by the slots of this GPU worker process, from 0 to 1",
    ["pool"],
)
ADMISSION_DECISIONS = Counter(
    "slotforge_admission_decisions_total",
    "Admission decisions of the coordinator, by job tier, decision and reason",
    ["tier", "decision", "reason"],
)
CACHE_LOOKUPS = Counter(
    "slotforge_cache_lookups_total",
    "Result-cache lookups of the coordinator; result is hit or miss",
    ["result"],
)
DEAD_LETTERS = Counter(
    "slotforge_dead_letters_total",
    "Records this process sent to the dead-letter topic, by source topic, consumer group "
    "and error type",
    ["topic", "group", "error_type"],
)
SPANS_DROPPED = Counter(
    "slotforge_spans_dropped_total",
    "Finished spans this process dropped because the span queue was full or publishing failed",
)


@dataclass
class MetricsServer:
    """Running metrics endpoint, which ``close`` stops to free the port."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int, address: str = DEFAULT_METRICS_ADDRESS) -> MetricsServer | None:
    """Serve ``/metrics`` on ``address:port`` from a daemon thread, or nothing for port 0.

    The default address is loopback only, because the endpoint has no authentication. Pass
    ``0.0.0.0`` to let a Prometheus server on another host scrape it. Raises OSError when the
    port is taken.
    """
    if port == 0:
        logger.info("Prometheus metrics are off (port 0)")
        return None
    if not 0 < port < 65_536:
        raise ValueError(f"invalid metrics port {port}: use 1-65535, or 0 to turn metrics off")
    server, thread = start_http_server(port, addr=address)
    logger.info("Serving Prometheus metrics on http://%s:%d/metrics", address, port)
    return MetricsServer(server, thread)


class LagTracker:
    """Tracker that sets CONSUMER_LAG for a consumer's assigned partitions and removes lost ones."""

    def __init__(self, consumer: AIOKafkaConsumer, group_id: str) -> None:
        self.consumer = consumer
        self.group_id = group_id
        self._labelled: set[TopicPartition] = set()

    async def update(self) -> dict[TopicPartition, int]:
        """Set and return the lag of every assigned partition whose high watermark is known.

        The high watermark comes from the last fetch response, so a partition appears after
        the consumer's first fetch from it.
        """
        lags: dict[TopicPartition, int] = {}
        for partition in self.consumer.assignment():
            highwater = self.consumer.highwater(partition)
            if highwater is None:
                continue
            try:
                position = await self.consumer.position(partition)
            except IllegalStateError:
                # The partition was revoked between assignment() and position().
                continue
            lags[partition] = max(0, highwater - position)

        for partition, lag in lags.items():
            CONSUMER_LAG.labels(self.group_id, partition.topic, str(partition.partition)).set(lag)
        for partition in self._labelled - set(lags):
            self._remove(partition)
        self._labelled = set(lags)
        return lags

    def clear(self) -> None:
        for partition in self._labelled:
            self._remove(partition)
        self._labelled = set()

    def _remove(self, partition: TopicPartition) -> None:
        # Another tracker of the same group and partition may have removed it already.
        with contextlib.suppress(KeyError):
            CONSUMER_LAG.remove(self.group_id, partition.topic, str(partition.partition))


async def lag_routine(
    consumer: AIOKafkaConsumer, group_id: str, interval_s: float = DEFAULT_LAG_INTERVAL_S
) -> None:
    """Update the consumer lag gauges every ``interval_s`` seconds until cancelled.

    Run it in the same task group as the consumer's loop. On cancellation the group's
    partitions are removed from the gauge, so a stopped consumer reports no stale lag.
    """
    tracker = LagTracker(consumer, group_id)
    try:
        while True:
            try:
                await tracker.update()
            except KafkaError as err:
                logger.warning("Failed to read consumer lag of group %s: %r", group_id, err)
            await asyncio.sleep(interval_s)
    finally:
        tracker.clear()
