#!/usr/bin/env bash
# A throw-away Slurm cluster on loopback for the tests of slurm/*.sbatch: munged, slurmctld and
# N slurmd "nodes" on this one machine (Slurm's multiple-slurmd layout), everything under one
# directory. Needs root (SlurmUser=root) and Debian/Ubuntu packages, installed with apt when missing.
#
#   tests/slurm_cluster.sh install            # apt-get install slurm + munge (unattended) if missing
#   tests/slurm_cluster.sh start DIR          # config, munged, slurmctld, slurmd x NODES; waits for idle
#   tests/slurm_cluster.sh stop DIR           # cancel jobs, stop daemons (by pidfile), delete state
#   . DIR/env.sh                              # then sbatch/squeue/scontrol talk to this cluster
#
# Environment: NODES (2), CPUS_PER_NODE (1), MEM_PER_NODE_MB (4000). Ports are chosen free at
# start, so two clusters (or another user's) on the same machine do not collide.
# Exit codes: 0 ok, 1 failure, 77 cannot run here (not root / no apt / install failed).
set -euo pipefail
# Debian installs the daemons in /usr/sbin, which a non-login environment may leave off PATH
export PATH="$PATH:/usr/sbin:/sbin"

log() { echo "[slurm_cluster] $*" >&2; }

have_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null
}

cmd_install() {
  have_slurm && return 0
  if [[ $(id -u) != 0 ]]; then log "need root to install slurm"; return 77; fi
  if ! command -v apt-get >/dev/null; then log "apt-get not available: cannot install slurm"; return 77; fi
  log "installing slurmctld slurmd slurm-client munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get update -qq >&2 \
     || ! apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >&2; then
    log "apt-get install failed"; return 77
  fi
  have_slurm || { log "slurm still missing after apt-get install"; return 77; }
}

# pid_of PIDFILE COMM: print the pid when it is alive and really is COMM
pid_of() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]] || return 1
  echo "$pid"
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_ports N: N consecutive free TCP ports from a random base
free_ports() {
  local n=$1 base p ok
  for _ in $(seq 50); do
    base=$((20000 + RANDOM % 20000)); ok=1
    for ((p = base; p < base + n; p++)); do port_free "$p" || { ok=0; break; }; done
    if ((ok)); then seq "$base" $((base + n - 1)); return 0; fi
  done
  log "no free port range found"; return 1
}

