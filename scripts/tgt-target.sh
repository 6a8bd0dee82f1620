#!/usr/bin/env bash
# Runs a private tgt (Linux SCSI target framework, userspace) iSCSI target on 127.0.0.1:PORT for the
# iSCSI tests and benchmark, next to any other tgtd: each instance uses its own management channel
# (tgtd/tgtadm -C PORT, i.e. the unix socket /var/run/tgtd/socket.PORT), so it never talks to the
# packaged tgt service (control port 0) or to another instance. Needs root (tgtd does) and tgt
# (scripts/iscsi-peers.sh installs it).
#
#   tgt-target.sh start PORT IQN FILE [SIZE]   start tgtd on 127.0.0.1:PORT serving FILE as LUN 1 of
#                                              target IQN (tid 1); FILE is created with SIZE (as for
#                                              truncate -s, e.g. 64M) if it does not exist. Prints
#                                              tgtd's pid on stdout once the target is ready.
#   tgt-target.sh stop PORT                    delete the targets (--force), shut tgtd down, wait
#                                              for it to exit. Succeeds if it was not running.
#   tgt-target.sh status PORT                  print the pid and exit 0 if running, else exit 1.
#
# Env: MAAS_TGTD / MAAS_TGTADM (binaries), MAAS_TGT_RUN (pid and log folder, default
# ${TMPDIR:-/tmp}/maas-tgt), MAAS_TGT_BSOFLAGS (e.g. "direct": the LUN's --bsoflags).
# URL for initiators: iscsi://127.0.0.1:PORT/IQN/1 (fio: escape every ':' as '\:').
set -euo pipefail

TGTD="${MAAS_TGTD:-$(command -v tgtd 2>/dev/null || echo /usr/sbin/tgtd)}"
TGTADM="${MAAS_TGTADM:-$(command -v tgtadm 2>/dev/null || echo /usr/sbin/tgtadm)}"
RUN="${MAAS_TGT_RUN:-${TMPDIR:-/tmp}/maas-tgt}"

die() { echo "tgt-target: ERROR: $*" >&2; exit 1; }
usage() { sed -n '/^#   tgt-target.sh start/,/^#   tgt-target.sh status/p' "$0" >&2; exit 2; }

check_port() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ] || die "bad port '$1'"; }

# The pid of our tgtd for PORT, if it is alive and really is `tgtd ... -C PORT`.
running_pid() {
    local port="$1" pid
    pid="$(cat "$RUN/tgtd-$port.pid" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE "(^|/)tgtd .*-C $port( |$)" || return 1
    echo "$pid"
}

adm() { local port="$1"; shift; "$TGTADM" -C "$port" "$@"; }

