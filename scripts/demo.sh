#!/usr/bin/env bash
# The demo: installs what is missing (scripts/setup.sh), starts a cluster host of its own
# (network namespace, host name, a filesystem view without the desktop's project; sshd,
# OpenMPI), creates a Scipion project with a synthetic particle set and runs RELION 2D
# classification (MPI) and the plugin's power spectra on that cluster through Scipion's
# "Use queue"; reports where each step ran, output sizes and a PNG of the class averages,
# then stops the cluster (--keep leaves it up; --down stops it later).
#   scripts/demo.sh [--keep] [--particles N] [--classes K] [--iterations N] [--mpi N]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m scipion_cloudexec.demo --root "${CLOUDEXEC_DEMO_ROOT:-/tmp/cloudexec-demo}" "$@"
