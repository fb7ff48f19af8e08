#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm: munged + slurmctld + slurmd), for the
# `slurm` tests and for trying scripts/slurm.sh and `python -m clsvit.sweep --launcher slurm` locally.
#
#   bash scripts/slurm_local_cluster.sh start     # installs slurm-wlm if missing (root), writes the config, starts the daemons
#   bash scripts/slurm_local_cluster.sh status    # sinfo
#   bash scripts/slurm_local_cluster.sh stop      # stops the daemons this script started
#
# The node is this machine with its CPUs (no GPUs); one partition `local`. The config goes to
# /etc/slurm/slurm.conf and is only ever (over)written when it carries this script's marker line, so a
# real cluster's configuration is never touched. Daemon state and logs: $STATE (/var/tmp/clsvit-slurm).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by clsvit scripts/slurm_local_cluster.sh"
STATE=${CLSVIT_SLURM_STATE:-/var/tmp/clsvit-slurm}

apt_get() {  # another process may hold the apt/dpkg lock: wait for it, and retry `update` (its lock is not waited for)
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 "$@"; then return 0; fi
    echo "slurm_local_cluster: apt-get $1 failed (attempt $attempt; another apt may hold the lock), retrying in 30 s" >&2
    sleep 30
  done
  return 1
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "slurm_local_cluster: slurm-wlm is not installed; run as root to install it" >&2; exit 1; }
  apt_get update
  apt_get install -y --no-install-recommends slurm-wlm munge
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    echo "slurm_local_cluster: $CONF exists and was not written by this script; refusing to replace it" >&2
    exit 1
  fi
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))  # MiB, leaving 1 GiB to the system
  mkdir -p "$STATE/ctld" "$STATE/d" /etc/slurm
  cat >"$CONF" <<EOF
$MARKER
ClusterName=clsvit-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
# processes are tracked by their parent chain: no cgroup delegation needed (containers)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
# schedule as soon as a job is submitted or a node frees up; share the node core by core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# a requeued job may start again after the credential of its previous run expired (default 120 s)
AuthInfo=cred_expire=10
KillWait=10
MailProg=/bin/true
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install
  write_config
  mkdir -p /run/munge "$STATE"
  if ! running "$STATE/munged.pid"; then
    [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
  fi
  if running "$STATE/slurmctld.pid"; then scontrol reconfigure; else /usr/sbin/slurmctld; fi  # reload a changed config
  running "$STATE/slurmd.pid" || /usr/sbin/slurmd
  local host
  host=$(hostname -s)
  for _ in $(seq 60); do
    if sinfo --noheader --nodes "$host" --format %t 2>/dev/null | grep -qx idle; then
      echo "slurm_local_cluster: node $host idle ($(nproc) CPUs), partition local; state and logs in $STATE"
      return 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm_local_cluster: the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  for daemon in slurmd slurmctld munged; do
    if running "$STATE/$daemon.pid"; then
      kill "$(cat "$STATE/$daemon.pid")"
      for _ in $(seq 30); do running "$STATE/$daemon.pid" || break; sleep 0.5; done
    fi
    rm -f "$STATE/$daemon.pid"
  done
  echo "slurm_local_cluster: stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
