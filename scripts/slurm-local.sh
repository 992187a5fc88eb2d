#!/usr/bin/env sh
# A one-node SLURM on this machine (root; Debian's munge, slurmctld, slurmd, slurm-client).
#   sudo scripts/slurm-local.sh start   # prints: export SLURM_CONF=...
#   sudo scripts/slurm-local.sh stop    # cancels its jobs, stops the daemons by pid
# See scripts/slurm-local.py (this is a thin wrapper around it) for the details.
exec "${PYTHON:-python3}" "$(dirname "$0")/slurm-local.py" "$@"
