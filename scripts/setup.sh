#!/usr/bin/env bash
# Install what the demo and the tests need on a Debian/Ubuntu machine (root or sudo):
# OpenSSH server, OpenMPI, SLURM + munge, rsync, RELION 3.1 (Debian's, MPI programs included);
# then a venv in .venv with the plugin and scipion-em-relion 3.1.x, and RELION_HOME for it.
#   scripts/setup.sh            # idempotent: skips what is already there
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(openssh-server openssh-client rsync openmpi-bin libopenmpi-dev slurm-wlm munge procps iproute2 relion)
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
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,relion]' 2> >(grep -v 'is ignored: it is neither' >&2)
  touch "$stamp"
fi
# RELION_HOME for scipion-em-relion: a folder whose bin/ links Debian's relion_* programs; the
# plugin reads the version from the folder's name and knows 3.1.0-3.1.2 (Debian's is 3.1.3,
# the same command line): see scipion_cloudexec/demo/relion.py
relion_home=.venv/relion-3.1.2+debian-3.1.3
refine=$(command -v relion_refine_mpi || true)
if [[ -n $refine && ! -e $relion_home/bin/relion_refine_mpi ]]; then
  mkdir -p "$relion_home/bin"
  for p in "$(dirname "$refine")"/relion_*; do ln -sfn "$p" "$relion_home/bin/"; done
fi
# pyzmq and mpi4py wheels for the system's bare python3, the Python of the tests' "nothing
# installed" cluster (tests/test_provision.py): fetched here, so tests reach no index themselves
BARE=/usr/bin/python3
for pkg in pyzmq:zmq mpi4py:mpi4py; do
  name=${pkg%%:*}; mod=${pkg##*:}
  if [[ -x $BARE ]] && ! ls .venv/wheelhouse/"$name"-*.whl >/dev/null 2>&1; then
    echo "### downloading a $name wheel for $BARE into .venv/wheelhouse"
    plats=$($BARE -c 'import platform as p; v = p.libc_ver()[1].split("."); m = p.machine()
print(" ".join("--platform manylinux_2_%d_%s" % (i, m) for i in range(int(v[1]), 4, -1)),
      " ".join("--platform manylinux%s_%s" % (t, m) for t in ("2014", "2010", "1")))')
    # shellcheck disable=SC2086
    .venv/bin/pip download -q --disable-pip-version-check --only-binary=:all: --no-deps \
      --python-version "$($BARE -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
      --implementation cp $plats -d .venv/wheelhouse \
      "$name==$(.venv/bin/python -c "import $mod; print($mod.__version__)")" \
      2> >(grep -v 'is ignored: it is neither' >&2)
  fi
done
echo "### ready: $(.venv/bin/python -c 'import scipion_cloudexec, pyworkflow, zmq, paramiko, mpi4py, tqdm; print("scipion-cloudexec", scipion_cloudexec.__version__, "pyworkflow", pyworkflow.__version__, "pyzmq", zmq.__version__, "paramiko", paramiko.__version__, "mpi4py", mpi4py.__version__)')"
echo "### RELION $(relion_refine --version 2>/dev/null | sed -n 's/^RELION version: *//p') in $relion_home, scipion-em-relion $(.venv/bin/python -c 'import relion; print(relion.__version__)')"
