"""Check, before any compute, that a command can write where it was told to.

Commands call :func:`ensure_writable_dir` on their output folder first, so that an unwritable or
misspelt location fails in a second with a sentence naming it, not after hours of work.
Remote URIs (``s3://``, ``gs://``...) are left to the code that writes them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputDirError(ValueError):
    """An output folder that cannot be created or written; the message says which and why."""


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than ``file://`` (``s3://bucket/x``, ``gs://...``)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def ensure_writable_dir(location: str | os.PathLike, flag: str = "--output-dir") -> Path | None:
    """Create ``location`` (with parents) and prove it writable with a throw-away file.

    Returns the folder, or None for a remote URI (not checked here). Raises :class:`OutputDirError`
    naming ``flag``, the folder and the OS's reason.
    """
    if is_remote(location):
        return None
    text = str(location)
    folder = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".semlab_write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputDirError(
            f"{flag} {folder} is not writable ({exc.strerror or exc}): choose a folder you can write to"
        ) from exc
    return folder
