"""Invalid ``SLOTFORGE_*`` variables fail ``load_settings`` with a message naming the variable."""

from __future__ import annotations

import pytest

from schemas.errors import ConfigurationError
from streams.config import load_settings


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SLOTFORGE_WORKER__TIER_WEIGHTS", "notjson",
         "SLOTFORGE_WORKER__TIER_WEIGHTS: invalid JSON"),
        ("SLOTFORGE_CONSUMERS__CRITICAL", "delivery",
         "SLOTFORGE_CONSUMERS__CRITICAL: invalid JSON"),
        ("SLOTFORGE_LOG_LEVEL", "LOUD", "unknown log level 'LOUD'"),
        ("SLOTFORGE_KAFKA__SASL_MECHANISM", "PLAIN", "security_protocol is PLAINTEXT"),
        ("SLOTFORGE_CLICKHOUSE__DSN", "bogus://host", "unsupported DSN scheme 'bogus'"),
        ("SLOTFORGE_KAFKA__TOPIC_PREFIX", "bad prefix!", "invalid topic prefix 'bad prefix!'"),
        ("SLOTFORGE_WORKER__SLOTS", "0", "SLOTFORGE_WORKER__SLOTS"),
    ],
)
def test_invalid_variable_names_itself(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                       expected: str) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigurationError) as caught:
        load_settings()

    assert expected in str(caught.value)


def test_valid_variables_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOTFORGE_LOG_LEVEL", "debug")
    monkeypatch.setenv("SLOTFORGE_WORKER__TIER_WEIGHTS", '{"interactive": 2}')
    monkeypatch.setenv("SLOTFORGE_CONSUMERS__CRITICAL", '["delivery", "webhook"]')
    monkeypatch.setenv("SLOTFORGE_CLICKHOUSE__DSN", "https://user:secret@example.invalid:8443/db")
    monkeypatch.setenv("SLOTFORGE_KAFKA__TOPIC_PREFIX", "team-a.slotforge_1.")

    settings = load_settings()

    assert settings.log_level == "DEBUG"
    assert settings.worker.tier_weights == {"interactive": 2.0}
    assert settings.consumers.critical == ["delivery", "webhook"]
    assert settings.kafka.topic_prefix == "team-a.slotforge_1."


def test_sasl_with_credentials_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOTFORGE_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("SLOTFORGE_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("SLOTFORGE_KAFKA__SASL_USERNAME", "alice")
    monkeypatch.setenv("SLOTFORGE_KAFKA__SASL_PASSWORD", "secret")

    options = load_settings().kafka.client_options()

    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert options["sasl_plain_username"] == "alice"
