#!/usr/bin/env bash
# Installs / prepares the third-party iSCSI peers the iSCSI tests and benchmark use, idempotently,
# on Debian 12 (bookworm). Everything that is not an apt package lives outside the repo under
# ${MAAS_CACHE:-$HOME/.cache/maas}/peers:
#
#   apt (installed only if missing): libiscsi-bin (iscsi-test-cu, iscsi-ls, iscsi-inq, iscsi-perf),
#       iperf3 (loopback TCP's limit, printed by nvme-bench),
#       tgt (reference target; its system service is kept stopped and disabled: we run tgtd
#       ourselves on other ports, see scripts/tgt-target.sh), libiscsi-dev + fio build deps, and
#       the runtime libraries of the extracted QEMU below (incl. seabios and ipxe-qemu).
#   peers/qemu-7.2/   Debian's QEMU 7.2 (qemu-utils, qemu-block-extra, qemu-system-x86,
#       qemu-system-common, qemu-system-data) `apt-get download`ed and `dpkg-deb -x`ed, NOT
#       installed: installing them would remove the preinstalled qemu-utils 10. Its iSCSI block
#       driver (block-iscsi.so, from qemu-block-extra) is a module found via QEMU_MODULE_DIR.
#   peers/bin/qemu-img-7.2, qemu-io-7.2, qemu-system-x86_64-7.2   wrappers for the above.
#   peers/src/fio-*/, peers/bin/fio-libiscsi   Debian's fio rebuilt with the libiscsi engine.
#   peers/env.sh   the export lines printed at the end.
#
# Usage (as root, or a user with sudo):  eval "$(scripts/iscsi-peers.sh)"
# stdout carries only the `export` lines; progress goes to stderr. A warm run takes well under a
# second and changes nothing (it does not even consult apt's indexes: the extracted QEMU stays
# pinned to the version first fetched). Knobs: MAAS_CACHE, MAAS_QEMU_SERIES (default 7.2), MAAS_JOBS
# (make -j, default 2), MAAS_PEERS_REFRESH=1 (re-resolve the QEMU versions, fetch a newer point
# release if the apt sources have one).
set -euo pipefail

CACHE="${MAAS_CACHE:-$HOME/.cache/maas}"
PEERS="$CACHE/peers"
SERIES="${MAAS_QEMU_SERIES:-7.2}"
QDIR="$PEERS/qemu-$SERIES"
BIN="$PEERS/bin"
JOBS="${MAAS_JOBS:-2}"
SETUP_NAME=iscsi-peers
# shellcheck source=lib/setup.sh
source "$(dirname "$0")/lib/setup.sh"

mkdir -p "$PEERS" "$BIN"
exec 9>>"$PEERS/.lock"
if ! flock -n 9; then
    log "another iscsi-peers.sh is running; waiting for its lock ($PEERS/.lock)"
    flock 9
fi

