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
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from .errors import DaskstackError

__all__ = [
    "ClusterError",
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

# systems whose dask-jobqueue class takes no walltime / no account keyword
_NO_WALLTIME = ("sge", "htcondor")
_NO_ACCOUNT = ("htcondor",)


class ClusterError(DaskstackError, RuntimeError):
    """The requested Dask cluster cannot be started or reached."""


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


def jobqueue_cluster(settings, local_directory=None):
    """A dask-jobqueue cluster (SLURM, PBS, ...) scaled adaptively between min and max jobs."""
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
    try:
        cluster = cls(**jobqueue_kwargs(settings, local_directory))
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
def open_client(settings, *, local_directory=None, announce=None):
    """Yield a `distributed.Client` for ``settings`` (a `ClusterSettings`).

    ``announce``, if given, is called with one-line notices for the user (the
    dashboard address, where the workers are).
    """
    from distributed import Client, LocalCluster

    def notice(text):
        log.info("%s", text)
        if announce is not None:
            announce(text)

    cluster = None
    try:
        if settings.scheduler:
            try:
                client = Client(settings.scheduler, timeout=CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as err:
                raise ClusterError(f"cannot reach the Dask scheduler at {settings.scheduler}: "
                                   f"{err}") from None
        else:
            if settings.jobqueue:
                cluster = jobqueue_cluster(settings, local_directory)
            else:
                try:
                    cluster = LocalCluster(local_directory=local_directory,
                                           **local_cluster_kwargs(settings))
                except (OSError, ValueError) as err:
                    raise ClusterError(f"cannot start a local Dask cluster: {err}") from None
            client = Client(cluster)
        try:
            dashboard = getattr(client, "dashboard_link", None)
            if dashboard:
                notice(f"Dask dashboard: {dashboard}")
            if settings.jobqueue:
                notice(f"Dask scheduler {client.scheduler.address}: {settings.jobqueue} jobs "
                       f"of {settings.cores} cores / {settings.memory}, adaptive "
                       f"{settings.minimum_jobs}..{settings.maximum_jobs}")
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
