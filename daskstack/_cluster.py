"""Where the Dask graph runs: a LocalCluster (default), an existing scheduler, or batch jobs.

`open_client` is a context manager that yields a `distributed.Client` and closes
what it started (and only that) on exit:

* no ``scheduler`` and no ``jobqueue``: a `LocalCluster` sized to the machine
  (``n_workers`` processes of ``threads_per_worker`` threads, ``memory_limit`` each);
* ``scheduler = "tcp://host:port"``: an existing ``dask scheduler`` and its workers.
  Nothing assumes the workers share the client's working directory: the pipeline
  hands them absolute paths, which must be visible to them (a shared filesystem);
* ``jobqueue = "slurm"`` (``pbs``, ``sge``, ``lsf`` ...): workers are batch jobs
  submitted by dask-jobqueue, ``cores``/``memory``/``walltime``/``queue``/``account``
  each, scaled adaptively between ``minimum_jobs`` and ``maximum_jobs`` as tasks wait.
  The first job is submitted at once and waited for: a submission the batch system
  refuses stops the run with its own message (`JobSubmitError`), and no worker within
  ``worker_timeout`` seconds stops it too, instead of waiting for ever.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time

from .errors import DaskstackError

__all__ = [
    "ClusterError",
    "JobSubmitError",
    "describe",
    "jobqueue_cluster",
    "jobqueue_kwargs",
    "local_cluster_kwargs",
    "open_client",
]

log = logging.getLogger(__name__)

JOBQUEUE_CLASSES = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "oar": "OARCluster",
    "moab": "MoabCluster",
    "htcondor": "HTCondorCluster",
}

CONNECT_TIMEOUT = "20s"  # how long to try reaching an existing scheduler
# glibc's allocator in the local workers. distributed sets MALLOC_TRIM_THRESHOLD_ to 64 KiB
# (freed memory goes back to the system at once), which also fixes the mmap threshold at
# 128 KiB: every temporary array above it (a strip of a combine block, of a registered
# tile) is mapped and zero-faulted afresh, and the workers spent as much time in page
# faults as in the computation. Arrays below 32 MiB (glibc's largest mmap threshold) now
# reuse the heap: a registered 1024 x 1024 float32 tile is just over 4 MiB, so a 4 MiB
# threshold still mapped and faulted every one of them. Frames (64 MiB) are still mapped
# and handed back when freed, and free heap beyond 32 MiB is trimmed: memory stays flat.
# That 32 MiB is kept per arena, and glibc gives every thread that allocates its own:
# tensorstore's reading and decoding threads (`daskstack.store`) each held their own
# 32 MiB or more, so that a worker combining many frames grew with its threads. Two arenas
# (the main one, and one shared by every other thread) keep its memory where it was.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 32 * 2**20, "MALLOC_TRIM_THRESHOLD_": 32 * 2**20,
                     "MALLOC_ARENA_MAX": 2}

# systems whose dask-jobqueue class takes no walltime / no account keyword
_NO_WALLTIME = ("sge", "htcondor")
_NO_ACCOUNT = ("htcondor",)


class ClusterError(DaskstackError, RuntimeError):
    """The requested Dask cluster cannot be started or reached."""


class JobSubmitError(ClusterError):
    """The batch system refused a worker job; the message is the submit command's own."""


def _submit_message(err: Exception) -> str:
    """What the batch system said: dask-jobqueue's error holds the command's exit code,
    stdout and stderr; stderr (else stdout) is the scheduler's own message."""
    text = str(err)
    for marker in ("stderr:\n", "stdout:\n"):
        said = text.partition(marker)[2].partition("\nstderr:")[0].strip()
        if said:
            return said
    return text.strip()


class _SubmitFailures(list):
    """Refused submissions. Until the first worker joined, `open_client` stops the run
    with the first; afterwards (``running``) each new message is logged once as a
    warning, while the workers already there go on."""

    running = False


def _reporting_job_class(base, failures: _SubmitFailures):
    """``base`` (a dask-jobqueue Job class) whose failed submissions are recorded in
    ``failures`` as `JobSubmitError`, for `open_client` to stop the run with."""

    class ReportingJob(base):
        async def start(self):
            try:
                await super().start()
            except (RuntimeError, ValueError) as err:  # non-zero exit; no job id printed
                from distributed.core import Status

                # failed, not 'created': closing the cluster asserts no job is left half-made
                self.status = Status.failed
                failure = JobSubmitError(_submit_message(err))
                if failures.running and str(failure) not in map(str, failures):
                    log.warning("a further worker job was refused: %s", failure)
                failures.append(failure)
                raise failure from None

    ReportingJob.__name__ = ReportingJob.__qualname__ = base.__name__
    return ReportingJob


