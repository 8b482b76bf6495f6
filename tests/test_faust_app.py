"""The coordinator's faust app: its consumer's fetch wait follows the setting."""

from __future__ import annotations

import pytest

from streams.faust_app import FetchTunedApp


async def test_consumer_uses_fetch_max_wait() -> None:
    # Port 9 (discard) is never contacted: building a consumer opens no connection.
    app = FetchTunedApp("test-fetch-wait", broker="kafka://127.0.0.1:9", fetch_max_wait_ms=35,
                        web_enabled=False)
    consumer_thread = app.consumer._thread

    kafka_consumer = consumer_thread._create_worker_consumer(app.transport)
    try:
        assert kafka_consumer._fetch_max_wait_ms == 35
    finally:
        await kafka_consumer.stop()


def test_negative_fetch_wait_rejected() -> None:
    with pytest.raises(ValueError, match="fetch_max_wait_ms"):
        FetchTunedApp("test-fetch-wait-negative", broker="kafka://127.0.0.1:9",
                      fetch_max_wait_ms=-1, web_enabled=False)
