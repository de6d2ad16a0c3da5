"""A local embedded "cluster" on this machine, for the demo and the tests.

Real parts: an OpenSSH ``sshd`` on 127.0.0.1 (own port, own host key, one ed25519
user key, no passwords), the machine's OpenMPI, and a one-node SLURM (munge,
slurmctld, slurmd) started without systemd. Everything lives in one folder and
every daemon is stopped by the pid it wrote there.

    tb = LocalTestbed("/tmp/cloudexec-testbed")
    tb.up(slurm=True)          # idempotent; writes tb.clusters_file
    ...
    tb.down()

Packages (openssh-server, openmpi-bin, slurm-wlm, munge) are installed by
``scripts/setup.sh``; this module only starts and stops daemons.
"""
from .local import LocalTestbed, TestbedError

__all__ = ["LocalTestbed", "TestbedError"]
