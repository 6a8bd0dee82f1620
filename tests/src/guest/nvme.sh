# NVMe/TCP helpers for guest scripts: the host's own nvme-cli over the guest kernel's nvme-tcp,
# and Linux nvmet (configfs) as the reference target inside the guest.
# Sourced by the maas-tests guest harness (Guest::lib(NVME_SH), tests/src/guest/mod.rs); the
# checks (nvme_target_checks) also need TREE_SH (manifest).

# Loads the host side (crc32c first: header and data digests).
nvme_start() {
    modprobe crc32c_generic && modprobe nvme-tcp || fail "modprobe nvme-tcp"
}

# nvme_discovered ADDR PORT [NVME-DISCOVER-ARGS...]: the NVM subsystems the discovery controller
# at ADDR:PORT reports to this host (or to the one -q/-I name), one "trtype subnqn traddr
# trsvcid" line each.
nvme_discovered() {
    local out
    out=$(nvme discover -t tcp -a "$1" -s "$2" "${@:3}" -o json) || fail "nvme discover $1:$2 ${*:3}"
    jq -r '.records[]? | select(.subtype == "nvme subsystem")
        | "\(.trtype) \(.subnqn) \(.traddr) \(.trsvcid)"' <<<"$out" || fail "discovery log: $out"
}

# nvme_connect ADDR PORT NQN [NVME-CONNECT-ARGS...]: connects (nvme-cli's status); prints the
# controller (nvmeN).
nvme_connect() {
    local out
    out=$(nvme connect -t tcp -a "$1" -s "$2" -n "$3" "${@:4}" -o json) || return
    jq -r .device <<<"$out"
}

# nvme_ctrl NQN: the controller (nvmeN) connected to subsystem NQN, if any.
nvme_ctrl() {
    local c
    for c in /sys/class/nvme/nvme*; do
        [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] && echo "${c##*/}" && return 0
    done
    return 1
}

