#!/usr/bin/env bash
# Bounded fuzzing of the REST API, driven by its own OpenAPI document (schemathesis): starts a
# real maasd on a temporary directory, sends generated requests with the admin token, and fails
# on any 5xx or crash. MAAS_FUZZ_EXAMPLES raises the examples per operation (default 40).
# Over HTTPS, as maasd serves by default: schemathesis and curl trust the self-signed
# certificate maasd generates at start (DATA_DIR/tls/api-cert.pem), and nothing else.
# One connection per request: a request sent on a kept-alive connection just as maasd closes it
# for idleness (actix's 5 s) sees the connection end without an answer — the keep-alive race of
# every HTTP server, which clients retry for idempotent methods only, so a PATCH or POST of the
# fuzzer failed now and then ("EOF in violation of protocol") though maasd did nothing wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/maas/target}"
command -v st >/dev/null 2>&1 || python3 -m pip install -q 'schemathesis>=4,<5'
# The test profile: the same artifacts nextest just built, no third compilation.
cargo build -q --profile test -p maas-manager --bin maasd
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
MAAS_API_LISTEN="127.0.0.1:$port" MAAS_POOL_DEVICE_SIZE=$((4<<30)) RUST_LOG=warn \
    "$CARGO_TARGET_DIR/debug/maasd" --data-dir "$work/data" 2> "$work/maasd.log" &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cert="$work/data/tls/api-cert.pem"
for _ in $(seq 100); do
    [ -s "$cert" ] && curl -sf --cacert "$cert" "https://127.0.0.1:$port/api/v1/health" >/dev/null && break
    sleep 0.1
done
token=$(cat "$work/data/admin.token")
status=0
# The hooks module (scripts/api_fuzz_hooks.py) gives schemathesis a serializer for JSON lines.
PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" SCHEMATHESIS_HOOKS=api_fuzz_hooks \
st run "https://127.0.0.1:$port/api/v1/openapi.json" \
    --tls-verify "$cert" \
    --header "Authorization: Bearer $token" \
    --header "Connection: close" \
    --checks not_a_server_error \
    --max-examples "${MAAS_FUZZ_EXAMPLES:-40}" \
    --workers 2 \
    --no-color || status=$?
if ! kill -0 "$pid" 2>/dev/null; then
    echo "maasd died during fuzzing:"; tail -50 "$work/maasd.log"; exit 1
fi
if grep -q "panicked" "$work/maasd.log"; then
    echo "maasd panicked during fuzzing:"; grep -A5 panicked "$work/maasd.log"; exit 1
fi
echo "api-fuzz: 1 passed, 0 failed" | { [ "$status" -eq 0 ] && cat || { echo "api-fuzz: 0 passed, 1 failed"; }; }
exit "$status"
