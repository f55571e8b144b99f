#!/usr/bin/env bash
# A single-host Slurm cluster for tests/test_slurm.py: Debian's slurm-wlm + munge and NODES
# fake nodes, each its own slurmd on this host (Slurm places the components of a het job, one
# per torchx role, on distinct nodes, so a single node never runs the job). The node names
# resolve to 127.0.0.1 through /etc/hosts. No accounting database: sacct does not work, the
# test polls scontrol instead. Needs root. Idempotent; undo with .ci/slurm_teardown.sh.
set -euo pipefail

NODES="${SLURM_FAKE_NODES:-4}"      # lighthouse + up to 3 replica groups
CPUS="${SLURM_FAKE_CPUS:-2}"        # per node
MEM_MB="${SLURM_FAKE_MEM_MB:-4000}" # per node
HOST="$(hostname -s)"
NAMES="$(seq -f 'slurmci%g' 1 "$NODES" | paste -sd' ')"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
if ! grep -q "# slurm_setup.sh" /etc/hosts; then
  echo "127.0.0.1 ${NAMES} # slurm_setup.sh" >> /etc/hosts
fi
cat > /etc/slurm/slurm.conf <<CONF
# Written by .ci/slurm_setup.sh: a one-host test cluster.
ClusterName=localsgd-ci
SlurmctldHost=${HOST}
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Het jobs are started by the backfill scheduler only: run it every second, not every 30.
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Trust the node lines below over the hardware (they share this machine's cores).
SlurmdParameters=config_overrides
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 minutes (no accounting database here).
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=slurmci[1-${NODES}] NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

# munge: the key comes with the package; create one if a minimal image lacks it.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! pgrep -u munge -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi
munge -n | unmunge >/dev/null

# (Re)start the daemons so they read this slurm.conf.
for pidfile in /run/slurmctld.pid /run/slurmd*.pid; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"
    sleep 1
  fi
done
/usr/sbin/slurmctld -i
for n in ${NAMES}; do
  mkdir -p "/var/spool/slurmd/$n"
  /usr/sbin/slurmd -N "$n"
done

# Wait (bounded) until every node is schedulable.
for _ in $(seq 60); do
  idle="$(sinfo -h -N -o %t 2>/dev/null | grep -c '^idle' || true)"
  if [ "$idle" -ge "$NODES" ]; then
    echo "slurm: ${NODES} nodes idle (${NAMES}; ${CPUS} CPUs, ${MEM_MB} MB each)"
    exit 0
  fi
  for n in $(sinfo -h -N -t down,drain -o %N 2>/dev/null); do
    scontrol update nodename="$n" state=resume 2>/dev/null || true
  done
  sleep 1
done
echo "slurm: the nodes did not become idle; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
