"""Faults on the real broker with 200 jobs in flight: broker, coordinator, worker, span store.

Each fault test runs a fresh pipeline and injects one fault while every job is in flight.
It then checks that no admitted job was lost or ended twice, no slot was filled twice and
the delivery consumer applied each completed job once. A last test stops every service
after the broker is gone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import reliability
from bench.reliability import FaultResult, fault_named
from infra.kafka_broker import KafkaBroker
from streams.service import STOP_TIMEOUT_EXIT_STATUS

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]


def assert_invariants(result: FaultResult) -> None:
    assert result.jobs >= 200
    assert result.admitted == result.jobs, f"{result.rejected} jobs were rejected"
    assert result.lost == 0, result
    assert result.double_filled == 0, result
    assert result.conflicting_outcomes == 0, result
    assert result.duplicate_deliveries == 0, result
    assert result.undelivered == 0, result


async def test_broker_killed_and_restarted(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka")
    await asyncio.to_thread(broker.start)
    try:
        result = await reliability.run_fault(fault_named("broker-kill"),
                                             broker.bootstrap_servers, tmp_path, broker=broker)
    finally:
        await asyncio.to_thread(broker.stop)

    assert_invariants(result)
    # A new broker process on the old log folder, not a freshly formatted one.
    assert not result.observed["same_pid"]
    assert result.observed["same_cluster_id"]
    assert result.observed["ended_before_kill"] < result.jobs


async def test_coordinator_killed_and_restarted(kafka_broker: KafkaBroker,
                                                tmp_path: Path) -> None:
    result = await reliability.run_fault(fault_named("coordinator-kill"),
                                         kafka_broker.bootstrap_servers, tmp_path)

    assert_invariants(result)
    assert result.observed["ended_before_kill"] < result.jobs


async def test_frozen_worker_result_fenced(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    fault = fault_named("worker-freeze")
    result = await reliability.run_fault(fault, kafka_broker.bootstrap_servers, tmp_path)

    assert_invariants(result)
    assert result.observed["frozen_s"] > fault.config.lease_s
    # Most frozen attempts see their cancel on resume; any that finish first are late.
    assert result.observed["replaced_attempts"] > 0, "no attempt was dispatched again"
    assert result.observed["late_results_in_slots"] == 0


async def test_span_store_outage_blocks_nothing(kafka_broker: KafkaBroker,
                                                tmp_path: Path) -> None:
    result = await reliability.run_fault(fault_named("clickhouse-outage"),
                                         kafka_broker.bootstrap_servers, tmp_path)

    assert_invariants(result)
    assert result.observed["sink_alive_during_outage"]
    assert result.observed["ended_during_outage"] >= result.jobs // 2
    assert result.observed["spans"] > result.jobs
    assert result.observed["spans_stored"] == result.observed["spans"]


async def test_rebalance_during_long_attempts(kafka_broker: KafkaBroker,
                                              tmp_path: Path) -> None:
    fault = fault_named("rebalance")
    result = await reliability.run_fault(fault, kafka_broker.bootstrap_servers, tmp_path)

    assert_invariants(result)
    poll_interval_s = fault.config.max_poll_interval_ms / 1000
    assert result.observed["median_attempt_s"] > poll_interval_s
    evictions = result.observed["evictions"]
    assert evictions == {name: 0 for name in evictions}
    assert max(result.observed["assignments"].values()) <= 6, result.observed["assignments"]


async def test_services_stop_without_broker(tmp_path: Path) -> None:
    exits = await reliability.stop_without_broker(tmp_path, stop_timeout_s=10.0, grace_s=30.0)

    assert set(exits) >= {"coordinator", "postprocess", "delivery", "gpu-1"}
    hung = {name: result for name, result in exits.items() if result["status"] is None}
    assert hung == {}
    # A service exits cleanly, or its watchdog ends it once the stop timeout has passed.
    failed = {name: result for name, result in exits.items()
              if result["status"] not in (0, STOP_TIMEOUT_EXIT_STATUS)}
    assert failed == {}
    late = {name: result for name, result in exits.items() if result["seconds"] > 15.0}
    assert late == {}
