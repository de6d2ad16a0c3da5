"""scipion-cloudexec: run Scipion protocol steps as MPI jobs on remote clusters.

The ``Plugin`` class below is what pyworkflow finds through the
``pyworkflow.plugin`` entry point. Importing this package must stay cheap and
free of side effects on other protocols.
"""
import os

import pyworkflow.plugin

from .executors import seam
from .version import __version__

CONFIG_ENV = "SCIPION_CLOUDEXEC_CONFIG"


class Plugin(pyworkflow.plugin.Plugin):
    """Scipion plugin entry for scipion-cloudexec."""

    _url = "https://github.com/scipion-em/scipion-cloudexec"

    @classmethod
    def _defineVariables(cls):
        home = os.environ.get("SCIPION_HOME", "")
        cls._defineVar(CONFIG_ENV, os.path.join(home, "config", "cloudexec.conf"),
                       description="The clusters file of scipion-cloudexec")

    @classmethod
    def getEnviron(cls):
        """The environment our programs run in: the current one (they are Python modules of
        this package, run by the same interpreter)."""
        import pyworkflow.utils as pwutils
        return pwutils.Environ(os.environ)

    @classmethod
    def defineBinaries(cls, env):
        pass


# pyworkflow gives plugins no executor registry: wrap the one seam, once (see executors/seam.py)
seam.install()
