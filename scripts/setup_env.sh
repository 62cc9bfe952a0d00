#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the project with its dev extras.
# Re-running is cheap: pip runs again only when pyproject.toml changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FCMAE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.fcmae-installed"
wanted="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
    echo "setup: installing fcmae-collapse and its dependencies into $VENV (takes a few minutes the first time)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[dev]"
    echo "$wanted" > "$stamp"
fi
