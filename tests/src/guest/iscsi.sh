# iSCSI helpers for guest scripts: the host's own open-iscsi, run in the guest.
# Sourced by the maas-tests guest harness (Guest::lib(ISCSI_SH), tests/src/guest/mod.rs).

# Starts iscsid in the background (its systemd path refuses a chroot) with its log in
# $MAAS_RUN/iscsid.log, and waits until it accepts iscsiadm's requests.
iscsi_start() {
    # crc32c before any login ("Could not create connection due to crc32c loading error");
    # sd_mod explicitly (no udev in the guest).
    modprobe crc32c_generic && modprobe iscsi_tcp && modprobe sd_mod || fail "modprobe"
    # iscsiadm would run systemctl to start a missing iscsid: never in the guest.
    sed -i 's|^iscsid.startup.*|iscsid.startup = /bin/true|' /etc/iscsi/iscsid.conf
    iscsid -f >>"$MAAS_RUN/iscsid.log" 2>&1 &
    ISCSID_PID=$!
    local i
    for i in $(seq 600); do
        grep -q ISCSIADM_ABSTRACT_NAMESPACE /proc/net/unix && return 0
        kill -0 "$ISCSID_PID" 2>/dev/null || fail "iscsid exited: $(cat "$MAAS_RUN/iscsid.log")"
        sleep 0.1
    done
    fail "iscsid did not start"
}

# iscsi_discover PORTAL: SendTargets discovery; prints "portal,tpgt target" lines.
iscsi_discover() {
    iscsiadm -m discovery -t sendtargets -p "$1"
}

# iscsi_node TARGET PORTAL: a node record made by hand (no discovery).
iscsi_node() {
    iscsiadm -m node -o new -T "$1" -p "$2" >/dev/null || fail "iscsiadm -o new $1 $2"
}

# iscsi_set TARGET PORTAL KEY VALUE [KEY VALUE...]: updates node record settings
# (node.session.*, node.conn[0].*).
iscsi_set() {
    local t="$1" p="$2" args=()
    shift 2
    while [ $# -ge 2 ]; do args+=(-n "$1" -v "$2"); shift 2; done
    iscsiadm -m node -T "$t" -p "$p" -o update "${args[@]}" || fail "iscsiadm update ${args[*]}"
}

# iscsi_chap TARGET PORTAL USER SECRET [MUTUAL_USER MUTUAL_SECRET]: CHAP for the node's logins
# (and the credentials the target must prove for mutual CHAP).
iscsi_chap() {
    local in_user="${5:-}" in_secret="${6:-}"
    iscsi_set "$1" "$2" node.session.auth.authmethod CHAP \
        node.session.auth.username "$3" node.session.auth.password "$4" \
        node.session.auth.username_in "$in_user" node.session.auth.password_in "$in_secret"
}

# iscsi_login TARGET PORTAL / iscsi_logout TARGET PORTAL (iscsiadm's status: 0, or e.g. 24 for
# an authorization failure)
iscsi_login() {
    iscsiadm -m node -T "$1" -p "$2" --login
}
iscsi_logout() {
    iscsiadm -m node -T "$1" -p "$2" --logout
}

# iscsi_disk TARGET: waits for the disk (LUN 0) of the logged-in session to TARGET and prints
# its /dev/sdX.
iscsi_disk() {
    local i s b
    for i in $(seq 600); do
        for s in /sys/class/iscsi_session/session*; do
            [ "$(cat "$s/targetname" 2>/dev/null)" = "$1" ] || continue
            for b in "$s"/device/target*/*:*:*:0/block/*; do
                if [ -e "$b" ] && [ -b "/dev/${b##*/}" ]; then
                    echo "/dev/${b##*/}"
                    return 0
                fi
            done
        done
        sleep 0.1
    done
    fail "no disk for $1"
}
