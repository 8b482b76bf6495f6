"""Event models: round trips, bounds and the reasons decode errors carry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumers.delivery import manifest_path
from schemas.errors import EventDecodeError
from schemas.events import (
    EVENT_TYPES,
    MAX_JOB_ID_CHARS,
    AttemptDispatched,
    AttemptFinished,
    AttemptStarted,
    GenerationParams,
    JobRequested,
    attempt_id_for,
    cache_key,
    decode_event,
    encode_event,
)
from schemas.export import export_json_schemas
from streams.coordinator import rejection_for


def _request(**overrides: object) -> JobRequested:
    values: dict[str, object] = {
        "tenant_id": "acme",
        "user_id": "u1",
        "params": GenerationParams(model="M0001", prompt="a floor plan", steps=30),
        "slots": 4,
    }
    values.update(overrides)
    return JobRequested(**values)  # type: ignore[arg-type]


def test_request_round_trip() -> None:
    request = _request()
    decoded = decode_event(encode_event(request), JobRequested)
    assert decoded == request
    assert decoded.job_key == request.job_key


def test_cache_key_normalizes_prompt() -> None:
    first = GenerationParams(model="M1", prompt="A  Floor\tPlan", steps=30)
    second = GenerationParams(model="M1", prompt="a floor plan", steps=30)
    assert cache_key("t", "u", first) == cache_key("t", "u", second)


def test_cache_key_separates_tenants() -> None:
    params = GenerationParams(model="M1", prompt="a floor plan", steps=30)
    assert cache_key("t1", "u", params) != cache_key("t2", "u", params)
    assert cache_key("t1", "u", params).startswith("t1:")


@pytest.mark.parametrize(
    ("data", "error_type"),
    [
        (b"", "empty"),
        (b"\xff\xfe\x00", "encoding"),
        (b'{"event_type": "job.requested"', "json"),
        (b"[1, 2]", "not_object"),
        (b'{"event_type": "job.exploded", "schema_version": 1}', "unknown_type"),
        (b'{"event_type": "job.requested", "schema_version": 2}', "unsupported_version"),
        (b'{"event_type": "job.requested", "schema_version": 1}', "validation"),
        (b"x" * 1_000_001, "too_large"),
    ],
)
def test_decode_errors_name_reason(data: bytes, error_type: str) -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(data)
    assert caught.value.error_type == error_type
    assert caught.value.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [("slots", 0), ("slots", 10_000)],
)
def test_request_rejects_out_of_range_slots(field: str, value: int) -> None:
    raw = json.loads(encode_event(_request()))
    raw[field] = value
    with pytest.raises(EventDecodeError) as caught:
        decode_event(json.dumps(raw).encode(), JobRequested)
    assert caught.value.error_type == "validation"
    assert field in caught.value.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", -1), ("width", 100_000), ("width", 33), ("prompt", "x" * 2_000_000)],
)
def test_params_reject_out_of_range(field: str, value: object) -> None:
    raw = json.loads(encode_event(_request()))
    raw["params"][field] = value
    with pytest.raises(EventDecodeError) as caught:
        decode_event(json.dumps(raw).encode(), JobRequested)
    assert caught.value.error_type in ("validation", "too_large")


@pytest.mark.parametrize(
    "job_id", ["../../etc/passwd", "a..b", ".hidden", "a/b", "é", "j" * (MAX_JOB_ID_CHARS + 1)],
)
def test_request_rejects_unusable_job_id(job_id: str) -> None:
    raw = json.loads(encode_event(_request()))
    raw["job_id"] = job_id

    with pytest.raises(EventDecodeError) as caught:
        decode_event(json.dumps(raw).encode(), JobRequested)

    assert caught.value.error_type == "validation"
    assert "job_id" in caught.value.reason
    # The request names its job and tenant, so the client gets a rejection with the reason.
    rejection = rejection_for(json.dumps(raw).encode(), caught.value)
    assert rejection is not None
    assert rejection.job_id == job_id


def test_longest_job_id_fits_attempt_ids() -> None:
    request = _request(job_id="j" * MAX_JOB_ID_CHARS)

    # A cache key's flight numbers its attempts; 10**14 - 1 is the largest number that fits.
    dispatched = AttemptDispatched(
        attempt_id=attempt_id_for(request.job_id, request.job_key, 10**14 - 1),
        job_id=request.job_id, job_key=request.job_key, tenant_id=request.tenant_id, slot=0,
        attempt_no=1, params=request.params, seed=0, tier=request.tier,
        deadline_at=request.requested_at,
    )

    assert decode_event(encode_event(dispatched), AttemptDispatched) == dispatched
    assert manifest_path(Path("deliveries"), request.job_id).name == f"{request.job_id}.json"


def test_unknown_field_rejected() -> None:
    raw = json.loads(encode_event(_request()))
    raw["surprise"] = 1
    with pytest.raises(EventDecodeError) as caught:
        decode_event(json.dumps(raw).encode(), JobRequested)
    assert "surprise" in caught.value.reason


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_number_rejected(value: str) -> None:
    raw = encode_event(_request()).decode().replace('"deadline_s":600.0', f'"deadline_s":{value}')
    assert value in raw
    with pytest.raises(EventDecodeError) as caught:
        decode_event(raw.encode(), JobRequested)
    assert "finite" in caught.value.reason


def test_started_without_interval_reports_every_step() -> None:
    # Events from workers that predate the field still decode.
    raw = json.loads(encode_event(AttemptStarted(attempt_id="a-1", job_id="j", job_key="t:k",
                                                 worker_id="gpu-1")))
    del raw["progress_every_steps"]

    started = decode_event(json.dumps(raw).encode(), AttemptStarted)

    assert started.progress_every_steps == 1


def test_unexpected_type_rejected() -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(encode_event(_request()), AttemptFinished)
    assert caught.value.error_type == "unexpected_type"


def test_schema_export_writes_every_event(tmp_path) -> None:
    written = export_json_schemas(tmp_path)
    assert len(written) == len(EVENT_TYPES)
    for path in written:
        schema = json.loads(path.read_text())
        assert schema["properties"]["schema_version"]["const"] == 1
