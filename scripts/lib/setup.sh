# Shared by the setup scripts (iscsi-peers.sh, guest-build.sh): sourced, never run. The caller
# sets SETUP_NAME (its name in log lines) first. Provides SUDO, APT_OPTS, log/die, the CLEANUP
# list run at exit, write_if_changed, missing_pkgs, apt_update_once and apt_install.
# shellcheck shell=bash

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o DPkg::Lock::Timeout=600 -o APT::Sandbox::User=root)

log() { echo "$SETUP_NAME: $*" >&2; }
die() { echo "$SETUP_NAME: ERROR: $*" >&2; exit 1; }

CLEANUP=()
cleanup() { local c; for c in "${CLEANUP[@]}"; do eval "$c" || true; done; }
trap cleanup EXIT

# Writes stdin to FILE (mode MODE) only if the content differs: warm runs touch nothing.
write_if_changed() {
    local file="$1" mode="$2" new tmp
    new="$(cat; echo x)"; new="${new%x}"
    if [ -f "$file" ] && [ "$(cat "$file"; echo x)" = "${new}x" ]; then return 0; fi
    tmp="$(mktemp "$file.XXXXXX")"
    printf '%s' "$new" >"$tmp"
    chmod "$mode" "$tmp"; mv -f "$tmp" "$file"
    log "wrote $file"
}

# Prints those of the given packages that are not installed.
missing_pkgs() {
    local -A ok=()
    local p st
    while read -r p st; do [ "$st" = ii ] && ok[$p]=1; done \
        < <(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "$@" 2>/dev/null || true)
    for p in "$@"; do [ -n "${ok[$p]:-}" ] || echo "$p"; done
}

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" -eq 1 ] && return 0
    log "apt-get update"
    $SUDO apt-get "${APT_OPTS[@]}" update -qq
    APT_UPDATED=1
}

# apt-get install the packages that are missing; refuses anything that would remove a package
# (e.g. the preinstalled qemu-utils 10, which an installed QEMU 7.2 would replace).
apt_install() {
    local missing
    mapfile -t missing < <(missing_pkgs "$@")
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    local sim
    if ! sim="$(apt-get "${APT_OPTS[@]}" -s install --no-install-recommends "${missing[@]}" 2>&1)"; then
        apt_update_once
        sim="$(apt-get "${APT_OPTS[@]}" -s install --no-install-recommends "${missing[@]}" 2>&1)" \
            || die "apt-get cannot install ${missing[*]}: $sim"
    fi
    if grep -q '^Remv' <<<"$sim"; then
        die "installing ${missing[*]} would remove packages, refusing:
$(grep '^Remv' <<<"$sim")"
    fi
    $SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || { apt_update_once
             $SUDO apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2; }
}
