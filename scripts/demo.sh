#!/usr/bin/env bash
# The project demo: LeNet-300-100 on MNIST pruned at initialization (examples/mnist_lenet.py).
# Extra arguments go to the example, e.g. `bash scripts/demo.sh --sparsity 0.95 --distribution erk`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python examples/mnist_lenet.py --data-dir ../shared/data "$@"
