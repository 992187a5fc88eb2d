"""Run one command as its own process and measure it as a whole.

Wall time, CPU time (user + system of the process and every descendant it reaped,
from ``getrusage(RUSAGE_CHILDREN)``) and the peak resident memory of the process
*tree* (the process and all its children, e.g. the worker processes of a Dask
``LocalCluster``), sampled with psutil every ``interval`` seconds, and the peak of the
largest single process of that tree.

A memory cap turns "the machine ran out of memory" into a recorded result: when the
tree's RSS exceeds ``mem_limit_bytes`` the whole tree is killed (by pid, SIGKILL) and
the run is recorded with ``status="out-of-memory"`` and the RSS at which it was
stopped, instead of letting the kernel's OOM killer take the benchmark with it.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

GiB = 2**30


@dataclass
class Measurement:
    cmd: list[str]
    status: str  # "ok" | "failed" | "out-of-memory" | "timeout"
    returncode: int | None
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    peak_rss_bytes: int
    peak_process_rss_bytes: int = 0  # the largest single process of the tree, at any sample
    stopped_at_rss_bytes: int | None = None
    n_samples: int = 0
    max_processes: int = 0
    log: str = ""
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (t, rss) ~1 per s

    @property
    def cpu_s(self) -> float:
        return self.cpu_user_s + self.cpu_sys_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out["cpu_s"] = self.cpu_s
        out["peak_rss_gib"] = self.peak_rss_bytes / GiB
        return out


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return [proc]


def tree_rss(proc: psutil.Process) -> tuple[int, int, int]:
    """(sum of RSS over the process and its descendants, number of processes, RSS of the
    largest one)."""
    total, count, largest = 0, 0, 0
    for p in _tree(proc):
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        count += 1
        largest = max(largest, rss)
    return total, count, largest


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL the process and every descendant, each by its pid."""
    victims = _tree(proc)
    for p in reversed(victims):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def run_measured(cmd, *, cwd=None, log_path=None, env=None, mem_limit_bytes: int | None = None,
                 timeout_s: float | None = None, interval: float = 0.1) -> Measurement:
    """Run ``cmd`` to completion (or until stopped) and measure it; never raises for a
    failing command (its status and return code are recorded)."""
    cmd = [str(c) for c in cmd]
    log_path = Path(log_path) if log_path else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL
    start = time.perf_counter()
    try:
        popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    finally:
        if log_path:
            log.close()
    proc = psutil.Process(popen.pid)
    peak, peak_process, n_samples, max_procs = 0, 0, 0, 0
    status, stopped_at = "ok", None
    timeline: list[tuple[float, int]] = []
    next_mark = 0.0
    done = threading.Event()

    while popen.poll() is None:
        rss, count, largest = tree_rss(proc)
        n_samples += 1
        peak = max(peak, rss)
        peak_process = max(peak_process, largest)
        max_procs = max(max_procs, count)
        elapsed = time.perf_counter() - start
        if elapsed >= next_mark:
            timeline.append((round(elapsed, 2), rss))
            next_mark = elapsed + 1.0
        if mem_limit_bytes and rss > mem_limit_bytes:
            status, stopped_at = "out-of-memory", rss
            kill_tree(proc)
            break
        if timeout_s and elapsed > timeout_s:
            status = "timeout"
            kill_tree(proc)
            break
        done.wait(interval)
    popen.wait()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if status == "ok" and popen.returncode != 0:
        status = "failed"
    return Measurement(
        cmd=cmd, status=status, returncode=popen.returncode, wall_s=wall,
        cpu_user_s=after.ru_utime - before.ru_utime, cpu_sys_s=after.ru_stime - before.ru_stime,
        peak_rss_bytes=int(peak), peak_process_rss_bytes=int(peak_process), stopped_at_rss_bytes=stopped_at, n_samples=n_samples,
        max_processes=max_procs, log=str(log_path or ""), timeline=timeline)


def default_mem_limit() -> int:
    """90% of the memory available when the benchmark starts."""
    return int(psutil.virtual_memory().available * 0.9)


def single_core_env(base=None) -> dict:
    env = dict(base or os.environ)
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[key] = "1"
    return env
