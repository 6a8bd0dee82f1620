# File-tree helpers for guest scripts and for the host (workflow::host_sh): the host computes
# what the guests must find with the same tools the guests use.
# Sourced by the maas-tests guest harness (Guest::lib(TREE_SH), tests/src/guest/mod.rs).

# manifest DIR: the MD5 of every regular file, sorted by path (lost+found aside).
manifest() {
    (cd "$1" && find . -path ./lost+found -prune -o -type f -print0 | LC_ALL=C sort -z \
        | xargs -0 -r md5sum)
}
# listing DIR: every entry with its type (and a file's size, a link's target), sorted.
listing() {
    (cd "$1" && find . -path ./lost+found -prune -o \( -type f -printf 'f %s %p\n' \) \
        -o \( -type d -printf 'd %p\n' \) -o \( -type l -printf 'l %l %p\n' \) | LC_ALL=C sort)
}
# apply_step3 ROOT DELTA: the incremental backup's changes — deletions, new and rewritten
# files, in-place patches (PATH OFFSET PATCHFILE), truncations (PATH SIZE), renames (FROM TO).
apply_step3() {
    local root="$1" delta="$2" p off patch size to
    while read -r p; do rm -rf "${root:?}/$p"; done <"$delta/deleted.txt"
    cp -a "$delta/files/." "$root/"
    while read -r p off patch; do
        dd if="$delta/$patch" of="$root/$p" bs=64k conv=notrunc oflag=seek_bytes seek="$off" \
            status=none
    done <"$delta/patches.txt"
    while read -r p size; do truncate -s "$size" "$root/$p"; done <"$delta/truncate.txt"
    while read -r p to; do mv "$root/$p" "$root/$to"; done <"$delta/renames.txt"
}
