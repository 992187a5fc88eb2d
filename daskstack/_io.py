"""Atomic file output, and the paths it writes to: local files or object-store URLs.

A local file is written under a temporary name in the same directory, then renamed: a
crash at any moment leaves either the previous complete file or the new complete one,
never a partial file under the final name. An object store (``s3://``, ``gs://`` ...)
has no rename; there the file is written to the local temporary directory and sent
with one upload, which the store makes visible whole or not at all (write-once keys:
the run's ``outputs.ecsv`` records each one's checksum, as for local files).

`as_path` gives a `pathlib.Path` for a local path and a `upath.UPath` (the same
interface over fsspec) for a URL, so the run directory's code is the same for both;
`zarr_store` gives what zarr opens for either.
Credentials and endpoints are fsspec's and the cloud SDKs' own (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, profiles ...): nothing here reads, logs or writes them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

__all__ = ["as_path", "atomic_path", "atomic_write_text", "is_url", "local_path", "remove_tree",
           "zarr_store"]

logger = logging.getLogger(__name__)

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


def zarr_store(path, mode: str = "r"):
    """What `zarr.open_group` opens for ``path`` in ``mode``: a local path as it is; a URL
    as an ``FsspecStore`` on the one asynchronous filesystem this process keeps for its
    scheme (`_async_filesystem`).

    zarr's own handling of a URL (``FsspecStore.from_url``) makes an asynchronous
    filesystem per calling thread, and one more each time a zarr array is unpickled (the
    arrays in a Dask graph, on the client, the scheduler and every worker), and never
    closes them: each keeps an aiohttp session (s3fs, gcsfs, http) still open when zarr
    stops its event loop at exit, and aiohttp reports every one on stderr ("Unclosed
    client session", "Unclosed connector"). Here every thread of a process and every
    array unpickled in it share one filesystem (zarr runs all its I/O on its one event
    loop), whose session is closed at exit on that loop, before zarr stops it."""
    if not is_url(path):
        return str(as_path(path))
    import fsspec

    url = str(path)
    protocol = url.split("://", 1)[0]
    cls = fsspec.get_filesystem_class(protocol)
    if not cls.async_impl:  # no session to close (memory:// ...): zarr opens it its own way
        return url
    return _shared_fsspec_store()(
        _async_filesystem(cls, protocol, cls._get_kwargs_from_urls(url)),
        path=cls._strip_protocol(url).rstrip("/"), read_only=mode == "r")


@functools.cache
def _shared_fsspec_store():
    """zarr's ``FsspecStore`` that unpickles onto the filesystem of the process it
    arrives in (`zarr_store`), not onto a new one (built on first use: the command line
    starts without importing zarr)."""
    from zarr.storage import FsspecStore

    class SharedFsspecStore(FsspecStore):
        def __reduce__(self):
            return zarr_store, (self.fs.unstrip_protocol(self.path),
                                "r" if self.read_only else "r+")

    return SharedFsspecStore


# this process's asynchronous filesystems for zarr, by (protocol, options from the URL)
_async_filesystems: dict[tuple, object] = {}
_async_lock = threading.Lock()
_async_pid = [os.getpid()]


def _async_filesystem(cls, protocol: str, url_options: dict):
    """The asynchronous ``cls`` filesystem of this process for ``url_options`` (what a
    URL itself says, such as a host; credentials and endpoints come from the environment
    when the session opens). New in a forked child: a parent's session belongs to the
    parent's event loop."""
    from fsspec.utils import tokenize

    key = (protocol, tokenize(url_options))
    with _async_lock:
        if _async_pid[0] != os.getpid():
            _async_filesystems.clear()
            _async_pid[0] = os.getpid()
        fs = _async_filesystems.get(key)
        if fs is None:
            if not _async_filesystems:
                # atexit runs the last registered first: this (registered after zarr was
                # imported) runs before zarr's own handler stops its event loop
                atexit.register(_close_async_filesystems)
            fs = cls(asynchronous=True, skip_instance_cache=True, **url_options)
            _async_filesystems[key] = fs
        return fs


# where fsspec's asynchronous filesystems keep their session once one is open: s3fs's
# client, aiohttp's session (http, gcsfs). None: never used, nothing to close (opening a
# session only to close it could wait on a credential lookup)
_SESSION_ATTRIBUTES = ("_s3", "_session")
# seconds to wait for a session to close at exit (it only closes its sockets)
_CLOSE_TIMEOUT = 10.0


def _close_async_filesystems() -> None:
    """Close the open sessions of `_async_filesystems` on zarr's event loop (at exit).
    ``set_session`` gives the session the filesystem holds and ``close()`` ends it: how
    fsspec documents ending an asynchronous filesystem's session."""
    from zarr.core.sync import sync

    async def close(fs):
        session = await fs.set_session()
        await session.close()

    with _async_lock:
        filesystems = list(_async_filesystems.values()) if _async_pid[0] == os.getpid() else []
        _async_filesystems.clear()
    for fs in filesystems:
        if not any(getattr(fs, name, None) is not None for name in _SESSION_ATTRIBUTES):
            continue
        try:
            sync(close(fs), timeout=_CLOSE_TIMEOUT)
        except (OSError, RuntimeError, TimeoutError) as err:  # zarr's loop already stopped
            logger.debug("could not close the session of %s: %s", type(fs).__name__, err)


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
