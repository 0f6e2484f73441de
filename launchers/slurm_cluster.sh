#!/usr/bin/env bash
# Stand up or tear down a one-node SLURM cluster on this machine, for development and CI.
#
#   launchers/slurm_cluster.sh up       start munged, slurmctld and slurmd (idempotent)
#   launchers/slurm_cluster.sh down     stop the daemons that `up` started, nothing else
#   launchers/slurm_cluster.sh status   print which of them run and the node's state
#
# Needs root and Debian's packages: apt-get install -y slurmctld slurmd slurm-client munge
# (checked with SLURM 22.05 and munge 0.5.15 on Debian bookworm). No systemd or cgroups
# are used, and every daemon listens on 127.0.0.1 only.
#
# State, logs and PID files go to $SLURM_DEV_DIR (default /tmp/mars-m-exp-slurm). The
# config is written to /etc/slurm/slurm.conf, where every SLURM command looks first; a
# slurm.conf that this script did not write is never overwritten. `down` stops only the
# processes whose PID files `up` wrote, so a munged or SLURM that was running before is
# left alone.
set -euo pipefail

STATE_DIR="${SLURM_DEV_DIR:-/tmp/mars-m-exp-slurm}"
SLURM_CONF_PATH=/etc/slurm/slurm.conf
CLUSTER_NAME=mars-m-exp-dev
NODE_NAME=localhost
# The first line of every slurm.conf this script writes; `up` and `down` touch only those.
CONF_MARKER="# Written by mars-m-exp launchers/slurm_cluster.sh for a one-node development cluster."
START_TIMEOUT_S=30

log() { echo "slurm_cluster: $*"; }
fail() {
    echo "slurm_cluster: error: $*" >&2
    exit 1
}

# Print the last lines of a daemon's log file, so a failed start shows its reason.
show_log_tail() {
    local file=$1
    if [ -s "$file" ]; then
        echo "--- last lines of $file ---" >&2
        tail -n 20 "$file" >&2
    else
        echo "--- $file is empty or missing ---" >&2
    fi
}

# Succeed when the PID file exists and names a live process whose command is $2.
pid_alive() {
    local pid_file=$1 command=$2 pid
    [ -s "$pid_file" ] || return 1
    pid=$(cat "$pid_file")
    [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "$command" ]
}

munge_works() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

require_root_and_packages() {
    [ "$(id -u)" -eq 0 ] || fail "must run as root: slurmd starts jobs as their users and munged needs /run/munge"
    local missing=()
    for binary in munged munge slurmctld slurmd sinfo scontrol; do
        command -v "$binary" >/dev/null || missing+=("$binary")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        fail "not found on PATH: ${missing[*]}; install them with: apt-get install -y slurmctld slurmd slurm-client munge"
    fi
}

conf_is_ours() {
    [ -f "$SLURM_CONF_PATH" ] && [ "$(head -n 1 "$SLURM_CONF_PATH")" = "$CONF_MARKER" ]
}