# nvme_ns NQN: waits for the block device of namespace 1 of subsystem NQN (the multipath head,
# /dev/nvmeNn1) and prints it.
nvme_ns() {
    local i s b
    for i in $(seq 600); do
        for s in /sys/class/nvme-subsystem/nvme-subsys*; do
            [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$1" ] || continue
            for b in "$s"/nvme*n1; do
                if [ -e "$b" ] && [ -b "/dev/${b##*/}" ]; then
                    echo "/dev/${b##*/}"
                    return 0
                fi
            done
        done
        sleep 0.1
    done
    fail "no namespace for $1"
}

# nvme_path CTRL: the block device of namespace 1 through controller CTRL (nvmeNcMn1, where the
# kernel counts that path's I/O).
nvme_path() {
    local b
    for b in /sys/class/nvme/"$1"/nvme*c*n1; do
        [ -e "$b" ] && echo "${b##*/}" && return 0
    done
    fail "no namespace path under $1"
}

# nvme_disconnect NQN: disconnects every controller of subsystem NQN and waits until they are
# gone.
nvme_disconnect() {
    local i
    nvme disconnect -n "$1" >/dev/null || fail "nvme disconnect $1"
    for i in $(seq 300); do
        nvme_ctrl "$1" >/dev/null || return 0
        sleep 0.1
    done
    fail "a controller of $1 remains after disconnect"
}

# nvme_refused ADDR PORT NQN HOSTNQN: a Fabrics Connect to NQN as host HOSTNQN (with a host id
# of its own) fails because the target says this host is not allowed (Connect Invalid Host, as
# the kernel logs it), and leaves no controller behind.
nvme_refused() {
    local before rc=0
    before=$(dmesg | wc -l)
    nvme connect -t tcp -a "$1" -s "$2" -n "$3" -q "$4" -I "$(cat /proc/sys/kernel/random/uuid)" \
        || rc=$?
    [ "$rc" != 0 ] || fail "host $4 connected to $3"
    dmesg | tail -n +"$((before + 1))" | tee /tmp/refused.log
    grep -qF "Connect for subsystem $3 is not allowed, hostnqn: $4" /tmp/refused.log \
        || fail "host $4 refused by $3 for another reason than Connect Invalid Host"
    ! nvme_ctrl "$3" >/dev/null || fail "a controller of $3 remains after the refused connect"
    echo "refused: host $4 at $3"
}

# nvme_identify CTRL DEV NQN SIZE: Identify Controller, Identify Namespace, the namespace
# identification descriptors and what the kernel made of them are sane and agree: the
# controller of subsystem NQN over TCP, a namespace of SIZE bytes with discard, write zeroes
# and a volatile write cache.
nvme_identify() {
    local ctrl="$1" dev="$2" nqn="$3" size="$4" c="/sys/class/nvme/$1" b="/sys/block/${2#/dev/}"
    local ic ns descs
    ic=$(nvme id-ctrl "/dev/$ctrl" -o json) || fail "nvme id-ctrl /dev/$ctrl"
    ns=$(nvme id-ns "$dev" -o json) || fail "nvme id-ns $dev"
    descs=$(nvme ns-descs "$dev" -o json) || fail "nvme ns-descs $dev"
    # One jq run per document (jq starts slowly under TCG): shell assignments, quoted.
    local sn mn fr cntlid nn sgls oncs vwc kas sqes cqes ioccsz iorcsz maxcmd subnqn
    local nsze ncap nuse ds nlbaf dlfeat uuid nguid
    eval "$(jq -r 'def t: tostring | sub(" +$"; "");
        @sh "sn=\(.sn | t) mn=\(.mn | t) fr=\(.fr | t) cntlid=\(.cntlid) nn=\(.nn) sgls=\(.sgls)
             oncs=\(.oncs) vwc=\(.vwc) kas=\(.kas) sqes=\(.sqes) cqes=\(.cqes)
             ioccsz=\(.ioccsz) iorcsz=\(.iorcsz) maxcmd=\(.maxcmd) subnqn=\(.subnqn)"' <<<"$ic")" \
        || fail "id-ctrl: $ic"
    eval "$(jq -r '@sh "nsze=\(.nsze) ncap=\(.ncap) nuse=\(.nuse) ds=\(.lbafs[.flbas % 16].ds)
             nlbaf=\(.nlbaf) dlfeat=\(.dlfeat)"' <<<"$ns")" || fail "id-ns: $ns"
    eval "$(jq -r '."ns-descs" | @sh "uuid=\(map(select(.type == "uuid") | .uuid) | first // "")
             nguid=\(map(select(.type == "nguid") | .nguid) | first // "")"' <<<"$descs")" \
        || fail "ns-descs: $descs"
    echo "id-ctrl: sn='$sn' mn='$mn' fr='$fr' cntlid=$cntlid nn=$nn sgls=$sgls oncs=$oncs vwc=$vwc kas=$kas sqes=$sqes cqes=$cqes ioccsz=$ioccsz iorcsz=$iorcsz maxcmd=$maxcmd subnqn=$subnqn"
    [ -n "$sn" ] && [ "$sn" = "$(sed 's/ *$//' "$c/serial")" ] || fail "id-ctrl sn '$sn'"
    [ -n "$mn" ] && [ "$mn" = "$(sed 's/ *$//' "$c/model")" ] || fail "id-ctrl mn '$mn'"
    [ -n "$fr" ] || fail "id-ctrl: no firmware revision"
    [ "$subnqn" = "$nqn" ] || fail "id-ctrl subnqn $subnqn, connected to $nqn"
    [ "$cntlid" = "$(cat "$c/cntlid")" ] || fail "id-ctrl cntlid $cntlid"
    [ "$nn" -ge 1 ] || fail "id-ctrl nn $nn"
    [ $((sgls & 3)) != 0 ] || fail "id-ctrl sgls $sgls: no SGL support"
    [ $((oncs & 4)) != 0 ] || fail "id-ctrl oncs $oncs: no Dataset Management"
    [ $((oncs & 8)) != 0 ] || fail "id-ctrl oncs $oncs: no Write Zeroes"
    [ $((vwc & 1)) = 1 ] || fail "id-ctrl vwc $vwc: no volatile write cache"
    [ "$kas" -ge 1 ] || fail "id-ctrl kas $kas: no keep-alive support"
    [ "$sqes" = 102 ] && [ "$cqes" = 68 ] || fail "id-ctrl sqes $sqes cqes $cqes"
    [ "$ioccsz" -ge 4 ] && [ "$iorcsz" -ge 1 ] || fail "id-ctrl ioccsz $ioccsz iorcsz $iorcsz"
    [ "$(cat "$c/transport")" = tcp ] && [ "$(cat "$c/state")" = live ] || fail "$ctrl not live over tcp"
    echo "id-ns: nsze=$nsze ncap=$ncap nuse=$nuse lba=$((1 << ds)) nlbaf=$nlbaf dlfeat=$dlfeat"
    [ "$ds" -ge 9 ] && [ "$ds" -le 12 ] || fail "id-ns: LBA data size 2^$ds"
    [ $((nsze << ds)) = "$size" ] || fail "id-ns nsze $nsze x $((1 << ds)) B is not $size B"
    [ "$ncap" -le "$nsze" ] && [ "$ncap" -ge 1 ] && [ "$nuse" -le "$ncap" ] || fail "id-ns ncap/nuse"
    [ "$(blockdev --getsize64 "$dev")" = "$size" ] || fail "$dev: $(blockdev --getsize64 "$dev") bytes"
    [ "$(blockdev --getss "$dev")" = $((1 << ds)) ] || fail "$dev: $(blockdev --getss "$dev")-byte sectors"
    echo "ns-descs: uuid=$uuid nguid=$nguid; kernel: wwid=$(cat "$b/wwid")"
    [ -n "$uuid" ] && [ "${uuid//[0-]/}" != "" ] || fail "ns-descs: no UUID ($descs)"
    [ -n "$nguid" ] && [ "${nguid//0/}" != "" ] || fail "ns-descs: no NGUID ($descs)"
    [ "$(cat "$b/uuid")" = "$uuid" ] || fail "the kernel's uuid $(cat "$b/uuid")"
    [ "$(tr -d - <"$b/nguid")" = "$nguid" ] || fail "the kernel's nguid $(cat "$b/nguid")"
    # What the kernel made of ONCS and VWC.
    [ "$(cat "$b/queue/discard_max_bytes")" -gt 0 ] || fail "$dev: no discard"
    [ "$(cat "$b/queue/write_zeroes_max_bytes")" -gt 0 ] || fail "$dev: no write zeroes"
    [ "$(cat "$b/queue/write_cache")" = "write back" ] || fail "$dev: write cache $(cat "$b/queue/write_cache")"
    # nvme list shows the namespace with the controller's serial number.
    nvme list | tee /tmp/nvme-list
    grep -E "^$dev +" /tmp/nvme-list | grep -qF " $sn " || fail "nvme list does not show $dev ($sn)"
}

# nvme_flushes CTRL: flush requests completed through controller CTRL's path.
nvme_flushes() {
    awk '{print $16}' "/sys/block/$(nvme_path "$1")/stat"
}

# nvme_discard DEV CTRL DLFEAT: deallocation (blkdiscard) and Write Zeroes (blkdiscard -z) on
# an 8 MiB pattern leave every other byte alone; zeroed bytes read back as zeroes, and so do
# deallocated ones if the namespace says so (DLFEAT, from Identify Namespace); an fsync sends
# Flush commands (the volatile write cache) that succeed.
nvme_discard() {
    local dev="$1" flushes
    head -c 8M /dev/urandom >/run/pattern
    flushes=$(nvme_flushes "$2")
    dd if=/run/pattern of="$dev" bs=1M oflag=direct conv=fsync status=none || fail "writing $dev"
    [ "$(nvme_flushes "$2")" -gt "$flushes" ] || fail "fsync on $dev sent no Flush"
    blkdiscard -o 1MiB -l 2MiB "$dev" || fail "blkdiscard"
    blkdiscard -z -o 4MiB -l 1MiB "$dev" || fail "blkdiscard -z (Write Zeroes)"
    # region FILE OFFSET LENGTH: those bytes of FILE.
    region() {
        dd if="$1" bs=64k iflag=direct,skip_bytes,count_bytes skip="$2" count="$3" status=none
    }
    # same OFFSET LENGTH: those bytes of the device are the pattern's.
    same() {
        region "$dev" "$1" "$2" >/run/got && head -c "$(($1 + $2))" /run/pattern | tail -c "$2" \
            | cmp - /run/got || fail "$dev: bytes $1+$2 changed"
    }
    same 0 $((1 << 20))
    same $((3 << 20)) $((1 << 20))
    same $((5 << 20)) $((3 << 20))
    region "$dev" $((4 << 20)) $((1 << 20)) | cmp -n $((1 << 20)) - /dev/zero || fail "$dev: Write Zeroes left data"
    if [ $(($3 & 7)) = 1 ]; then
        region "$dev" $((1 << 20)) $((2 << 20)) | cmp -n $((2 << 20)) - /dev/zero \
            || fail "$dev: deallocated blocks do not read as zeroes (DLFEAT $3)"
        echo "deallocated blocks read as zeroes (DLFEAT $3)"
    fi
    echo "discard and write zeroes: the rest of the pattern intact, zeroes read back"
}

# nvme_fio FILE SIZE [FIO-ARGS...]: random writes of 4-128 KiB at queue depth 16 with crc32c
# verify headers, then every block read back and verified; fails unless fio found no error and
# moved SIZE bytes each way.
nvme_fio() {
    local out rc=0
    out=$(fio --name=verify --filename="$1" --size="$2" --direct=1 --ioengine=libaio \
        --iodepth=16 --rw=randwrite --bsrange=4k-128k --verify=crc32c --verify_fatal=1 \
        "${@:3}" --output-format=json) || rc=$?
    [ "$rc" = 0 ] || fail "fio on $1 failed ($rc): $out"
    jq -e --argjson n "$(numfmt --from=iec "$2")" \
        '.jobs[0] | .error == 0 and .write.io_bytes == $n and .read.io_bytes == $n' \
        <<<"$out" >/dev/null || fail "fio on $1: $out"
    echo "fio: $2 written and verified on $1 ($(jq -r '.jobs[0].write.bw' <<<"$out") KiB/s write)"
}

# nvme_tree DIR: a small file tree of random files (a few bytes to 3 MiB, 16 MiB in all).
nvme_tree() {
    local i
    mkdir -p "$1/a/b" "$1/c"
    for i in $(seq 0 39); do
        head -c $(( (i * 7919 % 400) * 1031 + i )) /dev/urandom >"$1/$( [ $((i % 3)) = 0 ] && echo a/b || echo c)/f$i"
    done
    head -c 3M /dev/urandom >"$1/big"
}

# nvme_target_checks ADDR PORT NQN HIDDEN OTHER SIZE: the proof one target must pass, with this
# guest's host NQN allowed on subsystem NQN (namespace 1: SIZE bytes, scratch) and host NQN OTHER
# the only one allowed on subsystem HIDDEN, both served at ADDR:PORT (discovery included):
# discovery shows each host its own subsystems only, unlisted hosts are refused at Connect; then
# a connection without and one with header and data digests: identify data, discard and write
# zeroes, fio verify, ext4 with files and checksums that survive the reconnection, fsck.
nvme_target_checks() {
    local addr="$1" port="$2" nqn="$3" hidden="$4" other="$5" size="$6" ctrl dev
    nvme_discovered "$addr" "$port" | tee /tmp/discovered
    grep -qxF "tcp $nqn $addr $port" /tmp/discovered || fail "discovery does not list $nqn at $addr:$port"
    ! grep -qF " $hidden " /tmp/discovered || fail "discovery shows $hidden to a host it does not allow"
    nvme_discovered "$addr" "$port" -q "$other" -I "$(cat /proc/sys/kernel/random/uuid)" \
        | tee /tmp/discovered-other
    grep -qxF "tcp $hidden $addr $port" /tmp/discovered-other || fail "discovery does not list $hidden to $other"
    ! grep -qF " $nqn " /tmp/discovered-other || fail "discovery shows $nqn to $other"
    nvme_refused "$addr" "$port" "$hidden" "$MAAS_HOST_NQN"
    nvme_refused "$addr" "$port" "$nqn" "$other"
    echo "checks: refusals after $SECONDS s"
    mark refusals-checked

    ctrl=$(nvme_connect "$addr" "$port" "$nqn") || fail "nvme connect $nqn"
    dev=$(nvme_ns "$nqn")
    echo "connected: $ctrl ($(cat "/sys/class/nvme/$ctrl/address")), namespace $dev"
    [ "$(nvme_ctrl "$nqn")" = "$ctrl" ] || fail "nvme connect reported $ctrl"
    nvme_identify "$ctrl" "$dev" "$nqn" "$size"
    nvme_discard "$dev" "$ctrl" "$(nvme id-ns "$dev" -o json | jq .dlfeat)"
    nvme_fio "$dev" 24M
    mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 $dev"
    rm -rf /run/tree && nvme_tree /run/tree
    manifest /run/tree >/run/tree.md5
    mkdir -p /mnt/nvme
    mount "$dev" /mnt/nvme && cp -a /run/tree/. /mnt/nvme/ && umount /mnt/nvme || fail "ext4 on $dev"
    mount -o ro "$dev" /mnt/nvme || fail "mount $dev"
    manifest /mnt/nvme | diff -u /run/tree.md5 - || fail "the files read back differ"
    umount /mnt/nvme
    nvme_disconnect "$nqn"
    echo "checks: plain after $SECONDS s"
    mark plain-checked

    ctrl=$(nvme_connect "$addr" "$port" "$nqn" --hdr-digest --data-digest) \
        || fail "nvme connect --hdr-digest --data-digest $nqn"
    dev=$(nvme_ns "$nqn")
    echo "connected with header and data digests: $ctrl, namespace $dev"
    nvme list | grep -qE "^$dev " || fail "nvme list does not show $dev"
    mount "$dev" /mnt/nvme || fail "mount $dev"
    manifest /mnt/nvme | diff -u /run/tree.md5 - || fail "the files differ after reconnecting"
    nvme_fio /mnt/nvme/fio.dat 16M
    umount /mnt/nvme
    fsck.ext4 -n -f "$dev" || fail "fsck.ext4 -n found problems on $dev"
    nvme_disconnect "$nqn"
    nvme_no_complaints
    echo "checks: digests after $SECONDS s"
    mark digests-checked
}

# nvme_no_complaints: the kernel logged no error about an NVMe controller but the refusals
# (Connect Invalid Host: status 0x4184).
nvme_no_complaints() {
    dmesg | grep -E '\bnvme[0-9]*\b|nvme_' | tee /tmp/nvme-dmesg \
        | grep -iE 'error|fail|timeout|invalid|unexpected|reset|recover|abort|digest|warn' \
        | grep -vE 'is not allowed, hostnqn|failed to connect queue: 0 ret=16772' >/tmp/complaints
    [ ! -s /tmp/complaints ] || fail "the kernel complained: $(cat /tmp/complaints)"
}

# nvmet_subsystem NQN HOSTNQN DEV: a Linux nvmet subsystem that allows only HOSTNQN, with DEV as
# namespace 1 (with an NGUID).
nvmet_subsystem() {
    local c=/sys/kernel/config/nvmet s="/sys/kernel/config/nvmet/subsystems/$1"
    mkdir -p "$c/hosts/$2"
    mkdir "$s" && echo 0 >"$s/attr_allow_any_host" && ln -s "$c/hosts/$2" "$s/allowed_hosts/" \
        && mkdir "$s/namespaces/1" && echo "$3" >"$s/namespaces/1/device_path" \
        && tr -d - </proc/sys/kernel/random/uuid >"$s/namespaces/1/device_nguid" \
        && echo 1 >"$s/namespaces/1/enable" || fail "nvmet subsystem $1"
}

# nvmet_port ID ADDR PORT NQN...: an nvmet TCP port at ADDR:PORT serving these subsystems.
nvmet_port() {
    local p="/sys/kernel/config/nvmet/ports/$1" n
    mkdir "$p" && echo tcp >"$p/addr_trtype" && echo ipv4 >"$p/addr_adrfam" \
        && echo "$2" >"$p/addr_traddr" && echo "$3" >"$p/addr_trsvcid" || fail "nvmet port $1"
    for n in "${@:4}"; do
        ln -s "/sys/kernel/config/nvmet/subsystems/$n" "$p/subsystems/" || fail "nvmet port $1: $n"
    done
}

# nvmet_reference ADDR PORT NQN HIDDEN OTHER SIZE: Linux nvmet in this guest, set up for
# nvme_target_checks with the same arguments: two RAM disks of SIZE bytes (brd).
nvmet_reference() {
    modprobe nvmet && modprobe nvmet-tcp && modprobe brd rd_nr=2 rd_size=$(($6 / 1024)) \
        || fail "modprobe nvmet"
    nvmet_subsystem "$3" "$MAAS_HOST_NQN" /dev/ram0
    nvmet_subsystem "$4" "$5" /dev/ram1
    nvmet_port 1 "$1" "$2" "$3" "$4"
}

# nvme_auth_io DEV: 1 MiB of random data written to DEV (direct I/O) reads back the same.
nvme_auth_io() {
    head -c 1M /dev/urandom >/run/auth.dat
    dd if=/run/auth.dat of="$1" bs=1M count=1 oflag=direct conv=fsync status=none \
        || fail "write to $1"
    cmp <(dd if="$1" bs=1M count=1 iflag=direct status=none) /run/auth.dat \
        || fail "$1 read back other data"
}

# nvme_auth_connect ADDR PORT NQN WHAT [NVME-CONNECT-ARGS...]: connects with these DH-HMAC-CHAP
# arguments, does I/O and disconnects; prints what the kernel logged about the authentication
# (into /tmp/auth.log too).
nvme_auth_connect() {
    local before ctrl dev
    before=$(dmesg | wc -l)
    ctrl=$(nvme_connect "$1" "$2" "$3" "${@:5}") || fail "$4: nvme connect refused"
    dev=$(nvme_ns "$3")
    nvme_auth_io "$dev"
    nvme_disconnect "$3"
    dmesg | tail -n +"$((before + 1))" >/tmp/auth.log
    grep -qE "qid 0: authenticated with hash hmac\(sha[0-9]+\) dhgroup [a-z0-9]+" /tmp/auth.log \
        || fail "$4: the kernel logged no authentication: $(cat /tmp/auth.log)"
    echo "auth: $4 ($ctrl): $(grep -oE 'authenticated with hash .*' /tmp/auth.log | head -n1)"
}

# nvme_auth_refused ADDR PORT NQN WHAT [NVME-CONNECT-ARGS...]: a connect with these arguments
# fails and leaves no controller behind; the kernel's words go to /tmp/auth.log.
nvme_auth_refused() {
    local before rc=0
    before=$(dmesg | wc -l)
    nvme connect -t tcp -a "$1" -s "$2" -n "$3" "${@:5}" >/tmp/auth.out 2>&1 || rc=$?
    [ "$rc" != 0 ] || fail "$4: connected: $(cat /tmp/auth.out)"
    dmesg | tail -n +"$((before + 1))" >/tmp/auth.log
    ! nvme_ctrl "$3" >/dev/null || fail "$4: a controller of $3 remains"
    echo "auth: refused: $4: $(grep -oE 'qid 0: .*' /tmp/auth.log | tr '\n' ';')"
}

# nvme_auth_checks ADDR PORT NQN HOSTKEY CTRLKEY: subsystem NQN at ADDR:PORT requires
# DH-HMAC-CHAP with host secret HOSTKEY from this host and has controller secret CTRLKEY. The
# right host secret connects and does I/O (every queue authenticates: the admin queue's result
# is logged), one-way and bidirectional; a wrong and a missing host secret are refused, and a
# wrong controller secret is refused by the host itself.
nvme_auth_checks() {
    local wrong
    wrong=$(nvme gen-dhchap-key -m 1 -n "$MAAS_HOST_NQN") || fail "nvme gen-dhchap-key"
    nvme_auth_connect "$1" "$2" "$3" one-way --dhchap-secret="$4"
    mark auth-one-way
    nvme_auth_connect "$1" "$2" "$3" bidirectional --dhchap-secret="$4" --dhchap-ctrl-secret="$5"
    grep -q "qid 0: controller authenticated" /tmp/auth.log \
        || fail "bidirectional: the kernel did not authenticate the controller: $(cat /tmp/auth.log)"
    mark auth-bidirectional
    nvme_auth_refused "$1" "$2" "$3" "wrong host secret" --dhchap-secret="$wrong"
    nvme_auth_refused "$1" "$2" "$3" "no host secret"
    nvme_auth_refused "$1" "$2" "$3" "wrong controller secret" --dhchap-secret="$4" \
        --dhchap-ctrl-secret="$wrong"
    grep -q "qid 0: controller authentication failed" /tmp/auth.log \
        || fail "wrong controller secret: the host did not refuse the controller: $(cat /tmp/auth.log)"
    mark auth-refusals
}

# nvmet_auth_reference ADDR PORT NQN HOSTKEY CTRLKEY: Linux nvmet in this guest serving
# subsystem NQN (a 64 MiB RAM disk) to this host only, with DH-HMAC-CHAP: host secret HOSTKEY,
# controller secret CTRLKEY, SHA-256 and ffdhe2048.
nvmet_auth_reference() {
    local h="/sys/kernel/config/nvmet/hosts/$MAAS_HOST_NQN"
    modprobe nvmet && modprobe nvmet-tcp && modprobe brd rd_nr=1 rd_size=65536 \
        || fail "modprobe nvmet"
    nvmet_subsystem "$3" "$MAAS_HOST_NQN" /dev/ram0
    echo "$4" >"$h/dhchap_key" && echo "$5" >"$h/dhchap_ctrl_key" \
        && echo "hmac(sha256)" >"$h/dhchap_hash" && echo ffdhe2048 >"$h/dhchap_dhgroup" \
        || fail "nvmet DH-HMAC-CHAP settings"
    nvmet_port 1 "$1" "$2" "$3"
}
