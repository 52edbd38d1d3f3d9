#!/usr/bin/env bash
# Run the test suite: bootstrap .venv, then pytest from the repository root. Extra arguments go to pytest.
# The exit status is pytest's; "no tests collected" (pytest exit 5) is a failure too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
rc=0
.venv/bin/python -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; treating that as a failure (exit 5)" >&2
fi
exit "$rc"
