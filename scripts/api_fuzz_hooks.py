# schemathesis hooks for scripts/api-fuzz.sh (SCHEMATHESIS_HOOKS=api_fuzz_hooks).
# PUT /snapshots/{id}/manifest takes JSON lines (application/x-ndjson), which schemathesis has
# no serializer for: send what it generates as text (str) or as JSON lines (anything else), so
# maasd sees both well-formed and hostile bodies.
import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, list):
        return "".join(json.dumps(v) + "\n" for v in value).encode()
    return (json.dumps(value) + "\n").encode()
