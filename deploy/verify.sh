#!/usr/bin/env bash
# Verify a running deployment: readiness, generated studies through ct_triage over HTTP and gRPC,
# the served classifier against the export's FP32 reference on the parity set, a short
# perf_analyzer sweep, the metrics endpoint; prints PASS/FAIL per check and a summary, exits non-zero on any failure.
#
#   bash deploy/verify.sh                   after `docker compose up -d`: runs inside the `triton`
#                                           container, where every dependency and the repository are
#   bash deploy/verify.sh --local [ARGS]    with the project installed here: $PYTHON, else this
#                                           checkout's .venv, else python3; ARGS: --http HOST:PORT
#                                           --grpc HOST:PORT --metrics HOST:PORT --repository DIR
#                                           --artifacts DIR --parity-inputs N (deploy/verify.py -h)
#   bash deploy/verify.sh -h                the options, from that Python here (no container needed)
set -euo pipefail
cd "$(dirname "$0")/.."
local_run=false
if [ "${1:-}" = "--local" ]; then
    shift
    local_run=true
fi
for argument in "$@"; do
    if [ "$argument" = "-h" ] || [ "$argument" = "--help" ]; then
        local_run=true
    fi
done
if [ "$local_run" = true ]; then
    python=${PYTHON:-python3}
    if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
        python=.venv/bin/python
    fi
    exec "$python" deploy/verify.py "$@"
fi
exec docker compose exec -T triton python3 /opt/ct-triage/deploy/verify.py "$@"
