"""Where the Dask graph runs: a LocalCluster (default), an existing scheduler, or batch jobs.

`open_client` is a context manager that yields a `distributed.Client` and closes
what it started (and only that) on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os

__all__ = ["ClusterError", "open_client"]

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


class ClusterError(RuntimeError):
    """The requested Dask cluster cannot be started or reached."""


def local_cluster_kwargs(settings) -> dict:
    n_workers = settings.n_workers or max(1, (os.cpu_count() or 1) // settings.threads_per_worker)
    return {
        "n_workers": n_workers,
        "threads_per_worker": settings.threads_per_worker,
        "memory_limit": settings.memory_limit,
        "processes": True,
        "dashboard_address": ":0",  # any free port: never collide with another run
        "silence_logs": logging.ERROR,
    }


def jobqueue_cluster(settings, local_directory=None):
    """A dask-jobqueue cluster (SLURM, PBS, ...) scaled adaptively between min and max jobs."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ClusterError(
            "cluster.jobqueue is set but dask-jobqueue is not installed: "
            "pip install 'daskstack[jobqueue]'"
        ) from None
    cls = getattr(dask_jobqueue, JOBQUEUE_CLASSES[settings.jobqueue])
    kwargs = {
        "cores": settings.cores,
        "processes": 1,
        "memory": settings.memory,
        "walltime": settings.walltime,
        "local_directory": local_directory,
        "log_directory": local_directory,
    }
    if settings.queue:
        kwargs["queue"] = settings.queue
    if settings.account:
        kwargs["account"] = settings.account
    if settings.jobqueue in ("sge", "htcondor"):
        kwargs.pop("walltime")
    try:
        cluster = cls(**kwargs)
    except Exception as err:  # jobqueue raises plain Exceptions for bad configs
        raise ClusterError(f"cannot start a {settings.jobqueue} cluster: {err}") from None
    cluster.adapt(minimum_jobs=settings.minimum_jobs, maximum_jobs=settings.maximum_jobs)
    log.info("job script:\n%s", cluster.job_script())
    return cluster


@contextlib.contextmanager
def open_client(settings, *, local_directory=None, announce=None):
    """Yield a `distributed.Client` for ``settings`` (a `ClusterSettings`).

    ``announce``, if given, is called with one-line notices for the user (the
    dashboard address).
    """
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if settings.scheduler:
            try:
                client = Client(settings.scheduler, timeout="20s")
            except (OSError, TimeoutError) as err:
                raise ClusterError(f"cannot reach the Dask scheduler at {settings.scheduler}: "
                                   f"{err}") from None
        else:
            if settings.jobqueue:
                cluster = jobqueue_cluster(settings, local_directory)
            else:
                cluster = LocalCluster(local_directory=local_directory,
                                       **local_cluster_kwargs(settings))
            client = Client(cluster)
        dashboard = getattr(client, "dashboard_link", None)
        if dashboard:
            log.info("Dask dashboard: %s", dashboard)
            if announce is not None:
                announce(f"Dask dashboard: {dashboard}")
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()
