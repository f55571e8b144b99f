#!/usr/bin/env bash
# Stop what .ci/slurm_setup.sh started (slurmctld, slurmd, munged), by their pid files.
set -uo pipefail
scancel --user="$(id -un)" 2>/dev/null
for pidfile in /run/slurmd*.pid /run/slurmctld.pid /run/munge/munged.pid; do
  if [ -s "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null && echo "stopped $(basename "$pidfile" .pid)"
  fi
done
sed -i '/# slurm_setup.sh$/d' /etc/hosts
exit 0
