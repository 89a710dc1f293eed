#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the test suite. Extra arguments go to pytest, e.g. -k cli or -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export STYLIZE_HOME="$scratch/stylize-home"          # never touch the user's ~/.stylize
export TORCH_HOME="$scratch/torch-home"
export PREFECT_HOME="$scratch/prefect-home"          # otherwise ~/.prefect is created
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false       # must be set before gcsfs is imported (emulator stalls otherwise)

set +e
.venv/bin/python -m pytest -p no:cacheprovider --basetemp="$scratch/pytest" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$status"
