#!/usr/bin/env bash
# Start the slurmd of node NAME on its test-bed host NS (the network namespace .ci/slurm_setup.sh made),
# in that namespace, under that name, with the host's /etc/hosts (which names its link, for the
# `partition` and `host_down` faults). Not `ip netns exec`: that mounts a fresh /sys without the cgroup
# hierarchies slurmd needs. Also brings a node back after a test took its host down.
set -euo pipefail
NAME="$1"
NS="$2"
mkdir -p "/var/spool/slurmd/$NAME"
nsenter --net="/run/netns/$NS" unshare --mount --uts sh -c \
  "mount --bind /etc/netns/$NS/hosts /etc/hosts && hostname $NAME && exec /usr/sbin/slurmd -N $NAME"
