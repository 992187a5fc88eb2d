#!/usr/bin/env python3
"""A one-node SLURM on this machine, to try ``daskstack run --jobqueue slurm`` for real.

Needs root and Debian's ``munge``, ``slurmctld``, ``slurmd`` and ``slurm-client``
packages (``apt-get install munge slurmctld slurmd slurm-client``); no systemd. Every
file (munge key and socket, ``slurm.conf``, state, spool, logs, pid files) lives in one
directory, so nothing in /etc is touched and several instances cannot collide::

    sudo python3 scripts/slurm-local.py start            # prints: export SLURM_CONF=...
    export SLURM_CONF=/tmp/daskstack-slurm/slurm.conf
    sinfo                                                 # one node, partition "debug"
    daskstack run frames/*.fits.fz --catalog gaia --out run/ \\
        --jobqueue slurm --queue debug --cores 1 --memory 1GiB --max-jobs 2
    sudo python3 scripts/slurm-local.py stop             # cancels jobs, stops the daemons

``munged`` runs as the ``munge`` user; ``slurmctld`` and ``slurmd`` run as root
(``SlurmUser=root``). The daemons run in the foreground of background processes whose
pids are kept in ``DIR/pids.json``; ``stop`` ends exactly those pids.

The test ``tests/test_cluster.py::test_slurm_cluster_coadd_equals_local`` imports
this file (`start` / `stop`) to run the pipeline through dask-jobqueue's SLURMCluster.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DIR = Path(tempfile.gettempdir()) / "daskstack-slurm"
PIDS = "pids.json"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")


class SlurmError(RuntimeError):
    """The local SLURM cannot be started (missing packages, not root, daemon died)."""


def missing_tools() -> list[str]:
    """The programs this script needs that are not on PATH (sbin included)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [tool for tool in TOOLS if shutil.which(tool, path=path) is None]


def _which(tool: str) -> str:
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise SlurmError(f"{tool} not found: apt-get install munge slurmctld slurmd slurm-client")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """Half the machine's memory (MB): what the node offers to jobs."""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1024, int(pages / 2**20 / 2))
    except (ValueError, OSError):
        return 2048


