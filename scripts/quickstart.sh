#!/usr/bin/env bash
# The README's first command: installs the project into ./.venv (created if missing) and runs the
# end-to-end quickstart on the embedded local stack (see `vitae quickstart --help`).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv "." || exit 1
exec vitae quickstart "$@"
