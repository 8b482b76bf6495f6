"""A faust app whose Kafka consumer waits a configurable time for data in each fetch.

faust-streaming 0.15.3 builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no
setting to change it. aiokafka 0.14 keeps one fetch request in flight per broker, and a
partition whose records the app has not consumed yet is left out of that request. New
records for such a partition then wait until the broker returns the long poll, up to the
full 1.5 s, although they are already on the broker.
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TransportT


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport
                                ) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # NOTE: aiokafka 0.14 reads this attribute when consumer.start() builds its fetcher,
        # and faust offers no argument for it.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms  # type: ignore[attr-defined]
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class FetchTunedApp(faust.App):
    """A faust app whose consumer's fetch requests wait at most ``fetch_max_wait_ms``."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int, **kwargs: Any) -> None:
        if fetch_max_wait_ms < 0:
            raise ValueError(f"fetch_max_wait_ms must be at least 0, got {fetch_max_wait_ms}")
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **kwargs)

    def _new_transport(self) -> TransportT:
        return _Transport(self.conf.broker_consumer, self)
