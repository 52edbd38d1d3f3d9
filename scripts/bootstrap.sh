#!/usr/bin/env bash
# Create .venv in the repository root (python3.11, else python3) and install the project with its test
# extras, pinned by constraints.txt. Skips the install when .venv/.bootstrap-stamp records the current
# sha256 of pyproject.toml + constraints.txt, so repeated runs take well under a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
STAMP="$VENV/.bootstrap-stamp"

if [ ! -x "$VENV/bin/python" ]; then
    PYTHON=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "" >/dev/null 2>&1; then
            PYTHON="$candidate"
            break
        fi
    done
    if [ -z "$PYTHON" ]; then
        echo "bootstrap: neither python3.11 nor python3 found" >&2
        exit 1
    fi
    echo "bootstrap: creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
fi

want="$("$VENV/bin/python" - <<'PY'
import hashlib

h = hashlib.sha256()
for name in ("pyproject.toml", "constraints.txt"):
    with open(name, "rb") as f:
        h.update(f.read())
print(h.hexdigest())
PY
)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

echo "bootstrap: installing lightning-pai[test] into $VENV (pyproject.toml or constraints.txt changed)"
rm -f "$STAMP"
"$VENV/bin/python" -m pip install --upgrade pip || echo "bootstrap: warning: could not upgrade pip, continuing" >&2
"$VENV/bin/python" -m pip install -c constraints.txt -e ".[test]"
echo "$want" >"$STAMP"
echo "bootstrap: done"
