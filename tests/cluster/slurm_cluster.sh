#!/usr/bin/env bash
# A real single-node SLURM cluster for the cluster tests: munge, MariaDB + slurmdbd (so sacct
# works), slurmctld and slurmd, two fake GPUs declared as GRES. No systemd needed.
#   SLURM_BASE=/tmp/x tests/cluster/slurm_cluster.sh install|start|stop
# `install` takes Debian's packages (root). slurm.conf goes to /etc/slurm/ (the default path,
# which the jobstep plugin's nested srun needs); state, logs, sockets and pid files to $SLURM_BASE.
# Every wait is bounded; `stop` kills each daemon by its pid file.
set -euo pipefail
B=${SLURM_BASE:-}
CONF=/etc/slurm
need_base() { [ -n "$B" ] || { echo "set SLURM_BASE to a scratch folder" >&2; exit 2; }; }

wait_for() { # seconds, description, command...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 2))); do timeout 10 "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "timed out after ${limit}s waiting for $what" >&2
  for log in "$B"/log/*.log "$B"/mysql/error.log; do [ -f "$log" ] && { echo "== $log" >&2; tail -n 20 "$log" >&2; }; done
  return 1
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 900 apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
}

start() {
  need_base
  local host ncpu mem
  host=$(hostname -s)
  ncpu=$(nproc)
  # The node declares at least 8 CPUs (config_overrides lets slurmd accept more than the hardware has), so
  # that profiles/slurm runs here exactly as users run it: its encode jobs ask for 4 CPUs beside a GPU.
  [ "$ncpu" -ge 8 ] || ncpu=8
  mem=$(free -m | awk '/^Mem:/{print $2 - 512}')
  mkdir -p "$B"/{state/ctld,state/d,run,log,munge,mysql/data,fakegpu} "$CONF"
  chmod 755 "$B"  # munge and mysql run as their own users

  cp /etc/munge/munge.key "$B/munge/munge.key"
  chown -R munge:munge "$B/munge"
  chmod 755 "$B/munge"
  chmod 400 "$B/munge/munge.key"
  runuser -u munge -- /usr/sbin/munged --socket="$B/munge/munge.socket.2" --key-file="$B/munge/munge.key" \
    --pid-file="$B/munge/munged.pid" --log-file="$B/munge/munged.log" --seed-file="$B/munge/munged.seed"
  wait_for 20 munge sh -c "munge -S '$B/munge/munge.socket.2' -n | unmunge -S '$B/munge/munge.socket.2'"

  # Fake GPUs: gres needs File= to name character devices; these are /dev/null and /dev/zero's numbers.
  [ -e "$B/fakegpu/nvidia0" ] || mknod "$B/fakegpu/nvidia0" c 1 3
  [ -e "$B/fakegpu/nvidia1" ] || mknod "$B/fakegpu/nvidia1" c 1 5

  cat >"$CONF/slurm.conf" <<EOC
ClusterName=mlprep-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$B/munge/munge.socket.2
StateSaveLocation=$B/state/ctld
SlurmdSpoolDir=$B/state/d
SlurmctldPidFile=$B/run/slurmctld.pid
SlurmdPidFile=$B/run/slurmd.pid
SlurmctldLogFile=$B/log/slurmctld.log
SlurmdLogFile=$B/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStoragePass=$B/munge/munge.socket.2
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$host CPUs=$ncpu Sockets=1 CoresPerSocket=$ncpu ThreadsPerCore=1 RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOC
  echo "NodeName=$host Name=gpu File=$B/fakegpu/nvidia[0-1]" >"$CONF/gres.conf"

  chown -R mysql:mysql "$B/mysql"
  if [ ! -d "$B/mysql/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$B/mysql/data" --user=mysql --skip-test-db >"$B/mysql/install.log" 2>&1
  fi
  setsid mariadbd --no-defaults --user=mysql --datadir="$B/mysql/data" --socket="$B/mysql/mysqld.sock" \
    --pid-file="$B/mysql/mysqld.pid" --bind-address=127.0.0.1 --port=3306 --log-error="$B/mysql/error.log" \
    --innodb-buffer-pool-size=128M >/dev/null 2>&1 &
  wait_for 60 mariadb mariadb-admin --no-defaults -S "$B/mysql/mysqld.sock" -u root ping
  mariadb --no-defaults -S "$B/mysql/mysqld.sock" -u root -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-ci'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat >"$CONF/slurmdbd.conf" <<EOC
AuthType=auth/munge
AuthInfo=socket=$B/munge/munge.socket.2
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$B/log/slurmdbd.log
PidFile=$B/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm-ci
StorageLoc=slurm_acct_db
EOC
  chmod 600 "$CONF/slurmdbd.conf"
  /usr/sbin/slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster

  /usr/sbin/slurmctld
  wait_for 60 slurmctld sh -c "scontrol ping | grep -q UP"
  /usr/sbin/slurmd
  wait_for 60 "an idle node" sh -c "sinfo -h -o %T | grep -qx idle"
  sinfo
}

stop() {
  need_base
  for pf in "$B/run/slurmd.pid" "$B/run/slurmctld.pid" "$B/run/slurmdbd.pid" "$B/mysql/mysqld.pid" "$B/munge/munged.pid"; do
    [ -s "$pf" ] || continue
    pid=$(cat "$pf")
    kill -0 "$pid" 2>/dev/null || continue
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "stopped $(basename "$pf" .pid) ($pid)"
  done
}

"${1:?usage: $0 install|start|stop}"
