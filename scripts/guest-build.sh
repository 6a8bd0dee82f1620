#!/usr/bin/env bash
# Builds (idempotently) the guest VM the guest tests boot: real Linux initiators (open-iscsi,
# nvme-cli) running on Debian's own kernel in QEMU TCG, with the host's userland borrowed
# read-only over 9p. See tests/src/guest.rs for the test API and the README's test tour.
#
#   apt (installed only if missing): what the guest borrows from the host's root — open-iscsi,
#       nvme-cli, fio, e2fsprogs, jq — and what builds the initramfs: busybox-static, cpio, kmod.
#       open-iscsi's services are kept off on the host (installed with service starts blocked,
#       then disabled): the host kernel has no iSCSI initiator; only the guest runs iscsid.
#   QEMU 7.2: from scripts/iscsi-peers.sh (extracted, not installed).
#   ${MAAS_CACHE:-$HOME/.cache/maas}/guest-6.12/
#       kernel/KVER/         Debian's linux-image-KVER package (6.12 from bookworm-security, for
#                            NVMe in-band authentication) `dpkg-deb -x`ed (+ depmod), pinned
#                            to the version first fetched (MAAS_GUEST_REFRESH=1 re-resolves).
#       initrd-KVER.gz       busybox /init + the module closure the guests need (virtio, 9p,
#                            overlay, configfs, ext4, sd_mod, crc32c, iscsi_tcp, nvme-tcp, nvmet,
#                            LIO, rdma_rxe...), rebuilt when this script or busybox changes.
#       env.sh               the export lines printed at the end.
#
# Usage:  eval "$(scripts/guest-build.sh)"
# stdout carries only `export` lines (MAAS_GUEST_KERNEL, MAAS_GUEST_INITRD, MAAS_QEMU_SYSTEM);
# progress goes to stderr. A warm run takes well under a second and changes nothing.
#
# The guest's /init (below) mounts the host's / read-only (9p tag `hostroot`) under a tmpfs
# overlay, the exchange directory (9p tag `xchg`, writable) at /xchg, binds the initramfs's
# modules over /lib/modules, then runs `bash /xchg/$maas.run/run.sh` chrooted into that root with
# stdout and stderr appended to /xchg/$maas.run/output, writes its exit status to
# /xchg/$maas.run/exit, prints `MAAS-GUEST-EXIT <status>` on the console and powers off.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${MAAS_CACHE:-$HOME/.cache/maas}"
# Its own folder: checkouts still on the 6.1 guest (cache folder `guest`) keep theirs.
GUEST="$CACHE/guest-6.12"
SETUP_NAME=guest-build
# shellcheck source=lib/setup.sh
source "$HERE/lib/setup.sh"

mkdir -p "$GUEST"
exec 8>>"$GUEST/.lock"
if ! flock -n 8; then
    log "another guest-build.sh is running; waiting for its lock ($GUEST/.lock)"
    flock 8
fi

# ---------------------------------------------------------------- 1. QEMU 7.2 (the peers script)
PEERS_ENV="$("$HERE/iscsi-peers.sh")" || die "scripts/iscsi-peers.sh failed"
eval "$PEERS_ENV"
[ -x "${MAAS_QEMU_SYSTEM:-}" ] || die "scripts/iscsi-peers.sh gave no MAAS_QEMU_SYSTEM"