# ---------------------------------------------------------------- 1. apt packages
# tgt's postinst would start tgtd on 0.0.0.0:3260. Block service starts during its install with a
# temporary policy-rc.d (honoured by both invoke-rc.d and deb-systemd-invoke), unless one exists.
if [ -n "$(missing_pkgs tgt)" ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from MaaS scripts/iscsi-peers.sh\nexit 101\n' \
        | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    CLEANUP+=("$SUDO rm -f /usr/sbin/policy-rc.d")
fi
apt_install libiscsi-bin tgt libiscsi-dev iperf3 \
    build-essential pkg-config dpkg-dev libaio-dev zlib1g-dev

# Keep the packaged tgt service off: we start tgtd ourselves on other ports.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    if systemctl is-enabled --quiet tgt.service 2>/dev/null \
        || systemctl is-active --quiet tgt.service 2>/dev/null; then
        log "disabling and stopping the tgt system service"
        $SUDO systemctl disable --now tgt.service >&2
    fi
elif compgen -G '/etc/rc[2-5].d/S*tgt' >/dev/null; then
    log "disabling the tgt init script"
    $SUDO update-rc.d tgt disable >&2 2>&1 || true
fi
if command -v ss >/dev/null 2>&1 && ss -Hltn 'sport = :3260' 2>/dev/null | grep -q .; then
    log "warning: something listens on port 3260 (not started by this script)"
fi

# ---------------------------------------------------------------- 2. QEMU 7.2, extracted
QEMU_PKGS=(qemu-utils qemu-block-extra qemu-system-x86 qemu-system-common qemu-system-data)
MADISON=""
load_madison() { # one apt-cache call for all the packages (apt-cache costs about 1 s a call here)
    MADISON="$(apt-cache madison "${QEMU_PKGS[@]}" 2>/dev/null \
        | awk -F'|' '{gsub(/ /, "", $1); gsub(/ /, "", $2); print $1, $2}' | sort -u)"
}
madison() { awk -v p="$1" '$1 == p {print $2}' <<<"$MADISON"; }
# Highest version of qemu-block-extra in the apt sources whose upstream version is $SERIES.
series_version() {
    local best="" v
    while read -r v; do
        case "${v#*:}" in "$SERIES"+*|"$SERIES"-*|"$SERIES"~*) ;; *) continue ;; esac
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
    done < <(madison qemu-block-extra)
    echo "$best"
}
# The exact version of PKG built from the same upload as qemu-block-extra's $QVER (arch: all
# packages such as qemu-system-data do not carry the binNMU suffix +bN).
matching_version() {
    local v versions
    versions="$(madison "$1")"
    for v in "$QVER" "${QVER%+b[0-9]*}"; do
        if grep -qxF "$v" <<<"$versions"; then echo "$v"; return 0; fi
    done
    return 1
}

# Once extracted, the QEMU build stays pinned (no apt-cache look-ups on warm runs); set
# MAAS_PEERS_REFRESH=1 to re-resolve the versions and fetch a newer point release if there is one.
if [ -s "$QDIR/.maas-stamp" ] && [ "${MAAS_PEERS_REFRESH:-0}" != 1 ]; then
    STAMP_WANT="$(cat "$QDIR/.maas-stamp")"
    QVER="$(awk -F= '$1 == "qemu-block-extra" {print $2}' <<<"$STAMP_WANT")"
else
    load_madison
    QVER="$(series_version)"
    if [ -z "$QVER" ] && [ "$APT_UPDATED" -eq 0 ]; then
        apt_update_once; load_madison; QVER="$(series_version)"
    fi
    [ -n "$QVER" ] || die "no qemu-block-extra $SERIES in the apt sources (apt-cache madison qemu-block-extra)"
    SPECS=()
    for p in "${QEMU_PKGS[@]}"; do
        v="$(matching_version "$p")" || die "no $p matching $QVER in the apt sources"
        SPECS+=("$p=$v")
    done
    STAMP_WANT="$(printf '%s\n' "${SPECS[@]}")"
fi

if [ -f "$QDIR/.maas-stamp" ] && [ "$(cat "$QDIR/.maas-stamp")" = "$STAMP_WANT" ]; then
    :
