"""Where the pipeline runs: LocalCluster sizing, an existing scheduler that loses a worker
mid-run, a real one-node SLURM through dask-jobqueue, and options checked before work.

Every run here is compared with `sim_run` (the same frames through the test
LocalCluster): registration is deterministic (per-frame seed for the mesh check
points) and the combine reads each output chunk's frames in stack order, so the
coadd does not depend on where tasks ran or how often they were retried:
`assert_array_equal`, not allclose.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from click.testing import CliRunner

from daskstack import _cluster as cluster_mod
from daskstack.cli import main
from daskstack.config import ClusterSettings, Settings

from .helpers import dask_processes_in
from .helpers import free_port as _free_port
from .helpers import kill_group as _kill_group

ROOT = Path(__file__).resolve().parents[1]


def _load_slurm_script():
    spec = importlib.util.spec_from_file_location("slurm_local", ROOT / "scripts" /
                                                  "slurm-local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_same_coadds(coadds: dict, reference: dict) -> None:
    assert set(coadds) == set(reference)
    for filter_name, path in reference.items():
        np.testing.assert_array_equal(fits.getdata(coadds[filter_name]), fits.getdata(path),
                                      err_msg=filter_name)
        np.testing.assert_array_equal(fits.getdata(coadds[filter_name], "WEIGHT"),
                                      fits.getdata(path, "WEIGHT"), err_msg=filter_name)


# --------------------------------------------------------------------------------------
# Cheap: settings, CLI, job scripts (no cluster started)
# --------------------------------------------------------------------------------------
def test_local_cluster_sized_to_the_machine():
    kwargs = cluster_mod.local_cluster_kwargs(ClusterSettings())
    assert kwargs["n_workers"] == max(1, os.cpu_count())
    assert kwargs["threads_per_worker"] == 1
    assert kwargs["processes"] is True
    kwargs = cluster_mod.local_cluster_kwargs(
        ClusterSettings(n_workers=3, threads_per_worker=2, memory_limit="0.25"))
    assert (kwargs["n_workers"], kwargs["threads_per_worker"]) == (3, 2)
    assert kwargs["memory_limit"] == 0.25  # a fraction of the machine, as distributed takes it


def _worker_profiles(client) -> list:
    import dask

    return list(client.run(lambda: dask.config.get("distributed.worker.profile.enabled"))
                .values())


def test_worker_profiler_off_unless_asked(tmp_path):
    """distributed's statistical profiler samples every task thread 100 times a second
    on each worker's event loop; daskstack's LocalCluster leaves it off (the worker
    processes get the setting from their nanny), ``cluster.profile`` turns it on."""
    for profile in (False, True):
        settings = ClusterSettings(n_workers=1, profile=profile)
        with cluster_mod.open_client(settings, local_directory=str(tmp_path)) as client:
            assert _worker_profiles(client) == [profile]


def test_jobqueue_job_script_carries_the_settings(tmp_path):
    """cores, memory, walltime, queue, account, prologue, directives and this python reach
    the SLURM and PBS job scripts (a scheduler starts in-process; no job is submitted)."""
    pytest.importorskip("dask_jobqueue")
    settings = Settings.from_dict({"cluster": {
        "jobqueue": "slurm", "cores": 4, "memory": "8GiB", "walltime": "02:30:00",
        "queue": "short", "account": "lco-proj", "minimum_jobs": 0, "maximum_jobs": 20,
        "job_prologue": "module load python\nexport OMP_NUM_THREADS=1",
        "job_directives": "--constraint=haswell"}}).validate()
    for system, expected in (("slurm", ["#SBATCH -p short", "#SBATCH -A lco-proj",
                                        "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G",
                                        "#SBATCH -t 02:30:00", "#SBATCH --constraint=haswell"]),
                             ("pbs", ["#PBS -q short", "#PBS -A lco-proj",
                                      "walltime=02:30:00", "ncpus=4"])):
        settings = settings.replace("cluster", jobqueue=system)
        cluster = cluster_mod.jobqueue_cluster(settings.cluster, str(tmp_path))
        try:
            script = cluster.job_script()
            assert cluster.scheduler_address  # the scheduler runs here; jobs join it
            assert cluster._adaptive is not None  # adaptive scaling is on
        finally:
            cluster.close()
        for line in expected:
            assert line in script, (system, line, script)
        assert f"{sys.executable} -m distributed.cli.dask_worker" in script
        assert "module load python" in script and "--nthreads 4" in script


def test_run_help_documents_every_option():
    from daskstack.cli import run as run_command

    undocumented = [p.opts[0] for p in run_command.params
                    if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undocumented
    result = CliRunner().invoke(main, ["run", "--help"])
    assert result.exit_code == 0
    for option in ("--scheduler", "--jobqueue", "--workers", "--threads", "--memory-limit",
                   "--cores", "--memory", "--walltime", "--queue", "--account", "--min-jobs",
                   "--max-jobs", "--config", "--quiet", "--verbose", "--overwrite"):
        assert option in result.output


@pytest.mark.parametrize("args, message", [
    (["--walltime", "1h"], "cluster.walltime"),
    (["--memory", "lots"], "cluster.memory"),
    (["--memory-limit", "much"], "cluster.memory_limit"),
    (["--scheduler", "localhost:8786"], "cluster.scheduler"),
    (["--scheduler", "tcp://127.0.0.1:8786", "--jobqueue", "slurm"], "exclude each other"),
    (["--min-jobs", "5", "--max-jobs", "2"], "maximum_jobs"),
    (["--threads", "0"], "threads_per_worker"),
    (["--tile", "10"], "register.tile"),
    (["--reproject", "bilinear"], "bilinear"),
    (["--combine", "mode"], "mode"),
])
def test_bad_option_rejected_before_any_work(tmp_path, args, message):
    out = tmp_path / "out"
    frame = tmp_path / "frame.fits"
    frame.write_bytes(b"")
    result = CliRunner().invoke(main, ["run", str(frame), "--catalog", "x.ecsv", "--out",
                                       str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()  # nothing started, nothing written


def test_bad_option_in_config_file_rejected(tmp_path):
    config = tmp_path / "daskstack.toml"
    config.write_text('[cluster]\njobqueue = "slurm"\nwalltime = "forever"\n')
    result = CliRunner().invoke(main, ["run", "f.fits", "--catalog", "c", "--out",
                                       str(tmp_path / "o"), "--config", str(config)])
    assert result.exit_code == 2 and "cluster.walltime" in result.output
    # the command line overrides the file
    config.write_text('[cluster]\nwalltime = "forever"\n')
    settings = Settings.from_toml(config)
    settings = settings.update({"cluster.walltime": "00:10:00"})
    assert settings.validate().cluster.walltime == "00:10:00"


def test_unreachable_scheduler_is_a_clear_error(monkeypatch):
    from daskstack._cluster import ClusterError, open_client

    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", "2s")
    port = _free_port()  # nothing listens there
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with open_client(ClusterSettings(scheduler=f"tcp://127.0.0.1:{port}")):
            pass


def test_workers_without_the_inputs_are_a_clear_error(tmp_path):
    """Workers on another filesystem: one clear error, not N per-frame failures."""
    from daskstack._pipeline import FrameRecord, RunError, _check_workers_see_inputs

    here = tmp_path / "a.fits"
    here.write_bytes(b"")
    records = [FrameRecord(file=str(here), name="a", refusal="file does not exist")]
    with pytest.raises(RunError, match="workers cannot see the input files"):
        _check_workers_see_inputs(records)
    records[0].file = str(tmp_path / "gone.fits")  # missing here too: a per-frame failure
    _check_workers_see_inputs(records)


# --------------------------------------------------------------------------------------
# A real `dask scheduler` + two `dask worker` processes; one worker killed mid-run
# --------------------------------------------------------------------------------------
@pytest.fixture
def dask_processes(tmp_path):
    """A scheduler and two single-threaded workers on 127.0.0.1, each in its own process
    group and working directory (not the client's): ``(address, [worker procs])``."""
    with dask_processes_in(tmp_path) as (address, workers):
        yield address, workers


def test_existing_scheduler_survives_a_lost_worker(dask_processes, sim_field, sim_run,
                                                   tmp_path):
    """``daskstack run --scheduler tcp://...`` from a directory the workers do not share
    (relative input paths), one worker SIGKILLed as soon as the first frame is solved:
    the run completes, every frame solved, the coadd identical to a clean local run."""
    address, workers = dask_processes
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    inputs = [os.path.relpath(p, client_dir) for p in sim_field.frames]
    catalog = os.path.relpath(sim_field.catalog, client_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "daskstack.cli", "run", *inputs, "--catalog", catalog,
         "--out", "out", "--scheduler", address, "-q"],
        cwd=client_dir, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    out = client_dir / "out"
    killed_at = None
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if killed_at is None and list(out.glob("*.wcs")):
                _kill_group(workers[0])  # nanny and worker: the worker is gone for good
                killed_at = len(list(out.glob("*.wcs")))
            time.sleep(0.02)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    assert killed_at is not None and killed_at < len(sim_field.frames), \
        "the worker was not killed mid-run"
    assert workers[0].poll() is not None
    assert proc.returncode == 0, output
    manifest = Table.read(out / "manifest.ecsv")
    assert set(manifest["status"]) == {"ok"} and all(manifest["registered"])
    assert all(Path(f).is_absolute() for f in manifest["file"])  # workers got absolute paths
    _assert_same_coadds({f: out / f"coadd_{f}.fits" for f in sim_run.coadds}, sim_run.coadds)


# --------------------------------------------------------------------------------------
# A real one-node SLURM (munged, slurmctld, slurmd) and dask-jobqueue's SLURMCluster
# --------------------------------------------------------------------------------------
@pytest.fixture
def local_slurm(monkeypatch):
    slurm = _load_slurm_script()
    missing = slurm.missing_tools()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): "
                    "apt-get install munge slurmctld slurmd slurm-client")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM test needs root (munged as munge, slurmd as root)")
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="daskstack-slurm-"))  # munge must reach it
    info = None
    try:
        info = slurm.start(directory, cpus=min(2, os.cpu_count() or 1))
        for key, value in info["env"].items():
            monkeypatch.setenv(key, value)
        yield info
    finally:
        pids = dict(slurm._read_pids(directory)) or (info or {}).get("pids", {})
        slurm.stop(directory)
        still = {name: pid for name, pid in pids.items() if slurm._alive(pid)}
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        assert not still, f"daemons still running: {still}"