# ---------------------------------------------------------------- 2. apt packages
# open-iscsi's postinst would enable (and on a systemd host start) iscsid and open-iscsi on the
# host. Block service starts during its install with a temporary policy-rc.d unless one exists,
# then disable its units: only guests run iscsid.
INSTALLING_ISCSI="$(missing_pkgs open-iscsi)"
if [ -n "$INSTALLING_ISCSI" ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from MaaS scripts/guest-build.sh\nexit 101\n' \
        | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    CLEANUP+=("$SUDO rm -f /usr/sbin/policy-rc.d")
fi
apt_install open-iscsi nvme-cli fio e2fsprogs jq busybox-static cpio kmod xz-utils dmsetup
if [ -n "$INSTALLING_ISCSI" ]; then
    log "disabling open-iscsi's services on the host (iscsid.socket, iscsid, open-iscsi)"
    if command -v systemctl >/dev/null 2>&1; then
        now=(); [ -d /run/systemd/system ] && now=(--now)
        $SUDO systemctl disable "${now[@]}" iscsid.socket iscsid.service open-iscsi.service >&2 2>&1 || true
    elif command -v update-rc.d >/dev/null 2>&1; then
        $SUDO update-rc.d iscsid disable >&2 2>&1 || true
        $SUDO update-rc.d open-iscsi disable >&2 2>&1 || true
    fi
fi
if pid="$(pgrep -x iscsid 2>/dev/null)"; then
    log "warning: an iscsid runs on the host (pid ${pid//$'\n'/ }; not started by this script)"
fi
for t in /usr/sbin/iscsiadm /usr/sbin/iscsid /usr/sbin/nvme /usr/bin/fio /usr/bin/jq /sbin/mkfs.ext4 \
         /sbin/fsck.ext4 /bin/busybox /usr/bin/cpio /sbin/depmod /sbin/modprobe /sbin/dmsetup; do
    [ -x "$t" ] || die "$t is missing after the apt installs"
done

# ---------------------------------------------------------------- 3. Debian's kernel, extracted
# Pinned to the version first fetched: warm runs never consult apt (MAAS_GUEST_REFRESH=1 does).
KSTAMP="$GUEST/kernel/.maas-pin"
# A pin to another series (the 6.1 kernel used before) is re-resolved.
if [ -s "$KSTAMP" ] && [ "${MAAS_GUEST_REFRESH:-0}" != 1 ] \
    && grep -qE '^package=linux-image-6\.12\.[0-9]+\+deb12-amd64$' "$KSTAMP"; then
    KPKG="$(awk -F= '$1 == "package" {print $2}' "$KSTAMP")"
    KVERSION="$(awk -F= '$1 == "version" {print $2}' "$KSTAMP")"
else
    # Debian 12's 6.12 kernel from its security updates: the 6.1 kernel has NVMe in-band
    # authentication (CONFIG_NVME_AUTH, CONFIG_NVME_TARGET_AUTH) off; 6.12 has both.
    resolve_kernel() {
        apt-cache pkgnames linux-image-6.12. 2>/dev/null \
            | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | sort -V | tail -n1 || true
    }
    KPKG="${MAAS_GUEST_KERNEL_PACKAGE:-$(resolve_kernel)}"
    if [ -z "$KPKG" ]; then apt_update_once; KPKG="$(resolve_kernel)"; fi
    [ -n "$KPKG" ] || die "no linux-image-6.12.*+deb12-amd64 in the apt sources (bookworm-security; apt-cache search linux-image-6.12)"
    KVERSION="$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')"
    [ -n "$KVERSION" ] && [ "$KVERSION" != "(none)" ] || die "no candidate version of $KPKG"
fi
KVER="${KPKG#linux-image-}"
KDIR="$GUEST/kernel/$KVER"
if [ -f "$KDIR/.maas-stamp" ] && [ "$(cat "$KDIR/.maas-stamp")" = "$KPKG=$KVERSION" ]; then
    :
else
    log "fetching $KPKG=$KVERSION"
    mkdir -p "$GUEST/kernel"
    DL="$(mktemp -d "$GUEST/kernel/.dl.XXXXXX")"
    CLEANUP+=("rm -rf '$DL'")
    ( cd "$DL" && apt-get "${APT_OPTS[@]}" download -q "$KPKG=$KVERSION" ) >&2 2>&1 \
        || { apt_update_once; ( cd "$DL" && apt-get "${APT_OPTS[@]}" download -q "$KPKG=$KVERSION" ) >&2; }
    rm -rf "$KDIR.tmp"; mkdir -p "$KDIR.tmp"
    dpkg-deb -x "$DL"/*.deb "$KDIR.tmp"
    [ -f "$KDIR.tmp/boot/vmlinuz-$KVER" ] || die "$KPKG has no boot/vmlinuz-$KVER"
    [ -d "$KDIR.tmp/lib/modules/$KVER" ] || die "$KPKG has no lib/modules/$KVER"
    depmod -b "$KDIR.tmp" "$KVER"
    printf '%s\n' "$KPKG=$KVERSION" >"$KDIR.tmp/.maas-stamp"
    rm -rf "$KDIR"; mv "$KDIR.tmp" "$KDIR"
    # Older pinned kernels are no longer used.
    find "$GUEST/kernel" -mindepth 1 -maxdepth 1 -type d -name '6.*' ! -name "$KVER" \
        -exec rm -rf {} +
    printf 'package=%s\nversion=%s\n' "$KPKG" "$KVERSION" >"$KSTAMP"
fi
[ -s "$KSTAMP" ] || printf 'package=%s\nversion=%s\n' "$KPKG" "$KVERSION" >"$KSTAMP"
KERNEL="$KDIR/boot/vmlinuz-$KVER"

# ---------------------------------------------------------------- 4. the initramfs
# Modules the guests load (with their dependency closure). Several are for the NVMe/TCP and RDMA
# tests to come (nvme-tcp, nvmet-tcp, nvme-rdma, rdma_rxe) and for reference targets in the guest
# (nvmet, LIO); dm-log-writes records the real kernel's writes for the power-loss test.
MODULES=(virtio_pci virtio_net virtio_rng 9pnet_virtio 9p overlay configfs loop brd
    ext4 sd_mod sg crc32_generic crc32c_generic crct10dif_generic
    iscsi_tcp nvme-tcp nvme-rdma nvmet nvmet-tcp nvmet-rdma
    iscsi_target_mod target_core_file target_core_iblock
    rdma_rxe rdma_ucm ib_uverbs
    dm-log-writes)

INIT="$(cat <<'EOF'
#!/bin/busybox sh
# /init of the MaaS test guest, generated by scripts/guest-build.sh (see tests/src/guest.rs).
/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
exec </dev/console >/dev/console 2>&1

RUN=""; NAME=guest
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        maas.run=*) RUN="${arg#maas.run=}" ;;
        maas.name=*) NAME="${arg#maas.name=}" ;;
    esac
done
halt_now() { sync; poweroff -f; sleep 10; echo o >/proc/sysrq-trigger; }
die() { echo "MAAS-GUEST-FAIL $*"; echo "MAAS-GUEST-EXIT 255"; halt_now; }

for m in virtio_pci virtio_net virtio_rng 9pnet_virtio 9p overlay configfs crc32c_generic sd_mod; do
    modprobe "$m" || die "modprobe $m"
done
hostname "$NAME"
ip link set lo up
ip link set eth0 up || die "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mount -t configfs configfs /sys/kernel/config

mkdir -p /host /rw /merged
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || die "9p hostroot"
mount -t tmpfs -o mode=755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /merged \
    || die "overlay"
for d in proc sys dev; do mount --rbind "/$d" "/merged/$d"; done
mkdir -p /merged/dev/pts /merged/dev/shm
mount -t devpts devpts /merged/dev/pts
mount -t tmpfs tmpfs /merged/dev/shm
mount -t tmpfs -o mode=755 tmpfs /merged/run
mkdir -p /merged/run/lock
mkdir -p /merged/lib/modules
mount --bind /lib/modules /merged/lib/modules
mkdir -p /merged/xchg
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 xchg /merged/xchg || die "9p xchg"
[ -n "$RUN" ] && [ -f "/merged/xchg/$RUN/run.sh" ] || die "no run script (maas.run=$RUN)"

echo "MAAS-GUEST-START $NAME"
OUT="/merged/xchg/$RUN/output"
: >>"$OUT"
# The script's output goes to a file in the exchange directory (the host reads it live); a
# mirror follows it onto the console. Daemons the script leaves behind can hold the file open
# without blocking the shutdown.
tail -n +1 -f "$OUT" &
MIRROR=$!
chroot /merged /bin/bash "/xchg/$RUN/run.sh" </dev/null >>"$OUT" 2>&1
rc=$?
echo "$rc" >"/merged/xchg/$RUN/exit.tmp" && mv "/merged/xchg/$RUN/exit.tmp" "/merged/xchg/$RUN/exit"
sleep 1
kill "$MIRROR" 2>/dev/null
echo "MAAS-GUEST-EXIT $rc"
halt_now
EOF
)"

BUSYBOX_VERSION="$(dpkg-query -W -f='${Version}' busybox-static)"
INPUTS="$(printf '%s\n' "kernel=$KPKG=$KVERSION" "busybox=$BUSYBOX_VERSION" "modules=${MODULES[*]}" \
    "$INIT" | sha256sum | cut -d' ' -f1)"
INITRD="$GUEST/initrd-$KVER.gz"
if [ -f "$INITRD" ] && [ "$(cat "$INITRD.stamp" 2>/dev/null)" = "$INPUTS" ]; then
    :
else
    log "building $INITRD"
    ROOT="$(mktemp -d "$GUEST/.initrd.XXXXXX")"
    CLEANUP+=("rm -rf '$ROOT'")
    mkdir -p "$ROOT"/{bin,sbin,dev,proc,sys,run,tmp,etc,lib/modules/"$KVER"}
    install -m 755 /bin/busybox "$ROOT/bin/busybox"
    ln -s busybox "$ROOT/bin/sh"
    ln -s ../bin/busybox "$ROOT/sbin/modprobe"
    # The dependency closure of the modules, at their paths under lib/modules/KVER.
    for m in "${MODULES[@]}"; do
        deps="$(modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" 2>&1)" \
            || die "module $m: $deps"
        while read -r kind path _; do
            case "$kind" in
                insmod)
                    # Debian's 6.12 modules are xz-compressed: stored uncompressed, so that
                    # busybox's modprobe in /init loads them as well as the host's kmod.
                    rel="${path#"$KDIR"/}"
                    rel="${rel%.xz}"
                    mkdir -p "$ROOT/$(dirname "$rel")"
                    if [ -e "$ROOT/$rel" ]; then :
                    elif [ "$path" != "${path%.xz}" ]; then xz -dc "$path" >"$ROOT/$rel"
                    else cp "$path" "$ROOT/$rel"; fi ;;
                builtin) ;;
                *) die "module $m: unexpected line: $kind $path" ;;
            esac
        done <<<"$deps"
    done
    for f in modules.order modules.builtin modules.builtin.modinfo; do
        cp "$KDIR/lib/modules/$KVER/$f" "$ROOT/lib/modules/$KVER/"
    done
    depmod -b "$ROOT" "$KVER"
    printf '%s\n' "$INIT" >"$ROOT/init"
    chmod 755 "$ROOT/init"
    ( cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio -o -H newc -R 0:0 --quiet | gzip -1 ) >"$INITRD.tmp"
    mv -f "$INITRD.tmp" "$INITRD"
    printf '%s\n' "$INPUTS" >"$INITRD.stamp"
    log "initramfs: $(du -h "$INITRD" | cut -f1), $(find "$ROOT" -name '*.ko' | wc -l) modules"
    find "$GUEST" -maxdepth 1 -name 'initrd-*.gz*' ! -name "initrd-$KVER.gz*" -delete
fi

# ---------------------------------------------------------------- 5. environment
ENV="$(cat <<EOF
export MAAS_GUEST_KERNEL='$KERNEL'
export MAAS_GUEST_INITRD='$INITRD'
export MAAS_QEMU_SYSTEM='$MAAS_QEMU_SYSTEM'
EOF
)"
printf '%s\n' "$ENV" | write_if_changed "$GUEST/env.sh" 644
printf '%s\n' "$ENV"
