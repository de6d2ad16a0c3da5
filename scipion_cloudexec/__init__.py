"""scipion-cloudexec: run Scipion protocol steps as MPI jobs on remote clusters.

``Plugin`` is what pyworkflow finds through the ``pyworkflow.plugin`` entry point. It is
built on first access (PEP 562), so that the command line and the staging code start
without importing pyworkflow (0.4 s); pyworkflow's plugin registration accesses it, and
that is also when the executor seam is installed (see executors/seam.py).
"""
import os

from .config.clusters import CONFIG_ENV
from .version import __version__
_plugin_class = None


def _make_plugin_class():
    import pyworkflow.plugin
    import pyworkflow.utils as pwutils

    from .executors import seam

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
            """The environment our programs run in: the current one (they are Python modules
            of this package, run by the same interpreter)."""
            return pwutils.Environ(os.environ)

        @classmethod
        def defineBinaries(cls, env):
            pass

    # pyworkflow gives plugins no executor registry: wrap the one seam, once
    seam.install()
    return Plugin


def __getattr__(name):
    global _plugin_class
    if name == "Plugin":
        if _plugin_class is None:
            _plugin_class = _make_plugin_class()
        return _plugin_class
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