dump_logs() { tail -n 30 "$1"/log/*.log "$1"/munge/munged.log >&2 2>/dev/null || true; }

cmd_start() {
  local dir=$1 nodes=${NODES:-2} cpus=${CPUS_PER_NODE:-1} mem=${MEM_PER_NODE_MB:-4000}
  [[ $(id -u) == 0 ]] || { log "need root (SlurmUser=root)"; return 77; }
  have_slurm || { log "slurm is not installed (run: $0 install)"; return 77; }
  local host ports ctld_port i pid
  host=$(hostname -s)  # node 1 carries the real host name, so MASTER_ADDR resolves
  getent hosts "$host" >/dev/null || { log "the host name $host does not resolve (add it to /etc/hosts)"; return 77; }
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if pid_of "$dir/run/slurmctld.pid" slurmctld >/dev/null; then
    log "a cluster is already running in $dir"; return 1
  fi
  cmd_stop "$dir" 2>/dev/null || true  # leftovers of an earlier cluster in the same place
  rm -rf "${dir:?}"/{etc,spool,log,run,munge}
  mkdir -p "$dir"/{etc,spool/ctld,log,run}
  # munged insists that every directory above its socket is world-searchable (pytest's tmp dirs
  # are not), so its files live in a fresh directory under /tmp, linked from $dir/munge
  local m
  m=$(mktemp -d /tmp/agcl-munge.XXXXXX)
  chmod 755 "$m"
  ln -s "$m" "$dir/munge"
  mapfile -t ports < <(free_ports $((nodes + 1)))
  ctld_port=${ports[0]}
  local conf=$dir/etc/slurm.conf
  {
    cat <<EOF
# written by tests/slurm_cluster.sh
ClusterName=agcltest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$m/munge.socket.2,cred_expire=${CRED_EXPIRE_S:-10}
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# schedule every second: a requeued job becomes eligible after cred_expire, and nothing but the
# periodic pass (60 s / 30 s by default) would start it
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=5
Waittime=0
JobRequeue=1
EOF
    for ((i = 0; i < nodes; i++)); do
      local name=$host
      ((i > 0)) && name="$host-n$((i + 1))"
      echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[i + 1]} CPUs=$cpus" \
           "Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
  } > "$conf"
  : > "$dir/etc/gres.conf"
  echo "export SLURM_CONF=$conf" > "$dir/env.sh"
  export SLURM_CONF=$conf

  dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
  chmod 400 "$m/munge.key"
  munged --key-file="$m/munge.key" --socket="$m/munge.socket.2" --pid-file="$m/munged.pid" \
         --log-file="$m/munged.log" --seed-file="$m/munged.seed"
  for _ in $(seq 50); do [[ -S $m/munge.socket.2 ]] && break; sleep 0.1; done
  pid_of "$m/munged.pid" munged >/dev/null || { log "munged did not start"; dump_logs "$dir"; return 1; }

  slurmctld -f "$conf" || { log "slurmctld failed"; dump_logs "$dir"; return 1; }
  for _ in $(seq 100); do
    timeout 2 scontrol ping >/dev/null 2>&1 && break
    pid_of "$dir/run/slurmctld.pid" slurmctld >/dev/null || break
    sleep 0.1
  done
  pid_of "$dir/run/slurmctld.pid" slurmctld >/dev/null || { log "slurmctld did not start"; dump_logs "$dir"; return 1; }

  local names
  names=$(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$conf")
  for n in $names; do
    mkdir -p "$dir/spool/d-$n"
    slurmd -f "$conf" -N "$n" || { log "slurmd $n failed"; dump_logs "$dir"; return 1; }
  done
  local up=0
  for _ in $(seq 300); do
    up=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle" {print $1}' | sort -u | wc -l)
    ((up >= nodes)) && break
    sleep 0.1
  done
  if ((up < nodes)); then
    sinfo -N -l >&2 || true; log "only $up of $nodes nodes came up"; dump_logs "$dir"; return 1
  fi
  log "up: $nodes nodes, controller port $ctld_port; . $dir/env.sh"
}

stop_pidfile() {  # stop_pidfile PIDFILE COMM: TERM, wait up to 10 s, then KILL
  local pid
  pid=$(pid_of "$1" "$2") || { rm -f "$1"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
  if [[ -d /proc/$pid ]]; then
    log "$2 ($pid) still running after 10 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; sleep 0.2
  fi
  [[ -d /proc/$pid ]] && { log "$2 ($pid) would not stop"; return 1; }
  rm -f "$1"
}

cmd_stop() {
  local dir=$1 rc=0 jobs f
  [[ -d $dir ]] || return 0
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF=$dir/etc/slurm.conf
  if pid_of "$dir/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086  # one job id per word
      scancel --full $jobs 2>/dev/null || true
      for _ in $(seq 150); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
    fi
  fi
  local pids=()
  shopt -s nullglob
  for f in "$dir"/run/slurmd-*.pid; do stop_pidfile "$f" slurmd & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  stop_pidfile "$dir/run/slurmctld.pid" slurmctld || rc=1
  local m
  m=$(readlink "$dir/munge" || true)
  if [[ -n $m ]]; then stop_pidfile "$m/munged.pid" munged || rc=1; fi
  if ((rc == 0)); then
    [[ $m == /tmp/agcl-munge.* ]] && rm -rf "$m"
    rm -rf "${dir:?}"/{spool,run,munge}
  fi
  return "$rc"
}

case ${1:-} in
  install) cmd_install ;;
  start) [[ $# == 2 ]] || { echo "usage: $0 start DIR" >&2; exit 2; }; cmd_install; cmd_start "$2" ;;
  stop) [[ $# == 2 ]] || { echo "usage: $0 stop DIR" >&2; exit 2; }; cmd_stop "$2" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