@pytest.mark.slurm
def test_slurm_cluster_coadd_equals_local(local_slurm, sim_field, sim_run, tmp_path):
    """The pipeline through dask-jobqueue's SLURMCluster (workers are sbatch jobs, scaled
    adaptively 0..2): same coadd as the local run; the jobs are gone afterwards."""
    from daskstack._pipeline import EXIT_OK, run

    settings = Settings.from_dict({"cluster": {
        "jobqueue": "slurm", "queue": "debug", "cores": 1, "memory": "1GiB",
        "walltime": "00:10:00", "minimum_jobs": 0, "maximum_jobs": 2}})
    notices = []

    def progress(phase, done, total):
        pass

    progress.notice = notices.append
    result = run([str(p) for p in sim_field.frames], str(sim_field.catalog),
                 tmp_path / "out", settings, progress=progress)
    assert result.exit_code == EXIT_OK
    assert any("Dask dashboard" in n for n in notices)
    logs = list((tmp_path / "out" / ".dask").glob("daskstack-*.err"))
    assert logs, "no SLURM job ran a worker"
    assert any("Start worker" in p.read_text() for p in logs)
    _assert_same_coadds(result.coadds, sim_run.coadds)
    squeue = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True,
                            timeout=30)
    jobs = [line for line in squeue.stdout.splitlines() if "RUNNING" in line]
    assert not jobs, f"jobs left running: {jobs}"


# --------------------------------------------------------------------------------------
# The graph: paths and small records, never pixels (benchmarks/graph_build.py, smaller)
# --------------------------------------------------------------------------------------
def test_graph_carries_no_pixels(tmp_path):
    """200 frames of 4096x4096 from synthetic headers: one task per frame and phase, each
    a few KB (a frame's pixels are 64 MiB). Build times: benchmarks/graph_build.py."""
    import json

    spec = importlib.util.spec_from_file_location("graph_build",
                                                  ROOT / "benchmarks" / "graph_build.py")
    graph_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph_build)
    out = tmp_path / "graph.json"
    assert graph_build.main(["--frames", "200", "--size", "4096", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert [phases[p]["tasks"] for p in ("inspect", "solve", "register")] == [200] * 3
    assert report["largest_task_bytes"] < 32 * 1024
    assert phases["combine"]["bytes_total"] < 8 * 2**20
