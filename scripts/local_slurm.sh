#!/usr/bin/env bash
# Start, stop or inspect a single-machine Slurm cluster for development and CI.
#
# Usage (as root):
#   eval "$(scripts/local_slurm.sh start)"   # start the cluster and export SLURM_CONF
#   scripts/local_slurm.sh status            # daemons up/down, then sinfo
#   scripts/local_slurm.sh stop              # cancel all jobs, stop the daemons
#
# The cluster is Debian 12's Slurm 22.05 with slurmdbd accounting on MariaDB and
# two slurmd (node1, node2) on this machine. Every daemon is started directly
# (no systemd) and writes its pid file under LOCAL_SLURM_DIR, which also contains
# all configs, logs, spool folders, the MariaDB datadir and the MUNGE key and socket.
# `start` prints only the `export SLURM_CONF=...` line on stdout; all progress
# messages of every command go to stderr.
#
# Environment:
#   LOCAL_SLURM_DIR        state folder (default /tmp/fcmae-slurm)
#   LOCAL_SLURM_PORT_BASE  first of five TCP ports on 127.0.0.1 (default 16817):
#                          slurmctld, slurmdbd, slurmd node1, slurmd node2, MariaDB
#   LOCAL_SLURM_CPUS       CPUs per node (default: this machine's CPU count)
#   LOCAL_SLURM_BIND_ANY   set to 1 to allow Slurm to listen on all addresses when
#                          the hostname does not resolve to loopback (see below)
# These settings are written into the configs only by a start with no daemon running.
set -euo pipefail

STATE_DIR=${LOCAL_SLURM_DIR:-/tmp/fcmae-slurm}
PORT_BASE=${LOCAL_SLURM_PORT_BASE:-16817}
CLUSTER_NAME=fcmae
NODES=(node1 node2)
PACKAGES=(munge mariadb-server slurm-wlm slurmdbd slurm-client)

# Daemons in start order.
DAEMONS=(munged mariadb slurmdbd slurmctld "${NODES[@]/#/slurmd-}")

SCRIPT_START_US=${EPOCHREALTIME/./}

# Print a progress message to stderr with the seconds since the script started.
log() {
  local elapsed_ms=$(((${EPOCHREALTIME/./} - SCRIPT_START_US) / 1000))
  printf '[local_slurm %d.%01ds] %s\n' $((elapsed_ms / 1000)) $((elapsed_ms % 1000 / 100)) "$*" >&2
}
die() {
  log "ERROR: $*"
  exit 1
}

usage() {
  cat >&2 <<'EOF'
usage: scripts/local_slurm.sh start|stop|status
  start   install missing packages, start the cluster, print `export SLURM_CONF=...`
          (use: eval "$(scripts/local_slurm.sh start)")
  status  show each daemon up/down and sinfo; exit status 0 only if all are up
  stop    cancel all jobs and stop the daemons that `start` launched
Environment: LOCAL_SLURM_DIR (default /tmp/fcmae-slurm), LOCAL_SLURM_PORT_BASE
(default 16817), LOCAL_SLURM_CPUS (default: CPU count of this machine),
LOCAL_SLURM_BIND_ANY=1 (allow listening on all addresses).
EOF
}

