#!/usr/bin/env bash
# Starts Debian's PostgreSQL cluster on loopback (installing it if needed) and prints a URL to a
# freshly created test database. Idempotent.
set -euo pipefail
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
read -r ver name port status _ < <(pg_lsclusters --no-header | head -n 1) || true
if [ -z "${ver:-}" ]; then
    ver=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
    $SUDO pg_createcluster "$ver" main >&2
    read -r ver name port status _ < <(pg_lsclusters --no-header | head -n 1)
fi
if [ "$status" != "online" ]; then
    $SUDO pg_ctlcluster "$ver" "$name" start >&2
fi
psql_pg() { $SUDO runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q -p "$port" "$@"; }
for _ in $(seq 50); do psql_pg -c 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
psql_pg -tc "SELECT 1 FROM pg_roles WHERE rolname='maas_test'" | grep -q 1 \
    || psql_pg -c "CREATE ROLE maas_test LOGIN PASSWORD 'maas_test'" >&2
psql_pg -c "DROP DATABASE IF EXISTS maas_test" >&2
psql_pg -c "CREATE DATABASE maas_test OWNER maas_test" >&2
echo "postgres://maas_test:maas_test@127.0.0.1:${port}/maas_test"