else
    mapfile -t SPECS <<<"$STAMP_WANT"
    log "fetching QEMU $SERIES: ${SPECS[*]}"
    DEBS="$PEERS/debs/qemu-$SERIES"
    rm -rf "$DEBS.tmp"; mkdir -p "$DEBS.tmp"
    ( cd "$DEBS.tmp" && apt-get "${APT_OPTS[@]}" download -q "${SPECS[@]}" ) >&2 2>&1 \
        || { apt_update_once; ( cd "$DEBS.tmp" && apt-get "${APT_OPTS[@]}" download -q "${SPECS[@]}" ) >&2; }
    rm -rf "$DEBS"; mv "$DEBS.tmp" "$DEBS"
    rm -rf "$QDIR.tmp"; mkdir -p "$QDIR.tmp"
    for deb in "$DEBS"/*.deb; do dpkg-deb -x "$deb" "$QDIR.tmp"; done
    # Runtime libraries of the programs we use: every Depends of qemu-utils and qemu-system-x86
    # (includes seabios and ipxe-qemu), libiscsi7 for block-iscsi.so, and libspice-server1
    # (listed by the guest-VM recipe). qemu-block-extra's other back ends (rbd, gluster, nfs, ssh,
    # curl) and qemu-system-common's UI/audio modules are not needed and their libraries are not
    # installed.
    for deb in "$DEBS"/qemu-utils_*.deb "$DEBS"/qemu-system-x86_*.deb; do
        dpkg-deb -f "$deb" Depends
    done | tr ',' '\n' | sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/^[[:space:]]+//; s/[[:space:]]+$//' \
        | grep -v -e '^qemu-' -e '^$' | sort -u >"$QDIR.tmp/.maas-runtime-deps"
    printf '%s\n' libiscsi7 libspice-server1 >>"$QDIR.tmp/.maas-runtime-deps"
    printf '%s\n' "$STAMP_WANT" >"$QDIR.tmp/.maas-stamp"
    rm -rf "$QDIR"; mv "$QDIR.tmp" "$QDIR"
fi

mapfile -t RUNTIME_DEPS <"$QDIR/.maas-runtime-deps"
apt_install "${RUNTIME_DEPS[@]}"

MODDIR="$QDIR/usr/lib/x86_64-linux-gnu/qemu"
for f in "$QDIR/usr/bin/qemu-img" "$QDIR/usr/bin/qemu-io" "$QDIR/usr/bin/qemu-system-x86_64" \
         "$MODDIR/block-iscsi.so" "$MODDIR/accel-tcg-x86_64.so"; do
    [ -e "$f" ] || die "missing $f in the extracted QEMU"
    nf="$(ldd "$f" 2>&1 | grep 'not found' || true)"
    [ -z "$nf" ] || die "$f: shared libraries not found (install their packages):
$nf"
done

make_wrapper() { # NAME BINARY [extra args prepended]
    local name="$1" exe="$2"; shift 2
    {
        echo '#!/bin/sh'
        echo "# QEMU $QVER extracted (not installed) by MaaS scripts/iscsi-peers.sh"
        echo "export QEMU_MODULE_DIR='$MODDIR'"
        echo "exec '$QDIR/usr/bin/$exe' $* \"\$@\""
    } | write_if_changed "$BIN/$name" 755
}
make_wrapper "qemu-img-$SERIES" qemu-img
make_wrapper "qemu-io-$SERIES" qemu-io
# The extracted tree has no bios.bin or option ROMs (they come from the seabios and ipxe-qemu
# packages, installed above): add their folders to the firmware search path.
make_wrapper "qemu-system-x86_64-$SERIES" qemu-system-x86_64 \
    "-L '$QDIR/usr/share/qemu' -L /usr/share/seabios -L /usr/lib/ipxe/qemu"

# ---------------------------------------------------------------- 3. fio with libiscsi
FIO="$BIN/fio-libiscsi"
if [ -x "$FIO" ] && "$FIO" --enghelp 2>/dev/null | grep -qw libiscsi; then
    :
else
    SRC="$PEERS/src"
    mkdir -p "$SRC"
    fio_dir="$(find "$SRC" -maxdepth 1 -type d -name 'fio-*' | sort -V | tail -n1)"
    if [ -z "$fio_dir" ] || [ ! -x "$fio_dir/configure" ]; then
        if ! apt-cache showsrc fio 2>/dev/null | grep -q '^Package: fio'; then
            # Mirror the machine's bookworm `deb` entry as a `deb-src` one, in our own file.
            srcfile=""
            entry="$(awk '
                /^[[:space:]]*$/ { if (t ~ /(^| )deb( |$)/ && s ~ /(^| )bookworm( |$)/ && u != "") { print u "|" c "|" k; exit } t=s=u=c=k=""; next }
                /^Types:/ { t=$0; sub(/^Types:[[:space:]]*/, "", t) }
                /^URIs:/ { u=$0; sub(/^URIs:[[:space:]]*/, "", u) }
                /^Suites:/ { s=$0; sub(/^Suites:[[:space:]]*/, "", s) }
                /^Components:/ { c=$0; sub(/^Components:[[:space:]]*/, "", c) }
                /^Signed-By:/ { k=$0; sub(/^Signed-By:[[:space:]]*/, "", k) }
                END { if (t ~ /(^| )deb( |$)/ && s ~ /(^| )bookworm( |$)/ && u != "") print u "|" c "|" k }
            ' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)" || true
            if [ -n "$entry" ]; then
                IFS='|' read -r uri comps key <<<"$entry"
                srcfile=/etc/apt/sources.list.d/maas-deb-src.sources
                { echo "# added by MaaS scripts/iscsi-peers.sh (for apt-get source fio)"
                  echo "Types: deb-src"; echo "URIs: $uri"; echo "Suites: bookworm"
                  echo "Components: ${comps:-main}"
                  [ -z "$key" ] || echo "Signed-By: $key"
                } | $SUDO tee "$srcfile" >/dev/null
            else
                line="$(grep -hE '^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm[[:space:]]' \
                    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)" || true
                [ -n "$line" ] || die "no bookworm deb entry in the apt sources to mirror as deb-src"
                srcfile=/etc/apt/sources.list.d/maas-deb-src.list
                { echo "# added by MaaS scripts/iscsi-peers.sh (for apt-get source fio)"
                  sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' <<<"$line"
                } | $SUDO tee "$srcfile" >/dev/null
            fi
            log "added $srcfile; updating only its index"
            $SUDO apt-get "${APT_OPTS[@]}" update -qq -o Dir::Etc::sourcelist="$srcfile" \
                -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >&2
        fi
        log "apt-get source fio"
        ( cd "$SRC" && apt-get "${APT_OPTS[@]}" source -q fio ) >&2 2>&1
        fio_dir="$(find "$SRC" -maxdepth 1 -type d -name 'fio-*' | sort -V | tail -n1)"
        [ -n "$fio_dir" ] && [ -x "$fio_dir/configure" ] || die "apt-get source fio gave no fio-*/configure"
    fi
    log "building $(basename "$fio_dir") with the libiscsi engine (make -j$JOBS)"
    ( cd "$fio_dir" && ./configure --enable-libiscsi --disable-native >&2 && make -j"$JOBS" >&2 )
    "$fio_dir/fio" --enghelp 2>/dev/null | grep -qw libiscsi || die "built fio has no libiscsi engine"
    install -m 755 "$fio_dir/fio" "$FIO.tmp"; mv -f "$FIO.tmp" "$FIO"
    log "installed $FIO"
fi

# ---------------------------------------------------------------- 4. environment
path_of() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || die "$1 not found"; }
ENV="$(cat <<EOF
export MAAS_QEMU_IMG='$BIN/qemu-img-$SERIES'
export MAAS_QEMU_IO='$BIN/qemu-io-$SERIES'
export MAAS_QEMU_SYSTEM='$BIN/qemu-system-x86_64-$SERIES'
export MAAS_FIO_LIBISCSI='$FIO'
export MAAS_TGTD='$(path_of tgtd)'
export MAAS_TGTADM='$(path_of tgtadm)'
export MAAS_ISCSI_TEST_CU='$(path_of iscsi-test-cu)'
EOF
)"
printf '%s\n' "$ENV" | write_if_changed "$PEERS/env.sh" 644
printf '%s\n' "$ENV"