set_paths() {
  case $STATE_DIR in
    /*) ;;
    *) STATE_DIR=$PWD/$STATE_DIR ;;
  esac
  ETC_DIR=$STATE_DIR/etc
  LOG_DIR=$STATE_DIR/log
  RUN_DIR=$STATE_DIR/run
  SPOOL_DIR=$STATE_DIR/spool
  MUNGE_DIR=$STATE_DIR/munge
  DB_DIR=$STATE_DIR/mariadb
  MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
  DB_SOCKET=$DB_DIR/mariadbd.sock
  STORAGE_PASS_FILE=$ETC_DIR/storage_pass
  export SLURM_CONF=$ETC_DIR/slurm.conf
}

require_root() {
  [[ $EUID -eq 0 ]] || die "'$1' must run as root, because the cluster's daemons run as root (MariaDB as mysql); rerun it with sudo or as root."
}

# ---------------------------------------------------------------------------
# Per-daemon facts: pid file, expected process name (/proc/PID/comm), log file.
# MariaDB runs as the mysql user, so its pid file lives in its own folder.

pid_file() {
  case $1 in
    mariadb) echo "$DB_DIR/mariadbd.pid" ;;
    *) echo "$RUN_DIR/$1.pid" ;;
  esac
}

process_name() {
  case $1 in
    mariadb) echo mariadbd ;;
    slurmd-*) echo slurmd ;;
    *) echo "$1" ;;
  esac
}

log_file() {
  case $1 in
    mariadb) echo "$LOG_DIR/mariadb.log" ;;
    *) echo "$LOG_DIR/$1.log" ;;
  esac
}

# Print the pid of daemon $1 if its pid file names a live process with the
# expected name, so a reused pid of an unrelated process is never reported.
running_pid() {
  local file pid comm
  file=$(pid_file "$1")
  [[ -r $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [[ -n $pid ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "$(process_name "$1")" ]] || return 1
  echo "$pid"
}

is_running() { running_pid "$1" >/dev/null; }

any_daemon_running() {
  local name
  for name in "${DAEMONS[@]}"; do
    is_running "$name" && return 0
  done
  return 1
}

show_log_tail() {
  local file=$1
  if [[ -r $file ]]; then
    log "last lines of $file:"
    tail -n 20 "$file" >&2 || true
  fi
}

# Poll a command every 0.2 s until it succeeds. On timeout, show the daemon's
# log and exit with a message that names what did not come up. A command that
# returns 99 (its process has died) ends the wait at once with the same message.
wait_until() {
  local description=$1 timeout_s=$2 log_path=$3
  shift 3
  local deadline=$((SECONDS + timeout_s)) rc
  while true; do
    rc=0
    "$@" >/dev/null 2>&1 || rc=$?
    ((rc == 0)) && return 0
    if ((rc == 99)); then
      show_log_tail "$log_path"
      die "$description exited during startup; see $log_path. Run 'scripts/local_slurm.sh stop' before retrying."
    fi
    if ((SECONDS >= deadline)); then
      show_log_tail "$log_path"
      die "$description did not come up within ${timeout_s}s; see $log_path. Run 'scripts/local_slurm.sh stop' before retrying."
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------
# Packages

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >&2
}

install_packages() {
  local missing=() package status
  for package in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$package")
  done
  ((${#missing[@]} == 0)) && return 0

  command -v apt-get >/dev/null || die "packages ${missing[*]} are missing and apt-get is not available; install them by hand."
  log "installing ${missing[*]} with apt-get"
  # Debian package scripts start each service they install unless
  # /usr/sbin/policy-rc.d exits 101. Without systemd that would launch a system
  # MariaDB, munged and Slurm daemons next to ours, so a temporary policy file
  # blocks that for the duration of apt-get when none exists.
  local created_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\n# Temporary file from scripts/local_slurm.sh: keep apt-get from starting services.\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  # Try the current package lists first and refresh them only when that fails,
  # as with no lists at all or lists so old that the mirror returns 404.
  local install_rc=0
  if ! apt_install "${missing[@]}"; then
    log "apt-get install failed; running apt-get update and trying again"
    apt-get update -q >&2 || log "apt-get update reported errors; trying the install anyway"
    apt_install "${missing[@]}" || install_rc=$?
  fi
  if ((created_policy)); then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  ((install_rc == 0)) || die "apt-get install ${missing[*]} failed (exit $install_rc); see the apt-get output above, fix apt and rerun start."
  id mysql >/dev/null 2>&1 || die "the mariadb-server package did not create the 'mysql' user; see the apt-get output above."
}

# ---------------------------------------------------------------------------
# Configuration files

# Print the slurm.conf line that keeps the Slurm daemons off other interfaces.
# By default slurmctld, slurmd, slurmdbd, srun and slurmstepd listen on all
# addresses (0.0.0.0). NoCtldInAddrAny/NoInAddrAny make them bind to the first
# IPv4 address that this machine's hostname resolves to (gethostname() passed
# to getaddrinfo() in Slurm 22.05), so they are loopback-only exactly when the
# hostname resolves to 127.x.x.x, as with a "127.0.0.1 <hostname>" line in /etc/hosts.
choose_communication_parameters() {
  local name address
  name=$(hostname)
  address=$(getent ahostsv4 "$name" 2>/dev/null | awk 'NR == 1 { print $1 }')
  if [[ $address == 127.* ]]; then
    echo "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  elif [[ ${LOCAL_SLURM_BIND_ANY:-0} == 1 ]]; then
    log "WARNING: hostname '$name' resolves to '${address:-nothing}', not loopback; the Slurm daemons will listen on all addresses (LOCAL_SLURM_BIND_ANY=1)"
    echo "# CommunicationParameters unset: daemons listen on all addresses (LOCAL_SLURM_BIND_ANY=1)."
  else
    die "hostname '$name' resolves to '${address:-nothing}', not a loopback address, so the Slurm daemons cannot be bound to loopback only. Add '127.0.0.1 $name' to /etc/hosts, or set LOCAL_SLURM_BIND_ANY=1 to let them listen on all addresses."
  fi
}

write_configs() {
  local host cpus node port_ctld port_dbd port_db port_node storage_pass index communication_parameters
  host=$(hostname -s 2>/dev/null || uname -n)
  cpus=${LOCAL_SLURM_CPUS:-$(nproc)}
  [[ $PORT_BASE =~ ^[0-9]+$ ]] && ((PORT_BASE >= 1024 && PORT_BASE <= 65530)) ||
    die "LOCAL_SLURM_PORT_BASE=$PORT_BASE is not a port number between 1024 and 65530."
  [[ $cpus =~ ^[1-9][0-9]*$ ]] || die "LOCAL_SLURM_CPUS=$cpus is not a positive integer."
  port_ctld=$PORT_BASE
  port_dbd=$((PORT_BASE + 1))
  port_db=$((PORT_BASE + 4))
  communication_parameters=$(choose_communication_parameters)

  if [[ ! -s $STORAGE_PASS_FILE ]]; then
    (umask 077 && head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 >"$STORAGE_PASS_FILE")
  fi
  storage_pass=$(cat "$STORAGE_PASS_FILE")

  cat >"$SLURM_CONF" <<EOF
# Written by scripts/local_slurm.sh for a single-machine Slurm 22.05 cluster.
# Edits are lost on the next start from a stopped cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port_ctld
SlurmUser=root
SlurmdUser=root
$communication_parameters

# MUNGE runs with its own key and socket under the state folder.
# cred_expire=15 shortens the wait before a requeued job may start again
# (the 22.05 default is 120 s).
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=15

StateSaveLocation=$SPOOL_DIR/slurmctld
SlurmdSpoolDir=$SPOOL_DIR/slurmd-%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups: this machine has no systemd, so processes are tracked by parent pid.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# NOTE: slurmctld and slurmd still log "pmi/pmix: can not load PMIx library"
# errors at startup. Jobs that do not use PMIx run normally despite them.
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$port_dbd
# Connections to slurmdbd take their MUNGE socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none

# Short scheduling intervals so a requeued job restarts seconds after its
# begin time instead of waiting for the 30 s / 60 s default passes.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core

# Preemption: jobs of the higher PriorityTier partition requeue jobs of the
# lower one. With preempt_send_user_signal a preempted job that was submitted
# with --signal=SIG@N gets SIG at once, then has the GraceTime of its
# partition to checkpoint and requeue itself before SIGTERM/SIGKILL.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1

ReturnToService=2
InactiveLimit=0
KillWait=30
MinJobAge=300
Waittime=0

EOF

  index=0
  for node in "${NODES[@]}"; do
    port_node=$((PORT_BASE + 2 + index))
    echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$host Port=$port_node CPUs=$cpus RealMemory=4000 State=UNKNOWN" >>"$SLURM_CONF"
    index=$((index + 1))
  done
  local node_list
  node_list=$(
    IFS=,
    echo "${NODES[*]}"
  )
  cat >>"$SLURM_CONF" <<EOF
PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60 OverSubscribe=NO
PartitionName=high Nodes=$node_list Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF OverSubscribe=NO
EOF
  chmod 0644 "$SLURM_CONF"

  # slurmdbd reads slurmdbd.conf from the folder of SLURM_CONF. Only its owner
  # (SlurmUser, root here) may read it, because it contains the database password.
  (
    umask 077
    cat >"$ETC_DIR/slurmdbd.conf" <<EOF
# Written by scripts/local_slurm.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$port_dbd
${communication_parameters/NoCtldInAddrAny,/}
SlurmUser=root
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$port_db
StorageUser=slurm
StoragePass=$storage_pass
StorageLoc=slurm_acct_db
EOF
  )
  chmod 0600 "$ETC_DIR/slurmdbd.conf"
}

# Exit with a clear message if some other process listens on a port that the
# cluster needs. Call it only while none of the cluster's daemons runs.
check_ports_free() {
  local port
  for ((port = PORT_BASE; port <= PORT_BASE + 4; port++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      die "port $port on 127.0.0.1 is already in use by another process; stop that process or pick other ports with LOCAL_SLURM_PORT_BASE."
    fi
  done
}

make_dirs() {
  mkdir -p "$STATE_DIR"
  chmod 0755 "$STATE_DIR"
  mkdir -p "$ETC_DIR" "$LOG_DIR" "$RUN_DIR" "$SPOOL_DIR/slurmctld" "$MUNGE_DIR" "$DB_DIR"
  local node
  for node in "${NODES[@]}"; do mkdir -p "$SPOOL_DIR/slurmd-$node"; done
  # munged rejects a socket or key folder that group or others can write.
  chmod 0755 "$ETC_DIR" "$LOG_DIR" "$RUN_DIR" "$SPOOL_DIR" "$MUNGE_DIR"
}

# ---------------------------------------------------------------------------
# Daemons

start_munged() {
  if is_running munged; then
    log "munged is already running"
    return 0
  fi
  local key=$MUNGE_DIR/munge.key
  if [[ ! -s $key ]]; then
    (umask 077 && head -c 1024 /dev/urandom >"$key")
  fi
  chmod 0400 "$key"
  log "starting munged"
  munged --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="$(pid_file munged)" \
    --log-file="$(log_file munged)" --seed-file="$MUNGE_DIR/munged.seed" \
    </dev/null >>"$LOG_DIR/munged.out" 2>&1 ||
    {
      show_log_tail "$(log_file munged)"
      die "munged failed to start; see $(log_file munged)."
    }
  wait_until "munged" 15 "$(log_file munged)" check_munge
}

check_munge() {
  local credential
  credential=$(munge -n -S "$MUNGE_SOCKET") && unmunge -S "$MUNGE_SOCKET" <<<"$credential"
}

# Succeed once MariaDB responds to a ping. Return 99 if its process ($1) has exited.
check_mariadb() {
  kill -0 "$1" 2>/dev/null || return 99
  mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
}

start_mariadb() {
  if is_running mariadb; then
    log "MariaDB is already running"
  else
    chown mysql:mysql "$DB_DIR"
    chmod 0755 "$DB_DIR"
    if [[ ! -d $DB_DIR/data/mysql ]]; then
      log "initializing the MariaDB datadir $DB_DIR/data"
      rm -rf "$DB_DIR/data"
      mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=mysql \
        --auth-root-authentication-method=socket --skip-test-db \
        </dev/null >"$LOG_DIR/mariadb-install.log" 2>&1 ||
        {
          show_log_tail "$LOG_DIR/mariadb-install.log"
          die "mariadb-install-db failed; see $LOG_DIR/mariadb-install.log."
        }
    fi
    touch "$(log_file mariadb)"
    chown mysql:mysql "$(log_file mariadb)"
    log "starting MariaDB on 127.0.0.1:$((PORT_BASE + 4))"
    # innodb_lock_wait_timeout=900 is the value the Slurm accounting docs ask for.
    # UMASK=0644 makes the pid file readable for `status` run by other users.
    UMASK=0644 setsid mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" \
      --socket="$DB_SOCKET" --pid-file="$(pid_file mariadb)" \
      --bind-address=127.0.0.1 --port=$((PORT_BASE + 4)) --skip-name-resolve \
      --log-error="$(log_file mariadb)" --innodb-buffer-pool-size=128M \
      --innodb-log-file-size=32M --innodb-lock-wait-timeout=900 \
      </dev/null >>"$LOG_DIR/mariadb.out" 2>&1 &
    wait_until "MariaDB" 60 "$(log_file mariadb)" check_mariadb $!
    wait_until "MariaDB pid file" 10 "$(log_file mariadb)" is_running mariadb
  fi
  # Idempotent: (re)create the accounting database and the slurmdbd user.
  local storage_pass
  storage_pass=$(cat "$STORAGE_PASS_FILE")
  mariadb --no-defaults --socket="$DB_SOCKET" -u root >&2 <<EOF ||
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$storage_pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$storage_pass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
    die "could not create the slurm_acct_db database or the slurm user in MariaDB; see $(log_file mariadb)."
}

start_slurm_daemon() {
  local name=$1 description=$2
  shift 2
  if is_running "$name"; then
    log "$description is already running"
    return 0
  fi
  log "starting $description"
  "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 ||
    {
      show_log_tail "$(log_file "$name")"
      show_log_tail "$LOG_DIR/$name.out"
      die "$description failed to start; see $(log_file "$name")."
    }
}

start_slurmdbd() {
  start_slurm_daemon slurmdbd slurmdbd slurmdbd
  wait_until "slurmdbd" 60 "$(log_file slurmdbd)" sacctmgr -n -P show cluster
  wait_until "slurmdbd pid file" 10 "$(log_file slurmdbd)" is_running slurmdbd
  local clusters
  clusters=$(sacctmgr -n -P show cluster format=Cluster 2>/dev/null) ||
    die "sacctmgr could not list clusters; see $(log_file slurmdbd)."
  if ! grep -qx "$CLUSTER_NAME" <<<"$clusters"; then
    log "registering cluster $CLUSTER_NAME in slurmdbd"
    sacctmgr -i add cluster "$CLUSTER_NAME" >&2 ||
      die "sacctmgr add cluster $CLUSTER_NAME failed; see $(log_file slurmdbd)."
  fi
}

check_slurmctld() {
  local output
  output=$(scontrol ping 2>&1) && [[ $output == *"is UP"* ]]
}

start_slurmctld() {
  start_slurm_daemon slurmctld slurmctld slurmctld
  wait_until "slurmctld" 30 "$(log_file slurmctld)" check_slurmctld
  wait_until "slurmctld pid file" 10 "$(log_file slurmctld)" is_running slurmctld
}

start_slurmds() {
  local node
  for node in "${NODES[@]}"; do
    start_slurm_daemon "slurmd-$node" "slurmd for $node" slurmd -N "$node"
  done
  for node in "${NODES[@]}"; do
    wait_until "slurmd for $node" 20 "$(log_file "slurmd-$node")" is_running "slurmd-$node"
  done
}

# Succeed once every node is responding and usable (idle, mixed, allocated or completing).
nodes_ready() {
  local states line
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [[ -n $states ]] || return 1
  while read -r line; do
    [[ $line =~ ^[^[:space:]]+\ (idle|mixed|allocated|completing)$ ]] || return 1
  done <<<"$states"
}

wait_for_nodes() {
  local started=$SECONDS resumed=0 states
  until nodes_ready; do
    # A node left DOWN or DRAINED by an earlier run stays so after its slurmd
    # registers; resume such nodes once, after giving registration 10 s.
    if ((!resumed && SECONDS - started >= 10)); then
      states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
      log "resuming nodes that are not ready: $(tr '\n' ' ' <<<"$states")"
      scontrol update NodeName="$(
        IFS=,
        echo "${NODES[*]}"
      )" State=RESUME >/dev/null 2>&1 || true
      resumed=1
    fi
    if ((SECONDS - started >= 30)); then
      sinfo -N -l >&2 || true
      show_log_tail "$(log_file slurmctld)"
      die "nodes did not become idle within 30s; see $LOG_DIR/slurmd-node*.log and $(log_file slurmctld)."
    fi
    sleep 0.2
  done
}

cmd_start() {
  require_root start
  install_packages
  make_dirs
  if any_daemon_running; then
    log "cluster is partly or fully running; keeping the existing configs in $ETC_DIR"
    [[ -r $SLURM_CONF ]] || die "$SLURM_CONF is missing while daemons run; run 'scripts/local_slurm.sh stop' and start again."
  else
    write_configs
    check_ports_free
  fi
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmds
  wait_for_nodes
  log "cluster $CLUSTER_NAME is up; state in $STATE_DIR"
  printf 'export SLURM_CONF=%q\n' "$SLURM_CONF"
}

# ---------------------------------------------------------------------------
# Stop

# Cancel every job, because with proctrack/linuxproc a job's slurmstepd and
# processes keep running after the slurmd that started them has stopped.
cancel_all_jobs() {
  is_running slurmctld || return 0
  check_slurmctld || return 0
  local job_ids
  job_ids=$(squeue -h -o '%A' 2>/dev/null) || return 0
  [[ -n $job_ids ]] || return 0
  log "cancelling jobs: $(tr '\n' ' ' <<<"$job_ids")"
  # shellcheck disable=SC2086 # one argument per job id
  scancel $job_ids >&2 || true
  local deadline=$((SECONDS + 60))
  while [[ -n $(squeue -h -o '%A' 2>/dev/null) ]]; do
    if ((SECONDS >= deadline)); then
      log "WARNING: jobs still listed by squeue after 60s; stopping the daemons anyway"
      squeue >&2 || true
      return 0
    fi
    sleep 0.5
  done
}

# Send SIGTERM to each named daemon that runs, then wait until all have exited.
stop_daemons() {
  local name pid file
  local -a pids=() names=()
  for name in "$@"; do
    file=$(pid_file "$name")
    if pid=$(running_pid "$name"); then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$name")
    elif [[ -e $file ]]; then
      log "$name is not running; removing stale pid file $file"
      rm -f "$file"
    fi
  done
  local index deadline=$((SECONDS + 60))
  for index in "${!pids[@]}"; do
    # Wait up to 60 s in all; MariaDB and slurmctld write their state before exiting.
    while kill -0 "${pids[index]}" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        log "WARNING: ${names[index]} (pid ${pids[index]}) ignored SIGTERM for 60s; sending SIGKILL"
        kill -KILL "${pids[index]}" 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.1
    done
    rm -f "$(pid_file "${names[index]}")"
  done
}

cmd_stop() {
  require_root stop
  cancel_all_jobs
  # slurmctld sends its last accounting records to slurmdbd while it shuts
  # down, and slurmdbd needs MariaDB and munged until it has exited.
  stop_daemons "${NODES[@]/#/slurmd-}" slurmctld
  stop_daemons slurmdbd
  stop_daemons mariadb munged
  log "cluster stopped; state kept in $STATE_DIR (delete it for a fresh cluster)"
}

# ---------------------------------------------------------------------------
# Status

cmd_status() {
  local name pid all_up=1
  echo "state folder: $STATE_DIR"
  echo "SLURM_CONF=$SLURM_CONF"
  for name in "${DAEMONS[@]}"; do
    if pid=$(running_pid "$name"); then
      printf '%-14s up (pid %s)\n' "$name" "$pid"
    else
      printf '%-14s down\n' "$name"
      all_up=0
    fi
  done
  if is_running slurmctld && command -v sinfo >/dev/null; then
    echo
    sinfo || all_up=0
  fi
  ((all_up))
}

main() {
  if (($# != 1)); then
    usage
    exit 2
  fi
  set_paths
  case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
      usage
      exit 2
      ;;
  esac
}

main "$@"
