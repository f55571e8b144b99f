#!/usr/bin/env bash
# Stop what .ci/slurm_setup.sh started (slurmctld, slurmd, munged), by their pid files, and remove the
# test bed its nodes ran on.
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null
for pidfile in /run/slurmd*.pid /run/slurmctld.pid /run/munge/munged.pid; do
  if [ -s "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null && echo "stopped $(basename "$pidfile" .pid)"
  fi
done
sed -i '/# slurm_setup.sh$/d' /etc/hosts
cd "$(dirname "$0")/.." && "${PYTHON:-python}" tests/hosts.py cleanup slurm >/dev/null
exit 0
