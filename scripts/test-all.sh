#!/usr/bin/env bash
# The whole MaaS test suite: installs what it needs (idempotently), then checks formatting and
# lints, runs every test (SQLite and PostgreSQL catalogs), and fuzzes the REST API from its
# OpenAPI document. This is exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/maas/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
command -v fio >/dev/null 2>&1 || need_apt+=(fio)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v pg_lsclusters >/dev/null 2>&1 || need_apt+=(postgresql)
# The probe's tests: rsync (its file-tree copy), setfacl/setfattr (metadata it must keep).
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v setfacl >/dev/null 2>&1 || need_apt+=(acl)
command -v setfattr >/dev/null 2>&1 || need_apt+=(attr)
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
# The probe's NBD source is tested against QEMU's own NBD server and dirty bitmaps.
command -v qemu-nbd >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
if [ "${#need_apt[@]}" -gt 0 ]; then
    echo "== installing: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
command -v st >/dev/null 2>&1 || python3 -m pip install -q 'schemathesis>=4,<5'
# S3 servers and a third-party S3 client for the archive tier's tests.
command -v s3s-fs >/dev/null 2>&1 || cargo install --locked s3s-fs@0.14.1 --features binary
command -v moto_server >/dev/null 2>&1 || python3 -m pip install -q 'moto[server]>=5,<6'
command -v aws >/dev/null 2>&1 || python3 -m pip install -q awscli
# BLAKE3 as a third party computes it, to check the probe's file manifests.
python3 -c 'import blake3' 2>/dev/null || python3 -m pip install -q 'blake3>=1,<2'
echo "== iSCSI peers (libiscsi, tgt, QEMU 7.2, fio with libiscsi)"
eval "$(./scripts/iscsi-peers.sh)"
echo "== guest VM (Debian's kernel and an initramfs for QEMU TCG; open-iscsi, nvme-cli)"
eval "$(./scripts/guest-build.sh)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== PostgreSQL for the catalog tests"
MAAS_TEST_POSTGRES_URL="$(./scripts/postgres-up.sh)"
export MAAS_TEST_POSTGRES_URL
echo "== tests"
cargo nextest run --workspace --locked --no-fail-fast
echo "== REST API fuzzing (schemathesis)"
./scripts/api-fuzz.sh