class _DropReported(logging.Filter):
    """Drop the tracebacks distributed and asyncio log for a refused job: `open_client`
    reports it once, in the batch system's words."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, JobSubmitError):
            return False
        return "JobSubmitError" not in record.getMessage()


_DROP_REPORTED = _DropReported()
_LOGGERS_OF_CALLBACK_ERRORS = ("asyncio", "tornado.application", "distributed",
                               "distributed.deploy.spec", "distributed.deploy.adaptive",
                               "distributed.deploy.adaptive_core", "distributed.utils")


def _memory_limit(value: str):
    value = str(value).strip()
    if value.lower() in ("none", "0"):
        return 0  # no limit
    try:
        return float(value) if float(value) <= 1 else value
    except ValueError:
        return value  # "auto", "4GiB": distributed parses them


def local_cluster_kwargs(settings) -> dict:
    """`LocalCluster` keywords: one single-threaded worker process per core by default."""
    threads = max(1, settings.threads_per_worker)
    n_workers = settings.n_workers or max(1, (os.cpu_count() or 1) // threads)
    return {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "memory_limit": _memory_limit(settings.memory_limit),
        "processes": True,
        "dashboard_address": ":0",  # any free port: never collide with another run
        "silence_logs": logging.ERROR,
    }


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


def jobqueue_kwargs(settings, local_directory=None) -> dict:
    """Keywords of the dask-jobqueue cluster class for ``settings`` (no job is submitted).

    One worker process per job with ``cores`` threads and ``memory``; the job's
    python is this interpreter unless ``python`` is set; the scheduler (in this
    process) serves its dashboard on a free port.
    """
    worker_dir = settings.worker_directory or local_directory
    kwargs = {
        "cores": settings.cores,
        "processes": 1,
        "memory": settings.memory,
        "walltime": settings.walltime,
        "python": settings.python or sys.executable,
        "job_name": "daskstack",
        "local_directory": worker_dir,
        "log_directory": local_directory,
        "death_timeout": 120,  # a job whose client went away ends instead of idling
        "scheduler_options": {"dashboard_address": ":0"},
    }
    if settings.interface:
        kwargs["interface"] = settings.interface
    if settings.queue:
        kwargs["queue"] = settings.queue
    if settings.account and settings.jobqueue not in _NO_ACCOUNT:
        kwargs["account"] = settings.account
    if settings.jobqueue in _NO_WALLTIME:
        kwargs.pop("walltime")
    if _lines(settings.job_prologue):
        kwargs["job_script_prologue"] = _lines(settings.job_prologue)
    if _lines(settings.job_directives):
        kwargs["job_extra_directives"] = _lines(settings.job_directives)
    return kwargs


def jobqueue_cluster(settings, local_directory=None,
                     failures: _SubmitFailures | None = None):
    """A dask-jobqueue cluster (SLURM, PBS, ...) scaled adaptively between min and max jobs.

    Refused submissions are appended to ``failures`` (a list) as `JobSubmitError`."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(
            "cluster.jobqueue is set but dask-jobqueue is not installed: "
            "pip install 'daskstack[jobqueue]'"
        ) from None
    name = JOBQUEUE_CLASSES.get(settings.jobqueue)
    if name is None:
        raise ClusterError(f"unknown cluster.jobqueue {settings.jobqueue!r} "
                           f"(one of {', '.join(JOBQUEUE_CLASSES)})")
    cls = getattr(dask_jobqueue, name)
    kwargs = jobqueue_kwargs(settings, local_directory)
    if failures is not None:
        kwargs["job_cls"] = _reporting_job_class(cls.job_cls, failures)
    try:
        cluster = cls(**kwargs)
    except Exception as err:  # jobqueue raises plain Exceptions for bad configs
        raise ClusterError(f"cannot start a {settings.jobqueue} cluster: {err}") from None
    try:
        cluster.adapt(minimum_jobs=settings.minimum_jobs, maximum_jobs=settings.maximum_jobs)
    except Exception:
        cluster.close()
        raise
    log.info("job script:\n%s", cluster.job_script())
    return cluster


def describe(client) -> str:
    """One line: where the client runs and with what (workers, threads)."""
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        return f"{client.scheduler.address}: {len(workers)} workers, {threads} threads"
    except Exception:  # an informational line must never fail a run
        return str(getattr(client.scheduler, "address", "?"))


