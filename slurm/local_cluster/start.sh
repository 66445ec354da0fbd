#!/bin/bash
# Start a multi-node Slurm cluster on this machine for the Slurm tests: Debian's slurmctld and
# munge, and NODES (default 3) node daemons `slurmd -N mmN`, each on its own port, all with this
# host's address. `sudo slurm/local_cluster/start.sh`, then `MMPROLONG_SLURM=1 make test`.
# Running it again restarts nothing that runs; it starts what is missing (a killed node's slurmd).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" = 0 ] || { echo "start.sh: needs root (installs packages, starts daemons)" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client
fi
nodes=${NODES:-3}
port0=${SLURMD_PORT:-17001}
host=$(hostname -s)
cpus=$(nproc)
memory=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / nodes ))
names=$(seq -f "mm%g" 1 "$nodes" | paste -sd,)
lines=""
for i in $(seq 1 "$nodes"); do
    lines+="NodeName=mm$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port0 + i - 1)) CPUs=$cpus RealMemory=$memory State=UNKNOWN"$'\n'
done
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge /var/spool/slurmctld /var/log/slurm /etc/slurm
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
conf=$(sed -e "s/@HOST@/$host/g" -e "s/@NODES@/$nodes/" -e "s/@NODE_NAMES@/$names/" "$here/slurm.conf.in")
conf=${conf/@NODE_LINES@/${lines%$'\n'}}
if [ -f /etc/slurm/slurm.conf ] && [ "$conf" != "$(cat /etc/slurm/slurm.conf)" ] && pgrep -x slurmctld >/dev/null; then
    echo "start.sh: slurm.conf changed; restarting the daemons"
    for file in /run/slurmctld.pid /run/slurmd.pid /run/slurmd-*.pid; do   # the daemons this script started
        [ -s "$file" ] && kill "$(cat "$file")" 2>/dev/null || true
    done
    sleep 2
fi
printf '%s\n' "$conf" > /etc/slurm/slurm.conf
pgrep -x munged >/dev/null || runuser -u munge -- munged
pgrep -x slurmctld >/dev/null || slurmctld
for i in $(seq 1 "$nodes"); do
    mkdir -p "/var/spool/slurmd/mm$i"
    pid=$(cat "/run/slurmd-mm$i.pid" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || slurmd -N "mm$i"
done
for _ in $(seq 60); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    up=$(grep -cE ' (idle|mixed|alloc)' <<< "$states" || true)
    if [ "$up" -ge "$nodes" ]; then echo "slurm: $nodes nodes up ($names)"; exit 0; fi
    while read -r name state; do
        case "$state" in down*|drain*) scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true ;; esac
    done <<< "$states"
    sleep 1
done
echo "start.sh: not every node came up: $(tr '\n' ' ' <<< "$states"); see /var/log/slurm/" >&2
exit 1