def slurm_conf(directory: Path, host: str, cpus: int, memory_mb: int, ctld_port: int,
               slurmd_port: int, socket_path: Path) -> str:
    return "\n".join([
        "# a one-node SLURM written by daskstack's scripts/slurm-local.py",
        "ClusterName=daskstack",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={socket_path}",
        f"StateSaveLocation={directory / 'state'}",
        f"SlurmdSpoolDir={directory / 'spool'}",
        f"SlurmctldPidFile={directory / 'slurmctld.pid'}",
        f"SlurmdPidFile={directory / 'slurmd.pid'}",
        f"SlurmctldLogFile={directory / 'slurmctld.log'}",
        f"SlurmdLogFile={directory / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # trust CPUs/RealMemory as written
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "MinJobAge=30",
        "KillWait=5",
        "Waittime=0",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _read_pids(directory: Path) -> dict[str, int]:
    try:
        return json.loads((directory / PIDS).read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def start(directory: Path | None = None, *, cpus: int | None = None,
          memory_mb: int | None = None, timeout: float = 60.0) -> dict:
    """Start munged, slurmctld and slurmd; wait until the node is idle.

    Returns ``{"dir", "conf", "env", "pids"}``; ``env`` holds ``SLURM_CONF`` for
    ``sbatch`` and friends. Raises `SlurmError` (after stopping what it started) if a
    daemon does not come up.
    """
    if os.geteuid() != 0:
        raise SlurmError("the local SLURM needs root (slurmd runs jobs as any user)")
    if missing_tools():
        raise SlurmError(f"not installed: {', '.join(missing_tools())} "
                         "(apt-get install munge slurmctld slurmd slurm-client)")
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="daskstack-slurm-"))
    directory = Path(directory).absolute()
    if _read_pids(directory) and any(_alive(p) for p in _read_pids(directory).values()):
        raise SlurmError(f"a local SLURM already runs from {directory}: stop it first")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # munged (user munge) must reach its files in here
    for sub in ("state", "spool"):
        (directory / sub).mkdir(exist_ok=True)
    munge_user = pwd.getpwnam("munge")
    munge_dir = directory / "munge"
    munge_dir.mkdir(exist_ok=True)
    os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
    munge_dir.chmod(0o755)
    key = munge_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
    key.chmod(0o400)
    socket_path = munge_dir / "munge.socket"
    host = socket.gethostname().split(".")[0]
    conf = directory / "slurm.conf"
    conf.write_text(slurm_conf(directory, host, cpus or os.cpu_count() or 1,
                               memory_mb or _memory_mb(), _free_port(), _free_port(),
                               socket_path))
    env = dict(os.environ, SLURM_CONF=str(conf))
    pids: dict[str, int] = {}

    def launch(name, argv, **kwargs):
        log = open(directory / f"{name}.out", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                **kwargs)
        log.close()
        pids[name] = proc.pid
        (directory / PIDS).write_text(json.dumps(pids))
        return proc

    try:
        launch("munged", [_which("munged"), "--foreground", f"--key-file={key}",
                          f"--socket={socket_path}", f"--pid-file={munge_dir / 'munged.pid'}",
                          f"--log-file={munge_dir / 'munged.log'}",
                          f"--seed-file={munge_dir / 'munged.seed'}"],
               user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[])
        _wait(lambda: socket_path.exists(), 10, "munged did not open its socket", directory)
        launch("slurmctld", [_which("slurmctld"), "-D", "-f", str(conf)])
        _wait(lambda: _run(["scontrol", "ping"], env).returncode == 0
              and "UP" in _run(["scontrol", "ping"], env).stdout, timeout,
              "slurmctld did not answer", directory)
        launch("slurmd", [_which("slurmd"), "-D", "-f", str(conf), "-N", host])
        _wait(lambda: _node_state(env) in ("idle", "mixed", "allocated"), timeout,
              "slurmd did not register its node", directory)
    except BaseException:
        stop(directory)
        raise
    return {"dir": directory, "conf": conf, "env": {"SLURM_CONF": str(conf)}, "pids": pids,
            "host": host}


def _run(argv, env) -> subprocess.CompletedProcess:
    return subprocess.run([_which(argv[0]), *argv[1:]], env=env, capture_output=True,
                          text=True, timeout=30)


def _node_state(env) -> str:
    out = _run(["sinfo", "-h", "-N", "-o", "%T"], env)
    return out.stdout.strip().split("\n")[0].rstrip("*~#") if out.returncode == 0 else ""


def _wait(ready, timeout, message, directory) -> None:
    deadline = time.monotonic() + timeout
    pids = _read_pids(directory)
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [name for name, pid in pids.items() if not _alive(pid)]
        if dead:
            break
        time.sleep(0.25)
    tails = []
    for name in ("munged.out", "slurmctld.out", "slurmctld.log", "slurmd.out", "slurmd.log",
                 "munge/munged.log"):
        path = directory / name
        if path.exists():
            tails.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace")
                                                      .splitlines()[-15:]))
    raise SlurmError(f"{message} (within {timeout:.0f}s)\n" + "\n".join(tails))


def stop(directory: Path, timeout: float = 15.0) -> list[int]:
    """Cancel this SLURM's jobs, then end the daemons started by `start` (by pid).

    Returns the pids that were signalled.
    """
    directory = Path(directory)
    pids = _read_pids(directory)
    conf = directory / "slurm.conf"
    if pids.get("slurmctld") and _alive(pids["slurmctld"]) and conf.exists():
        env = dict(os.environ, SLURM_CONF=str(conf))
        try:  # a private cluster: every job in it is ours
            jobs = _run(["squeue", "-h", "-o", "%i"], env).stdout.split()
            if jobs:
                _run(["scancel", *jobs], env)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and _run(
                        ["squeue", "-h", "-o", "%i"], env).stdout.split():
                    time.sleep(0.3)
        except (subprocess.SubprocessError, OSError, SlurmError):
            pass
    signalled = []
    for name in ("slurmd", "slurmctld", "munged"):  # reverse order of start
        pid = pids.get(name)
        if not pid or not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        signalled.append(pid)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
    (directory / PIDS).unlink(missing_ok=True)
    return signalled


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"state directory (default {DEFAULT_DIR})")
    parser.add_argument("--cpus", type=int, help="CPUs of the node (default: all cores)")
    parser.add_argument("--memory-mb", type=int, help="node memory (default: half of it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            info = start(args.dir, cpus=args.cpus, memory_mb=args.memory_mb)
            print(f"local SLURM up (node {info['host']}, pids {info['pids']})", file=sys.stderr)
            print(f"export SLURM_CONF={info['conf']}")
        elif args.command == "stop":
            pids = stop(args.dir)
            print(f"stopped pids {pids}" if pids else "nothing running", file=sys.stderr)
        else:
            pids = _read_pids(args.dir)
            alive = {name: pid for name, pid in pids.items() if _alive(pid)}
            print(json.dumps(alive))
            return 0 if alive and len(alive) == 3 else 1
    except SlurmError as err:
        print(f"slurm-local: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
