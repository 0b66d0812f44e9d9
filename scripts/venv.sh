# Sourced by the README's commands: creates ./.venv with Python >= 3.10 if missing, activates it,
# and installs the project (editable) with the extras given to ensure_venv.
ensure_venv() {
    local spec="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || { echo "vitae-pipeline needs Python >= 3.10 (found $("$python" --version 2>&1))" >&2; return 1; }
        "$python" -m venv .venv || return 1
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
    python -m pip install --quiet --upgrade pip >/dev/null
    python -m pip install --quiet -e "$spec" || return 1
}
