"""Bad input for every consumer: generated cases in-process, then one batch on live services.

The in-process properties run each consumer's own decode step (and the delivery and
thumbnail handlers) on generated records: random bytes, truncated and deeply nested JSON,
wrong and future schema versions, unknown, missing and mistyped fields, out-of-range
parameters, megabyte prompts and headers that are not UTF-8. Each case must be decoded
or rejected with an ``EventDecodeError`` that names the reason, and the dead letter or
rejection built from it must be a valid record that fits the broker's size limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import reliability
from consumers.delivery import write_manifest
from consumers.span_sink import decode_span_row
from consumers.thumbnails import write_thumbnail
from gpu_inference.artifacts import ArtifactStore
from gpu_inference.postprocess import _decode_generated
from infra.kafka_broker import KafkaBroker
from schemas.errors import EventDecodeError, SlotforgeError
from schemas.events import (
    MAX_RECORD_BYTES,
    AttemptCancel,
    AttemptClaim,
    AttemptDispatched,
    AttemptFinished,
    AttemptProgress,
    AttemptStarted,
    ClaimDecision,
    DeadLetter,
    DeliveryAck,
    JobCompleted,
    JobRequested,
    JobSweep,
    ResultScored,
    WorkerStatus,
    decode_event,
    encode_event,
)
from streams.coordinator import rejection_for
from streams.kafka import build_dead_letter
from streams.tracing import extract_context

DECODE_ERROR_TYPES = {"empty", "too_large", "encoding", "json", "not_object", "unknown_type",
                      "unsupported_version", "unexpected_type", "validation"}


def _decoder(*expected: type) -> Callable[[bytes | None], Any]:
    return lambda value: decode_event(value, *expected)


# Each consumer's decode step, by the topic it reads.
CONSUMERS: dict[str, Callable[[bytes | None], Any]] = {
    "coordinator jobs.requested": _decoder(JobRequested),
    "coordinator coordinator.events": _decoder(
        AttemptClaim, AttemptStarted, AttemptProgress, AttemptFinished, ResultScored, JobSweep,
        DeliveryAck),
    "coordinator workers.status": _decoder(WorkerStatus),
    "gpu-worker attempts": _decoder(AttemptDispatched),
    "gpu-worker attempts.control": _decoder(ClaimDecision, AttemptCancel),
    "postprocess results.generated": _decode_generated,
    "delivery, webhook and thumbnails jobs.completed": _decoder(JobCompleted),
    "span-sink spans": decode_span_row,
}

VALID_EVENTS = reliability.valid_event_payloads()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _with(payload: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(payload))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)
payloads = st.sampled_from(sorted(VALID_EVENTS)).map(lambda name: VALID_EVENTS[name])


@st.composite
def truncated_json(draw: st.DrawFn) -> bytes:
    value = _json(draw(payloads))
    return value[:draw(st.integers(0, len(value) - 1))]


@st.composite
def wrong_versions(draw: st.DrawFn) -> bytes:
    version = draw(st.integers().filter(lambda number: number != 1) | st.text(max_size=5)
                   | st.none() | st.floats(allow_nan=False).filter(lambda number: number != 1))
    return _json(_with(draw(payloads), ("schema_version",), version))


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    payload = draw(payloads)
    name = draw(st.text(min_size=1, max_size=3_000).filter(lambda key: key not in payload))
    return _json(_with(payload, (name,), draw(json_values)))


@st.composite
def missing_fields(draw: st.DrawFn) -> bytes:
    payload = dict(draw(payloads))
    del payload[draw(st.sampled_from(sorted(payload)))]
    return _json(payload)


@st.composite
def mistyped_fields(draw: st.DrawFn) -> bytes:
    payload = draw(payloads)
    return _json(_with(payload, (draw(st.sampled_from(sorted(payload))),), draw(json_values)))


@st.composite
def out_of_range_params(draw: st.DrawFn) -> bytes:
    payload = VALID_EVENTS[draw(st.sampled_from(["job.requested", "attempt.dispatched"]))]
    field, value = draw(st.sampled_from([
        (("slots",), 0), (("slots",), 10_000), (("slots",), -1),
        (("params", "steps"), -5), (("params", "steps"), 0), (("params", "steps"), 100_000),
        (("params", "width"), 1_000_000), (("params", "height"), 2**40),
        (("params", "width"), 33), (("params", "guidance_scale"), -1.0),
        (("deadline_s",), -1), (("deadline_s",), 10**12), (("seed",), -1),
        (("seed",), 2**70), (("slot",), 10_000), (("epoch",), 0),
    ]))
    if field[0] not in payload:
        field = ("params", "steps")
    return _json(_with(payload, field, value))


@st.composite
def huge_prompts(draw: st.DrawFn) -> bytes:
    payload = VALID_EVENTS[draw(st.sampled_from(["job.requested", "attempt.dispatched"]))]
    size = draw(st.sampled_from([4_001, 100_000, 999_000, 1_000_001]))
    return _json(_with(payload, ("params", "prompt"), "x" * size))


@st.composite
def nested_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(500, 200_000))
    opener = draw(st.sampled_from([b"[", b'{"a":']))
    return opener * depth


bad_values = st.one_of(
    st.binary(max_size=512), truncated_json(), wrong_versions(), unknown_fields(),
    missing_fields(), mistyped_fields(), out_of_range_params(), huge_prompts(),
    nested_json(), st.none(), st.just(b""),
)
bad_headers = st.lists(
    st.tuples(st.sampled_from(["traceparent", "tracestate", "x-other"]),
              st.binary(max_size=80) | st.none()),
    max_size=3,
)

CASES = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _dead_letter(value: bytes | None, error: EventDecodeError) -> DeadLetter:
    return build_dead_letter(topic="t", partition=0, offset=1, group_id="g", key=b"k",
                             value=value, error_type=error.error_type, reason=error.reason)


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
@CASES
@given(value=bad_values, headers=bad_headers)
def test_consumer_rejects_bad_record(consumer: str, value: bytes | None,
                                     headers: list[tuple[str, bytes | None]]) -> None:
    extract_context(headers)  # type: ignore[arg-type]
    try:
        CONSUMERS[consumer](value)
    except EventDecodeError as err:
        assert err.error_type in DECODE_ERROR_TYPES
        assert err.reason
        letter = encode_event(_dead_letter(value, err))
        assert len(letter) < MAX_RECORD_BYTES
        assert decode_event(letter, DeadLetter).reason
        if consumer.startswith("coordinator jobs.requested"):
            rejection = rejection_for(value, err)
            assert rejection is None or rejection.reason


@CASES
@given(job_id=st.text(min_size=1, max_size=64))
def test_delivery_stays_in_its_folder(tmp_path_factory: pytest.TempPathFactory,
                                      job_id: str) -> None:
    root = tmp_path_factory.mktemp("delivery")
    completed = JobCompleted.model_validate(
        _with(VALID_EVENTS["job.completed"], ("job_id",), job_id))
    try:
        write_manifest(root / "deliveries", completed)
    except SlotforgeError as err:
        assert "invalid job id" in str(err)
    written = [path for path in root.rglob("*") if path.is_file()]
    assert all(path.parent == root / "deliveries" for path in written), written


@CASES
@given(uri=st.sampled_from(["file:///etc/hostname", "file:///tmp/../etc/passwd",
                            "http://127.0.0.1/x.png", "s3://bucket/x.png", "", "file://"])
       | st.text(max_size=200))
def test_thumbnails_read_only_the_store(tmp_path_factory: pytest.TempPathFactory,
                                        uri: str) -> None:
    root = tmp_path_factory.mktemp("thumbnails")
    outside = root / "outside.png"
    reliability.write_test_png(outside)
    store = ArtifactStore(root / "artifacts")

    assert write_thumbnail(store, uri, 16) is None
    assert write_thumbnail(store, outside.as_uri(), 16) is None
    assert sorted(path.name for path in root.iterdir()) == ["outside.png"]


@pytest.mark.integration
@pytest.mark.chaos
async def test_live_services_survive_bad_batch(kafka_broker: KafkaBroker,
                                               tmp_path: Path) -> None:
    result = await reliability.run_bad_input_batch(kafka_broker.bootstrap_servers, tmp_path)

    assert result["tried"] > 0
    assert result["crashed_consumers"] == 0, result["crashed"]
    assert result["next_valid_completed"]
    assert result["next_valid_delivered"]
    assert result["unanswered"] == [], result["unanswered"][:5]
