#!/usr/bin/env bash
# A Slurm cluster across the hosts of the multi-host test bed (tests/hosts.py): Debian's slurm-wlm +
# munge, slurmctld in this machine's root network namespace, and one slurmd per bed host, each in its
# own network namespace under its own hostname and address (NodeAddr), so that every role of a job runs
# on a host of its own and every byte between them crosses the test bridge (Slurm places the components
# of a het job, one per torchx role, on distinct nodes). The node names resolve on every host and here
# (/etc/hosts, tagged). No accounting database: sacct does not work, the tests poll scontrol instead.
# Needs root and network namespaces. Idempotent; undo with .ci/slurm_teardown.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES="${SLURM_FAKE_NODES:-5}"      # lighthouse + 4 nodes: 3 groups, or 2 groups of 2 nodes
CPUS="${SLURM_FAKE_CPUS:-2}"        # per node
MEM_MB="${SLURM_FAKE_MEM_MB:-4000}" # per node
PYTHON="${PYTHON:-python}"          # one that imports localsgd_ft (the test bed reads its contract)
HOST="$(hostname -s)"
NAMES="$(seq -f 'slurmci%g' 1 "$NODES" | paste -sd' ')"
TAG=slurm

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge

# Stop daemons of an earlier setup first: they may live in the bed's namespaces, rebuilt below.
for pidfile in /run/slurmctld.pid /run/slurmd*.pid; do
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")"
    sleep 1
  fi
done

# The hosts: the bed checks itself isolated before it stays up (198.18.0.0/15, no way out).
# shellcheck disable=SC2086
BED="$("$PYTHON" tests/hosts.py up "$TAG" $NAMES)"
bed() {  # "root": the root namespace's address on the bridge; else FORMAT once per host ({name}, {address})
  "$PYTHON" -c 'import json, sys; b = json.loads(sys.argv[1]); f = sys.argv[2]
print(b["root_address"] if f == "root" else "\n".join(f.format(**h) for h in b["hosts"]))' "$BED" "$1"
}
ROOT_ADDR="$(bed root)"
NODE_LINES="$(bed "NodeName={name} NodeHostname={name} NodeAddr={address} CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN")"
sed -i '/# slurm_setup.sh$/d' /etc/hosts
bed "{address} {name} # slurm_setup.sh" >> /etc/hosts

cat > /etc/slurm/slurm.conf <<CONF
# Written by .ci/slurm_setup.sh: a test cluster across the multi-host test bed's hosts.
ClusterName=localsgd-ci
SlurmctldHost=${HOST}(${ROOT_ADDR})
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
# A node whose slurmd stops answering (its host gone dark) is DOWN after 30 s, not the default 300.
SlurmdTimeout=30
# Keep finished jobs visible to scontrol for 10 minutes (no accounting database here).
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
${NODE_LINES}
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

# The daemons, reading this slurm.conf: each slurmd on its own host.
/usr/sbin/slurmctld -i
i=0
for n in ${NAMES}; do
  bash .ci/slurm_node.sh "$n" "lsft-${TAG}-h${i}"
  i=$((i + 1))
done

# Wait (bounded) until every node is schedulable.
for _ in $(seq 60); do
  idle="$(sinfo -h -N -o %t 2>/dev/null | grep -c '^idle' || true)"
  if [ "$idle" -ge "$NODES" ]; then
    echo "slurm: ${NODES} nodes idle (${NAMES} on the test bed's hosts; ${CPUS} CPUs, ${MEM_MB} MB each)"
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
