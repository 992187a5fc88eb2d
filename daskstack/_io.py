"""Atomic file output, and the paths it writes to: local files or object-store URLs.

A local file is written under a temporary name in the same directory, then renamed: a
crash at any moment leaves either the previous complete file or the new complete one,
never a partial file under the final name. An object store (``s3://``, ``gs://`` ...)
has no rename; there the file is written to the local temporary directory and sent
with one upload, which the store makes visible whole or not at all (write-once keys:
the run's ``outputs.ecsv`` records each one's checksum, as for local files).

`as_path` gives a `pathlib.Path` for a local path and a `upath.UPath` (the same
interface over fsspec) for a URL, so the run directory's code is the same for both.
Credentials and endpoints are fsspec's and the cloud SDKs' own (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, profiles ...): nothing here reads, logs or writes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["as_path", "atomic_path", "atomic_write_text", "is_url", "local_path", "remove_tree"]

# a URL: a scheme of two or more letters (one letter is a Windows drive), then "://"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path) -> bool:
    """True for a URL of an fsspec filesystem (``s3://``, ``gs://``, ``https://``,
    ``memory://`` ...); ``file://`` URLs and plain paths are local."""
    text = str(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def as_path(path):
    """``path`` as a path object: `pathlib.Path` for a local path (``file://`` stripped),
    `upath.UPath` for a URL, whose filesystem fsspec picks from the scheme."""
    if isinstance(path, Path):
        return path
    if is_url(path):
        from upath import UPath

        return path if isinstance(path, UPath) else UPath(str(path))
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def local_path(path) -> Path | None:
    """The local `Path` of ``path``; None for a URL."""
    return None if is_url(path) else as_path(path)


def remove_tree(path) -> None:
    """Delete a directory (or an object-store prefix) and all it holds, if it exists."""
    local = local_path(path)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    remote = as_path(path)
    if remote.exists():
        remote.fs.rm(remote.path, recursive=True)


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the final suffix (``suffix`` or the path's own), so
    writers that choose a format by extension (astropy tables, FITS) still work.
    A URL: the temporary file is local, sent to ``path`` in one upload on success.
    """
    if is_url(path):
        with _uploaded(as_path(path), suffix) as tmp:
            yield tmp
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # writers such as astropy refuse to overwrite an existing file
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:  # data on disk before the name points at it
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def _uploaded(path, suffix: str | None):
    """`atomic_path` for an object store: a local temporary file, uploaded at the end
    (one PUT: the object appears complete or not at all)."""
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f"daskstack-{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        path.fs.put_file(str(tmp), path.path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
