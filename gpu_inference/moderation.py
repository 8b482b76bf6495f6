"""Client of an external image moderation API, called by post-processing for accepted images.

The API takes the PNG as the request body and responds with ``{"flagged": bool, "reason": str}``.
Failures raise by kind, so callers branch on the type: ``TransientError`` for connection
errors, timeouts, HTTP 429 and 5xx and unreadable responses, ``PermanentError`` for any other
4xx, which no retry of the same request can fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypedDict

import aiohttp

from schemas.errors import PermanentError, TransientError
from schemas.events import AttemptFinished

logger = logging.getLogger(__name__)

_MAX_BODY_CHARS = 300


class _AttemptIds(TypedDict):
    """Ids that every error raised here carries for the logs."""

    attempt_id: str
    job_id: str


@dataclass(frozen=True)
class ModerationResult:
    flagged: bool
    reason: str


async def moderate(session: aiohttp.ClientSession, url: str, finished: AttemptFinished,
                   png: bytes) -> ModerationResult:
    """POST one image to the moderation API and return its verdict.

    The ``Idempotency-Key`` names the attempt and epoch, so the API can return its earlier
    verdict for a retried request.
    """
    ids = _AttemptIds(attempt_id=finished.attempt_id, job_id=finished.job_id)
    headers = {"Content-Type": "image/png",
               "Idempotency-Key": f"{finished.attempt_id}:{finished.epoch}"}
    try:
        async with session.post(url, data=png, headers=headers) as response:
            if response.status == 429 or response.status >= 500:
                body = (await response.text())[:_MAX_BODY_CHARS]
                raise TransientError(
                    f"moderation API responded with HTTP {response.status}: {body}", **ids)
            if response.status >= 300:
                body = (await response.text())[:_MAX_BODY_CHARS]
                raise PermanentError(f"moderation API rejected the request with HTTP "
                                     f"{response.status}: {body}", **ids)
            try:
                answer = await response.json(content_type=None)
            except ValueError as err:
                raise TransientError(f"moderation API response is not JSON: {err}", **ids) from err
    except (aiohttp.ClientError, TimeoutError) as err:
        raise TransientError(f"moderation request failed: {err!r}", **ids) from err

    if not isinstance(answer, dict) or not isinstance(answer.get("flagged"), bool):
        raise TransientError(f"moderation API response has no boolean 'flagged': "
                             f"{str(answer)[:_MAX_BODY_CHARS]}", **ids)
    return ModerationResult(answer["flagged"], str(answer.get("reason", ""))[:200])
