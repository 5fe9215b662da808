#!/usr/bin/env bash
# Stop the development cluster started by slurm/dev/start.sh (each daemon by its pid file).
# Jobs still running are killed with slurmd; the job and accounting state stay on disk,
# so the next start.sh picks up where this left off.
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -E "$0" "$@"

stop() {  # stop NAME PIDFILE
    [ -s "$2" ] || return 0
    local pid
    pid=$(cat "$2")
    kill -0 "$pid" 2>/dev/null || return 0
    echo "slurm/dev: stopping $1 ($pid)"
    kill "$pid"
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    echo "slurm/dev: $1 ($pid) did not stop within 30s" >&2
    return 1
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop slurmdbd /run/slurmdbd.pid
stop mariadbd /run/mysqld/mysqld.pid
stop munged /run/munge/munged.pid
