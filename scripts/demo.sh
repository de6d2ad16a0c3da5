#!/usr/bin/env bash
# The demo: installs what is missing, starts a local embedded cluster (sshd on
# 127.0.0.1, OpenMPI, SLURM), checks it and runs MPI jobs through it, then stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/scipion-cloudexec demo --root "${CLOUDEXEC_DEMO_ROOT:-/tmp/cloudexec-demo}" "$@"
