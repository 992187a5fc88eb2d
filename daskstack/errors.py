"""The package's exception base: ``except DaskstackError`` catches every error daskstack
raises on purpose (a bad frame, catalog, store, option, grid, run directory, archive
request ...), and nothing else: any other exception is a bug.

`RunError` is defined here because the run directory, the pipeline and the combine
(per-frame scales) all raise it. Each specific class keeps the built-in base it had before (``FrameError`` is still a
``ValueError``, ``CatalogError`` a ``RuntimeError`` ...), so code that catches those
keeps working.
"""

from __future__ import annotations

__all__ = ["DaskstackError", "RunError"]


class DaskstackError(Exception):
    """Base of every error daskstack raises on purpose; the message names what failed."""


class RunError(DaskstackError, RuntimeError):
    """A run that cannot start or cannot go on (not a per-frame failure)."""
