"""Ten times the pool's capacity for two minutes: admission holds, memory stays bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import reliability
from infra.kafka_broker import KafkaBroker

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]


async def test_overload_burst_drains(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    result = await reliability.run_overload(kafka_broker.bootstrap_servers, tmp_path,
                                            burst_s=120.0, load_factor=10.0)

    assert result["burst_s"] >= 120.0
    assert result["crashed"] == []
    assert result["lost"] == 0
    assert result["rejected"] > 0, "a tenfold overload was admitted whole"
    assert result["rejected_without_retry_time"] == 0
    # Admission keeps admitting through the burst instead of closing the door.
    assert all(count > 0 for count in result["admitted_per_quarter"]), result
    # Admitted work stays within what the pool finishes inside the deadline, with margin.
    config = reliability.overload_config()
    assert result["admitted"] <= 3 * result["capacity_jobs_per_s"] * (
        result["burst_s"] + config.deadline_s)
    assert result["probe_completed"]
    for name, peak_mb in result["peak_rss_mb"].items():
        first_mb = result["rss_first_half_mb"].get(name, 0.0)
        assert peak_mb <= first_mb * 1.3 + 30, (name, first_mb, peak_mb)
