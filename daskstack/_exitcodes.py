"""The exit codes of every ``daskstack`` command, defined once (the CLI and the pipeline use
these names; scripts and schedulers can rely on the numbers).

A command that works on many items (frames, archive records) judges each one alone, so
its outcome is one of three: all done, partial, nothing usable. `outcome` maps counts to it.
"""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE",
           "outcome"]

EXIT_OK = 0  # all done: every item (frame, record) made it
EXIT_USAGE = 2  # bad usage or options: nothing was started
EXIT_PARTIAL = 3  # something usable came out, some items failed (each reported with its reason)
EXIT_FAILED = 4  # nothing usable came out
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it (128 + SIGINT); the same command resumes
# 1 is left to Python: an uncaught exception (a traceback) is a bug to report.


def outcome(n_usable: int, n_failed: int) -> int:
    """The exit code for ``n_usable`` items that made it and ``n_failed`` that did not."""
    if n_usable == 0:
        return EXIT_FAILED
    return EXIT_PARTIAL if n_failed else EXIT_OK