alive() { # PID: running (a zombie waiting to be reaped counts as gone)
    local st
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

wait_exit() { # PID TENTHS
    local i
    for ((i = 0; i < $2; i++)); do alive "$1" || return 0; sleep 0.1; done
    ! alive "$1"
}

# Deletes target TID even with initiators logged in and I/O in flight: `delete --force` alone
# fails with "this logical unit is still active" then, so refuse new logins (unbind), close the
# connections and retry until the in-flight commands have drained.
delete_target() {
    local port="$1" tid="$2" i sid cid
    adm "$port" --lld iscsi --op unbind --mode target --tid "$tid" -I ALL >/dev/null 2>&1 || true
    for ((i = 0; i < 50; i++)); do
        adm "$port" --lld iscsi --op delete --mode target --tid "$tid" --force >/dev/null 2>&1 && return 0
        while read -r sid cid; do
            adm "$port" --lld iscsi --op delete --mode conn --tid "$tid" --sid "$sid" --cid "$cid" \
                >/dev/null 2>&1 || true
        done < <(adm "$port" --lld iscsi --op show --mode conn --tid "$tid" 2>/dev/null \
            | awk '/^Session:/ {s = $2} /^[[:space:]]+Connection:/ {print s, $2}')
        sleep 0.1
    done
    echo "tgt-target: warning: could not delete target $tid on port $port" >&2
    return 1
}

cmd_stop() {
    local port="$1" pid tids tid
    pid="$(running_pid "$port")" || pid=""
    if [ -n "$pid" ] || [ -S "/var/run/tgtd/socket.$port" ]; then
        # tgtd ignores SIGTERM while a target exists: delete the targets first, then the system
        # (which makes tgtd exit by itself).
        adm "$port" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
        tids="$(adm "$port" --lld iscsi --op show --mode target 2>/dev/null \
            | sed -nE 's/^Target ([0-9]+):.*/\1/p')" || true
        for tid in $tids; do delete_target "$port" "$tid" || true; done
        adm "$port" --op delete --mode system >/dev/null 2>&1 || true
    fi
    if [ -n "$pid" ]; then
        if ! wait_exit "$pid" 100; then
            echo "tgt-target: tgtd $pid did not exit; sending SIGTERM" >&2
            kill -TERM "$pid" 2>/dev/null || true
            if ! wait_exit "$pid" 50; then
                echo "tgt-target: tgtd $pid still alive; sending SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
                wait_exit "$pid" 50 || die "tgtd $pid does not die"
            fi
        fi
    fi
    rm -f "$RUN/tgtd-$port.pid" "/var/run/tgtd/socket.$port" "/var/run/tgtd/socket.$port.lock"
}

cmd_start() {
    local port="$1" iqn="$2" file="$3" size="${4:-}" pid i
    [ "$(id -u)" -eq 0 ] || die "tgtd needs root"
    [ -x "$TGTD" ] && [ -x "$TGTADM" ] || die "tgt is not installed (run scripts/iscsi-peers.sh)"
    if pid="$(running_pid "$port")"; then die "a tgtd for port $port is already running (pid $pid)"; fi
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then die "port $port is already in use"; fi
    if [ ! -e "$file" ]; then
        [ -n "$size" ] || die "$file does not exist (give a SIZE to create it)"
        mkdir -p "$(dirname "$file")"; truncate -s "$size" "$file"
    fi
    file="$(realpath "$file")"
    mkdir -p "$RUN"
    local log="$RUN/tgtd-$port.log"
    : >"$log"
    # Own session: survives the caller's terminal and signals; stdio away from the caller's pipes.
    # (setsid execs in place here, so $! is tgtd's pid.)
    setsid "$TGTD" -f -C "$port" --iscsi "portal=127.0.0.1:$port" </dev/null >>"$log" 2>&1 &
    pid=$!
    echo "$pid" >"$RUN/tgtd-$port.pid"
    for ((i = 0; ; i++)); do
        alive "$pid" || { rm -f "$RUN/tgtd-$port.pid"; die "tgtd exited at start:
$(cat "$log")"; }
        if adm "$port" --op show --mode system >/dev/null 2>&1 \
            && ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
            break
        fi
        [ "$i" -lt 100 ] || { cmd_stop "$port"; die "tgtd did not come up in 10 s"; }
        sleep 0.1
    done
    local lun_opts=()
    [ -z "${MAAS_TGT_BSOFLAGS:-}" ] || lun_opts+=(--bsoflags "$MAAS_TGT_BSOFLAGS")
    if ! { adm "$port" --lld iscsi --op new --mode target --tid 1 -T "$iqn" \
        && adm "$port" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$file" "${lun_opts[@]}" \
        && adm "$port" --lld iscsi --op bind --mode target --tid 1 -I ALL; }; then
        cmd_stop "$port"
        die "could not configure the target (see $log)"
    fi
    echo "$pid"
}

[ $# -ge 1 ] || usage
case "$1" in
    start) [ $# -eq 4 ] || [ $# -eq 5 ] || usage; check_port "$2"; cmd_start "$2" "$3" "$4" "${5:-}" ;;
    stop) [ $# -eq 2 ] || usage; check_port "$2"; cmd_stop "$2" ;;
    status) [ $# -eq 2 ] || usage; check_port "$2"; running_pid "$2" ;;
    *) usage ;;
esac
