#!/usr/bin/env bash
# Start the vlforge development cluster on this machine: munge, MariaDB + slurmdbd
# (job accounting, so `sacct` works), slurmctld and one slurmd, with two partitions:
# `debug` (default, preemptable) and `high` (preempts `debug` jobs by requeueing them).
#
#   slurm/dev/start.sh        install what is missing, write the configs, start, wait
#   slurm/dev/stop.sh         stop what this script started
#
# Idempotent: daemons already running are left alone unless the generated configs
# changed, in which case the Slurm daemons are restarted. Needs root (uses sudo if not).
# Environment: VLFORGE_SLURM_CPUS (CPUs the node declares, default 4),
#              VLFORGE_SLURM_MEMORY_MB (default: half of this machine's memory).
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"

HERE=$(cd "$(dirname "$0")" && pwd)
NODE=$(hostname -s)
CPUS=${VLFORGE_SLURM_CPUS:-4}
MEMORY_MB=${VLFORGE_SLURM_MEMORY_MB:-$(awk '/MemTotal/ {print int($2 / 2048)}' /proc/meminfo)}
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
LOGS=/var/log/slurm

log() { echo "slurm/dev: $*"; }

alive() {  # alive PIDFILE: the process named in PIDFILE is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: retry COMMAND once a second
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$seconds"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    log "gave up waiting for $what after ${seconds}s (logs: $LOGS)"
    return 1
}

install_packages() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} = 0 ] && return
    log "installing ${missing[*]}"
    apt-get update -qq
    # The packages' own init scripts must not start daemons with their stock configs.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d.vlforge
    chmod +x /usr/sbin/policy-rc.d.vlforge
    [ -e /usr/sbin/policy-rc.d ] || ln -s policy-rc.d.vlforge /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    [ "$(readlink /usr/sbin/policy-rc.d || true)" = policy-rc.d.vlforge ] && rm /usr/sbin/policy-rc.d
    rm -f /usr/sbin/policy-rc.d.vlforge
}

# write_config TEMPLATE TARGET MODE: fill in @FIELDS@; returns 0 if TARGET changed.
write_config() {
    local rendered
    rendered=$(sed -e "s/@NODE@/$NODE/g" -e "s/@CPUS@/$CPUS/g" -e "s/@MEMORY_MB@/$MEMORY_MB/g" "$1")
    if [ -f "$2" ] && [ "$(cat "$2")" = "$rendered" ]; then
        return 1
    fi
    printf '%s\n' "$rendered" >"$2"
    chmod "$3" "$2"
    return 0
}

start_munge() {
    alive /run/munge/munged.pid && return
    mkdir -p /run/munge && chown munge:munge /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
}

start_mariadb() {
    if mysqladmin ping >/dev/null 2>&1; then return; fi
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
        --log-error=$LOGS/mariadb.log </dev/null >/dev/null 2>&1 &
    wait_for 60 "MariaDB" mysqladmin ping
}

# restart_daemon NAME PIDFILE CHANGED ARGS...: start NAME, or restart it if its config changed.
restart_daemon() {
    local name=$1 pidfile=$2 changed=$3
    shift 3
    if alive "$pidfile"; then
        [ "$changed" = yes ] || return 0
        log "restarting $name (config changed)"
        local pid
        pid=$(cat "$pidfile")
        kill "$pid"
        wait_for 30 "$name to stop" bash -c "! kill -0 $pid 2>/dev/null"
    else
        log "starting $name"
    fi
    "/usr/sbin/$name" "$@"
}

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1)
    case "$state" in
        idle | mix | alloc) return 0 ;;
        down* | drain* | drng*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
    esac
    return 1
}

install_packages
mkdir -p /etc/slurm $LOGS /var/lib/slurm/slurmctld /var/spool/slurmd
dbd_changed=no slurm_changed=no
write_config "$HERE/slurmdbd.conf.in" /etc/slurm/slurmdbd.conf 600 && dbd_changed=yes
write_config "$HERE/slurm.conf.in" /etc/slurm/slurm.conf 644 && slurm_changed=yes

start_munge
start_mariadb
restart_daemon slurmdbd /run/slurmdbd.pid "$dbd_changed"
wait_for 60 "slurmdbd" sacctmgr -n list cluster
restart_daemon slurmctld /run/slurmctld.pid "$slurm_changed"
wait_for 60 "slurmctld" scontrol ping
restart_daemon slurmd /run/slurmd.pid "$slurm_changed" -N "$NODE"
wait_for 90 "node $NODE to be idle" node_ready
log "ready: $(sinfo -h -o '%P %a %D %t %C' | tr '\n' ';' | sed 's/;$//') (partition avail nodes state CPUs A/I/O/T)"
