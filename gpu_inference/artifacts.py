"""Local artifact store: one PNG per attempt run at ``<root>/<job_id>/<attempt_id>.e<epoch>.png``.

Artifacts are addressed by ``file://`` URIs so that events carry a location that a later
object-store backend can replace with its own scheme.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from schemas.errors import SlotforgeError

logger = logging.getLogger(__name__)

# Ids become path components, so anything that could leave the job's folder is rejected.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ArtifactError(SlotforgeError):
    """An artifact URI or id is invalid, or the file could not be read or written."""


class ArtifactNotFoundError(ArtifactError):
    """No artifact exists at the URI."""


def _check_id(name: str, value: str) -> str:
    if not _SAFE_ID.match(value) or ".." in value:
        raise ArtifactError(
            f"invalid {name} {value!r} for an artifact path; use letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return value


class ArtifactStore:
    """PNG files under one root folder, which is created on first write."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path_for(self, job_id: str, attempt_id: str, epoch: int) -> Path:
        """Return the file of one run of an attempt.

        The epoch is part of the name, so a fenced worker that finishes late writes its own
        file instead of replacing the image of the run that replaced it.
        """
        folder = self.root / _check_id("job_id", job_id)
        return folder / f"{_check_id('attempt_id', attempt_id)}.e{epoch}.png"

    def write_png(self, job_id: str, attempt_id: str, image: Image.Image, *, epoch: int) -> str:
        """Write the image as PNG and return its ``file://`` URI.

        The file appears whole or not at all, because it is written to a temporary file in the
        same folder and renamed.
        """
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.write_bytes(job_id, attempt_id, buffer.getvalue(), epoch=epoch)

    def write_bytes(self, job_id: str, attempt_id: str, data: bytes, *, epoch: int) -> str:
        """Write already encoded PNG bytes and return the artifact's ``file://`` URI."""
        path = self.path_for(job_id, attempt_id, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path.as_uri()

    def path_of(self, uri: str) -> Path:
        """Return the local path of a ``file://`` URI inside this store.

        Raises:
            ArtifactError: the URI is not a ``file://`` URI or points outside the store's root.
        """
        parsed = urlparse(uri)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ArtifactError(f"unsupported artifact URI {uri!r}; expected file:///<path>")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactError(f"artifact URI {uri!r} is outside the artifact store {self.root}")
        return path

    def read(self, uri: str) -> bytes:
        """Return the bytes of an artifact.

        Raises:
            ArtifactNotFoundError: no file exists at the URI.
            ArtifactError: the URI is invalid or the file could not be read.
        """
        path = self.path_of(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError as err:
            raise ArtifactNotFoundError(f"artifact not found: {uri}") from err
        except OSError as err:
            raise ArtifactError(f"failed to read artifact {uri}: {err}") from err

    def delete(self, uri: str) -> bool:
        """Delete one artifact; return False when it did not exist."""
        path = self.path_of(uri)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def delete_job(self, job_id: str) -> int:
        """Delete a job's folder and return how many artifacts it contained."""
        folder = self.root / _check_id("job_id", job_id)
        if not folder.is_dir():
            return 0
        count = sum(1 for _ in folder.glob("*.png"))
        shutil.rmtree(folder)
        logger.info("Deleted %d artifacts of job %s", count, job_id)
        return count
