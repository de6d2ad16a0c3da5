#!/usr/bin/env bash
# Install what the demo and the tests need on a Debian/Ubuntu machine (root or sudo):
# OpenSSH server, OpenMPI, SLURM + munge, rsync; then a venv in .venv with the plugin.
#   scripts/setup.sh            # idempotent: skips what is already there
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(openssh-server openssh-client rsync openmpi-bin libopenmpi-dev slurm-wlm munge procps iproute2)
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "### installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -q update >/dev/null
  # containers ship policy-rc.d so no service starts; the test bed starts its own daemons
  $SUDO apt-get -q -y install --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "### creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.cloudexec-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "### installing the plugin and its dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v 'is ignored: it is neither' >&2)
  touch "$stamp"
fi
echo "### ready: $(.venv/bin/python -c 'import scipion_cloudexec, pyworkflow, zmq, paramiko, mpi4py, tqdm; print("scipion-cloudexec", scipion_cloudexec.__version__, "pyworkflow", pyworkflow.__version__, "pyzmq", zmq.__version__, "paramiko", paramiko.__version__, "mpi4py", mpi4py.__version__)')"
