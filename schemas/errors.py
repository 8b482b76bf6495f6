"""Root of the slotforge exception hierarchy.

Retry loops branch on the ``retriable`` attribute, never on message text.
"""

from __future__ import annotations


class SlotforgeError(Exception):
    """Base class for every error slotforge raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None, **ids: object) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable
        # Job, attempt, topic, partition and offset ids travel with the error for logs.
        self.ids = {name: value for name, value in ids.items() if value is not None}

    def __str__(self) -> str:
        message = super().__str__()
        if not self.ids:
            return message
        details = " ".join(f"{name}={value}" for name, value in self.ids.items())
        return f"{message} ({details})"


class EventDecodeError(SlotforgeError):
    """A record could not be decoded into a known event; it belongs in the dead-letter topic."""

    retriable = False

    def __init__(self, reason: str, *, error_type: str, **ids: object) -> None:
        # Retrying cannot change a record's bytes, so a decode error is never retriable.
        super().__init__(reason, retriable=False, **ids)
        self.reason = reason
        self.error_type = error_type


class ConfigurationError(SlotforgeError):
    """A setting is missing or invalid; the message names the setting and the fix."""


class TransientError(SlotforgeError):
    """A failure worth retrying: worker crash, out-of-memory, upload error, HTTP 429 or 5xx."""

    retriable = True


class PermanentError(SlotforgeError):
    """A failure that no retry can fix, such as invalid generation parameters."""

    retriable = False
