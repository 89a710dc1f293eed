#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the test suite. Extra arguments go to pytest, e.g. -k cli or -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# The browser test drives Debian's chromium (Playwright's own browser download is not possible offline).
if [ ! -x /usr/bin/chromium ]; then
    echo "test.sh: installing chromium for the browser test" >&2
    if [ "$(id -u)" -eq 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" update -qq \
        && DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq chromium >/dev/null \
        || echo "test.sh: could not install chromium; the browser test will fail and say so" >&2
fi

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
