#!/usr/bin/env bash
# The test command: installs what is missing (apt packages, .venv), then runs pytest
# against a local test bed (sshd on 127.0.0.1, OpenMPI, SLURM) that the tests start
# and stop themselves. Extra arguments go to pytest, e.g.
#   scripts/run-tests.sh -m "not slow and not slurm"     # the quick subset
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -ra --durations=30 "$@"
