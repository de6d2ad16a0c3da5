"""``python -m scipion_cloudexec.demo [--root DIR] [--keep | --down]``: the demo (see run.py).

pyworkflow reads its configuration from the environment when first imported, so the
environment is set here, before anything imports it."""
import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scipion_cloudexec.demo",
                                description="RELION 2D classification and power spectra of a "
                                            "Scipion project, run on a separate cluster host")
    p.add_argument("--root", default="/tmp/cloudexec-demo",
                   help="the demo's folder: desktop project, data, cluster (default %(default)s)")
    p.add_argument("--keep", action="store_true",
                   help="leave the cluster host running (stop it later with --down)")
    p.add_argument("--down", action="store_true", help="stop a cluster left by --keep, and exit")
    p.add_argument("--particles", type=int, default=300)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--mpi", type=int, default=3, help="RELION MPI ranks (1 leader + followers)")
    args = p.parse_args(argv)
    root = os.path.abspath(args.root)
    desktop = os.path.join(root, "desktop")
    scipion_home = os.path.join(desktop, "scipion")
    os.environ.update(
        SCIPION_DOMAIN="pwem", SCIPION_HOME=scipion_home, SCIPION_USER_DATA=desktop,
        SCIPION_PYTHON=sys.executable, SCIPION_NOTIFY="False",
        SCIPION_CLOUDEXEC_CONFIG=os.path.join(scipion_home, "config", "cloudexec.conf"),
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    from .relion import relion_home
    home = relion_home(create_in=root)
    if home:
        os.environ["RELION_HOME"] = home
    from . import run
    if args.down:
        return run.stop_cluster(root)
    return run.demo(root, args)


if __name__ == "__main__":
    sys.exit(main())
