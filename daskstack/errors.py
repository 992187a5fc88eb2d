"""The package's exception base: ``except DaskstackError`` catches every error daskstack
raises on purpose (a bad frame, catalog, store, option, grid, run directory, archive
request ...), and nothing else: any other exception is a bug.

Each specific class keeps the built-in base it had before (``FrameError`` is still a
``ValueError``, ``CatalogError`` a ``RuntimeError`` ...), so code that catches those
keeps working.
"""

from __future__ import annotations

__all__ = ["DaskstackError"]


class DaskstackError(Exception):
    """Base of every error daskstack raises on purpose; the message names what failed."""
