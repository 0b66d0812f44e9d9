#!/usr/bin/env bash
# Installs the project with its test extras into ./.venv (created if missing) and runs the whole
# test suite. This is the README's test command; CI runs exactly this.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ".[dev]" || exit 1

python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; treating that as a failure" >&2
    exit 1
fi
exit "$status"
