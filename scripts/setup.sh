#!/usr/bin/env bash
# Creates .venv in the repo root and installs the project (editable) with its test extras.
# Idempotent: when pyproject.toml is unchanged since the last successful install it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
stamp=.venv/.installed-from
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [ -x .venv/bin/python ] && [ -x .venv/bin/stylize ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "setup: .venv is up to date"
    exit 0
fi

# torch's wheel for this platform unpacks to about 6 GB; fail with a clear message rather than pip's OSError halfway.
need_gb=8
free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1024 / 1024 ))
if [ ! -x .venv/bin/python ] && [ "$free_gb" -lt "$need_gb" ]; then
    echo "setup: only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); the environment needs about ${need_gb} GB" >&2
    exit 1
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# uv is much faster than pip (about 1 min against 3 min from nothing) but reads no pip.conf, so the local
# wheel sources and the torch cap that pip is configured with on this kind of machine are passed on explicitly.
uv_args=(--python .venv/bin/python --compile-bytecode --index-strategy unsafe-best-match)
for url in $(.venv/bin/pip config get global.extra-index-url 2>/dev/null || true); do uv_args+=(--extra-index-url "$url"); done
for dir in $(.venv/bin/pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
    [ -d "$dir" ] && uv_args+=(--find-links "$dir")
done
constraint="$(.venv/bin/pip config get global.constraint 2>/dev/null || true)"
[ -n "$constraint" ] && [ -f "$constraint" ] && uv_args+=(--constraint "$constraint")

if { [ -x .venv/bin/uv ] || .venv/bin/pip install -q uv; } \
    && UV_CACHE_DIR="${UV_CACHE_DIR:-.venv/.uv-cache}" .venv/bin/uv pip install -q "${uv_args[@]}" -e ".[test]"; then
    echo "setup: installed with uv"
else
    echo "setup: uv failed, falling back to pip" >&2
    .venv/bin/pip install -q -e ".[test]"
fi

echo "$want" > "$stamp"
echo "setup: done (.venv/bin/stylize)"
