#!/usr/bin/env bash
# One command that validates a lent GPU in under 8 minutes; the steps are in benchmarks/gpu_check.py.
#   OUT=/results bash benchmarks/gpu_check.sh           # on the GPU machine: results under $OUT
#   DRY_RUN=1 OUT=/tmp/gc bash benchmarks/gpu_check.sh  # on a CPU: every step it can, tiny sizes
# Options after the script name go to gpu_check.py (--budget SECONDS, --only tests,memcheck, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