# Print the slurm.conf for this machine. The node line takes its CPUs, sockets, cores and
# memory from `slurmd -C`, so slurmd never finds the node smaller than configured.
render_conf() {
    local hardware
    hardware=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
    [ -n "$hardware" ] || fail "slurmd -C printed no hardware description"
    cat <<EOF
$CONF_MARKER
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE_NAME(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after the credential lifetime (default 120 s), and
# a job whose start time has passed waits for the next scheduling pass (default every 60 s,
# backfill every 30 s). Short values keep preemption tests short.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
# Bind to the configured 127.0.0.1 addresses instead of every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# No cgroups: processes are tracked through /proc and tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, the first job would reserve all memory and jobs would run one at a time.
DefMemPerCPU=1024
KillWait=5
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$NODE_NAME NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munged() {
    if pid_alive "$STATE_DIR/munged.pid" munged; then
        log "munged (pid $(cat "$STATE_DIR/munged.pid")) from an earlier start is running"
        return
    fi
    if munge_works; then
        log "a munged that this script did not start is running; using it, and down will leave it running"
        return
    fi
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        mungekey --create --keyfile="$key"
    fi
    chown munge:munge "$key"
    # munged rejects a key that others can read.
    chmod 0400 "$key"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge

    runuser -u munge -- munged --force --pid-file=/run/munge/munged.pid
    for _ in $(seq "$START_TIMEOUT_S"); do
        if munge_works; then
            cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
            log "munged started (pid $(cat "$STATE_DIR/munged.pid"))"
            return
        fi
        sleep 1
    done
    show_log_tail /var/log/munge/munged.log
    fail "munged did not respond to munge/unmunge within ${START_TIMEOUT_S}s"
}

start_slurmctld() {
    if scontrol ping 2>/dev/null | grep -q "is UP"; then
        fail "a slurmctld that this script did not start is already running and responds to scontrol ping; stop it or use that cluster"
    fi
    slurmctld
    for _ in $(seq "$START_TIMEOUT_S"); do
        if scontrol ping 2>/dev/null | grep -q "is UP"; then
            log "slurmctld started (pid $(cat "$STATE_DIR/slurmctld.pid"))"
            return
        fi
        if [ -s "$STATE_DIR/slurmctld.pid" ] && ! pid_alive "$STATE_DIR/slurmctld.pid" slurmctld; then
            show_log_tail "$STATE_DIR/slurmctld.log"
            fail "slurmctld exited during start-up; its log above gives the reason"
        fi
        sleep 1
    done
    show_log_tail "$STATE_DIR/slurmctld.log"
    fail "slurmctld did not respond to scontrol ping within ${START_TIMEOUT_S}s"
}

node_state() {
    sinfo --noheader --nodes="$NODE_NAME" --format=%t 2>/dev/null | head -n 1
}

# Wait until the node takes jobs; a node that is down or drained is resumed.
wait_for_node() {
    local state=""
    for _ in $(seq "$START_TIMEOUT_S"); do
        state=$(node_state)
        case "$state" in
            idle* | mix* | alloc* | comp*)
                return 0
                ;;
            down* | drain* | drng* | fail*)
                scontrol update nodename="$NODE_NAME" state=resume 2>/dev/null || true
                ;;
        esac
        sleep 1
    done
    show_log_tail "$STATE_DIR/slurmd.log"
    fail "node $NODE_NAME did not become idle within ${START_TIMEOUT_S}s (last state: '${state:-unknown}')"
}

start_slurmd() {
    slurmd -N "$NODE_NAME"
    wait_for_node
    log "slurmd started (pid $(cat "$STATE_DIR/slurmd.pid")); node $NODE_NAME is $(node_state)"
}

# Stop the process named in the PID file if it is the expected daemon; TERM, then KILL.
stop_daemon() {
    local name=$1 pid_file="$STATE_DIR/$1.pid" pid
    if ! pid_alive "$pid_file" "$name"; then
        rm -f "$pid_file"
        return
    fi
    pid=$(cat "$pid_file")
    kill -TERM "$pid"
    for _ in $(seq 20); do
        [ -e "/proc/$pid" ] || break
        sleep 0.5
    done
    if [ -e "/proc/$pid" ]; then
        log "$name (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
    log "$name (pid $pid) stopped"
}

all_running() {
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld && pid_alive "$STATE_DIR/slurmd.pid" slurmd && munge_works
}

cmd_up() {
    require_root_and_packages
    if [ -f "$SLURM_CONF_PATH" ] && ! conf_is_ours; then
        fail "$SLURM_CONF_PATH exists and was not written by this script; move it away to use the development cluster"
    fi
    mkdir -p "$STATE_DIR"
    local new_conf
    new_conf=$(render_conf)

    if all_running && conf_is_ours && [ "$new_conf" = "$(cat "$SLURM_CONF_PATH")" ]; then
        wait_for_node
        log "already running with the same config (state in $STATE_DIR)"
        return
    fi

    # Cold start, because the daemons read slurm.conf only when they start. The saved state
    # is wiped, since after a hard kill it restores stale jobs; job ids then start again at
    # 1, which is why the SLURM presets give every launch a new submitit folder.
    stop_daemon slurmd
    stop_daemon slurmctld
    rm -rf "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/slurmd" /etc/slurm
    printf '%s\n' "$new_conf" >"$SLURM_CONF_PATH"

    start_munged
    start_slurmctld
    start_slurmd
    log "cluster $CLUSTER_NAME is up: config $SLURM_CONF_PATH, logs and state in $STATE_DIR"
}

cmd_down() {
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    if conf_is_ours; then
        rm -f "$SLURM_CONF_PATH"
    fi
    log "stopped; logs remain in $STATE_DIR"
}

cmd_status() {
    for name in munged slurmctld slurmd; do
        if pid_alive "$STATE_DIR/$name.pid" "$name"; then
            echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"
        else
            echo "$name: not started by this script"
        fi
    done
    echo "node $NODE_NAME: $(node_state || true)"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