@contextlib.contextmanager
def _environ(values: dict):
    """``values`` in ``os.environ`` for the duration, the earlier ones restored after:
    distributed lets the environment override its pre-spawn settings, and leaves its
    own (an earlier cluster's) there."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update({key: str(value) for key, value in values.items()})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def open_client(settings, *, local_directory=None, announce=None):
    """Yield a `distributed.Client` for ``settings`` (a `ClusterSettings`).

    ``announce``, if given, is called with one-line notices for the user (the
    dashboard address, where the workers are).
    """
    import dask
    from distributed import Client, LocalCluster

    def notice(text):
        log.info("%s", text)
        if announce is not None:
            announce(text)

    cluster = None
    filtered = False
    try:
        if settings.scheduler:
            try:
                client = Client(settings.scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise ClusterError(f"cannot reach the Dask scheduler at {settings.scheduler}: "
                                   f"{err}") from None
        else:
            if settings.jobqueue:
                failures = _SubmitFailures()
                for name in _LOGGERS_OF_CALLBACK_ERRORS:
                    logging.getLogger(name).addFilter(_DROP_REPORTED)
                filtered = True
                cluster = jobqueue_cluster(settings, local_directory, failures)
            else:
                environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                           **WORKER_MALLOC_ENV}
                try:
                    with _sigint_ignored_by_children(), dask.config.set(
                            {"distributed.nanny.pre-spawn-environ": environ,
                             # each nanny hands this config to its worker process
                             "distributed.worker.profile.enabled": settings.profile}), \
                            _environ(WORKER_MALLOC_ENV):
                        cluster = LocalCluster(local_directory=local_directory,
                                               **local_cluster_kwargs(settings))
                except (OSError, ValueError) as err:
                    raise ClusterError(f"cannot start a local Dask cluster: {err}") from None
            client = Client(cluster)
        try:
            _forward_worker_logs(client)
            dashboard = getattr(client, "dashboard_link", None)
            if dashboard:
                notice(f"Dask dashboard: {dashboard}")
            if settings.jobqueue:
                notice(f"Dask scheduler {client.scheduler.address}: {settings.jobqueue} jobs "
                       f"of {settings.cores} cores / {settings.memory}, adaptive "
                       f"{settings.minimum_jobs}..{settings.maximum_jobs}")
                _wait_for_first_worker(client, cluster, settings, failures, notice,
                                       local_directory)
            else:
                notice(f"Dask scheduler {describe(client)}")
                if settings.scheduler and not client.scheduler_info().get("workers"):
                    notice("the scheduler has no workers yet: tasks wait until some join")
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
        if filtered:
            for name in _LOGGERS_OF_CALLBACK_ERRORS:
                logging.getLogger(name).removeFilter(_DROP_REPORTED)


def _forward_worker_logs(client) -> None:
    """daskstack's log records made on the workers are handled in this process, by its
    logging (the command's -q / -v level), instead of printed by each worker: -q is
    quiet everywhere. Only records at the level this process shows travel."""
    package = __name__.split(".")[0]
    client.forward_logging(package, level=logging.getLogger(package).getEffectiveLevel())


def _wait_for_first_worker(client, cluster, settings, failures: _SubmitFailures, notice,
                           log_directory) -> None:
    """Submit one job now and wait until its worker joins: raise `JobSubmitError` (the
    batch system's message) as soon as a submission is refused, `ClusterError` when no
    worker joined within ``settings.worker_timeout`` seconds. Then scale adaptively."""
    cluster.adapt(minimum_jobs=max(1, settings.minimum_jobs),
                  maximum_jobs=settings.maximum_jobs)
    deadline = time.monotonic() + settings.worker_timeout
    notice(f"waiting for the first {settings.jobqueue} worker (up to "
           f"{settings.worker_timeout:g} s) ...")
    while not client.scheduler_info().get("workers"):
        if failures:
            raise JobSubmitError(f"{settings.jobqueue} job submission failed: "
                                 f"{failures[0]}")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"no {settings.jobqueue} worker joined within {settings.worker_timeout:g} s: "
                "the jobs were submitted but none started (still queued? see the queue, "
                f"e.g. squeue, and the job logs in {log_directory}); "
                "--worker-timeout sets how long to wait")
        time.sleep(0.5)
    failures.running = True
    cluster.adapt(minimum_jobs=settings.minimum_jobs, maximum_jobs=settings.maximum_jobs)


@contextlib.contextmanager
def _sigint_ignored_by_children():
    """Worker processes started here ignore SIGINT (they inherit the disposition): a
    Ctrl-C, which the terminal sends to every process of the group, is handled once, by
    the command, which then closes the cluster; no traceback from each worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_heap_frozen = False


def freeze_worker_heap() -> None:
    """In a worker process, once: collect, then move every object alive now (the modules
    and libraries a task has imported) out of the collector's reach (`gc.freeze`).

    A registration task allocates many container objects (WCS, FITS headers, zarr
    metadata), so full collections run often, and each walks every object of astropy,
    dask and zarr again; measured by hand, they were a third of the time of zarr's reads.
    Raising the collector's thresholds instead lets cyclic garbage (astropy HDUs) pile
    up. Not in the client's own process (no parent process), whose objects are the
    user's."""
    global _heap_frozen
    if _heap_frozen or multiprocessing.parent_process() is None:
        return
    gc.collect()
    gc.freeze()
    _heap_frozen = True
