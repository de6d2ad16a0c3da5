"""RELION 2D classification through Scipion, as the demo and the tests run it.

RELION is Debian's package (``apt-get install relion``: 3.1.3, ``relion_refine_mpi`` built
against Debian's OpenMPI) and the Scipion side is ``scipion-em-relion`` 3.1.x
(``pip install 'scipion-em-relion>=3.1,<3.2'``); ``scripts/setup.sh`` installs both.

The plugin finds the programs under ``$RELION_HOME/bin`` and reads the RELION version from
that folder's *name*, checked against the versions it knows (3.1.0 to 3.1.2). Debian installs
into /usr/bin, and its 3.1.3 is a bug-fix release of the same command line, so
:data:`HOME_NAME` is a folder of symbolic links to Debian's ``relion_*`` programs whose name
says both: the plugin takes it for 3.1.2 (``Plugin.getActiveVersion()``), a person reads 3.1.3.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import List, Optional, Tuple

#: The RELION_HOME folder name: see the module docstring.
HOME_NAME = "relion-3.1.2+debian-3.1.3"

#: Iteration files RELION 2D classification writes (relion_itNNN_<kind>).
ITERATION_FILES = ("classes.mrcs", "data.star", "model.star", "optimiser.star", "sampling.star")


def _has_programs(home: str) -> bool:
    return os.access(os.path.join(home, "bin", "relion_refine_mpi"), os.X_OK)


def relion_home(create_in: Optional[str] = None) -> Optional[str]:
    """The RELION_HOME to use: ``$RELION_HOME`` when it holds ``bin/relion_refine_mpi``, else
    ``<venv>/relion-3.1.2+debian-3.1.3`` (made by scripts/setup.sh), else one made now in
    *create_in* from the ``relion_*`` programs on PATH; None when RELION is not installed."""
    env = os.environ.get("RELION_HOME", "")
    if env and _has_programs(env):
        return env
    for folder in (sys.prefix, create_in):
        if folder and _has_programs(os.path.join(folder, HOME_NAME)):
            return os.path.join(folder, HOME_NAME)
    refine = shutil.which("relion_refine_mpi")
    if create_in is None or refine is None:
        return None
    home = os.path.join(create_in, HOME_NAME)
    os.makedirs(os.path.join(home, "bin"), exist_ok=True)
    for program in glob.glob(os.path.join(os.path.dirname(refine), "relion_*")):
        link = os.path.join(home, "bin", os.path.basename(program))
        if not os.path.lexists(link):
            os.symlink(program, link)
    return home


def unavailable() -> Optional[str]:
    """Why RELION 2D classification cannot run here, or None when it can."""
    if shutil.which("relion_refine_mpi") is None and relion_home() is None:
        return "RELION is not installed (apt-get install relion; scripts/setup.sh does)"
    try:
        import relion  # noqa: F401  (scipion-em-relion)
        from relion.protocols import ProtRelionClassify2D  # noqa: F401
    except ImportError as e:
        return ("scipion-em-relion is not installed (pip install 'scipion-em-relion>=3.1,<3.2'; "
                "scripts/setup.sh does): %s" % e)
    return None


def import_particles(project, stack: str, angpix: float, label: str = "import particles",
                     launch: bool = True):
    """pwem's ProtImportParticles for a stack (no CTF, no alignment), copied into the project
    so that the project holds its data; launched and waited for when *launch*."""
    from pwem.protocols import ProtImportParticles
    prot = project.newProtocol(ProtImportParticles,
                               importFrom=ProtImportParticles.IMPORT_FROM_FILES,
                               filesPath=os.path.dirname(os.path.abspath(stack)),
                               filesPattern=os.path.basename(stack), samplingRate=angpix,
                               voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1,
                               magnification=50000, copyFiles=True)
    prot.setObjLabel(label)
    if launch:
        project.launchProtocol(prot, wait=True)
        prot = project.getProtocol(prot.getObjId())
        if not prot.isFinished():
            raise RuntimeError("%s did not finish: %s" % (label, prot.getErrorMessage()))
    return prot


def import_micrographs(project, folder: str, angpix: float, label: str = "import micrographs"):
    """pwem's ProtImportMicrographs for ``mic_*.mrc`` in *folder*, copied into the project."""
    from pwem.protocols import ProtImportMicrographs
    prot = project.newProtocol(ProtImportMicrographs, filesPath=folder,
                               filesPattern="mic_*.mrc", samplingRate=angpix, voltage=300.0,
                               sphericalAberration=2.7, amplitudeContrast=0.1,
                               magnification=50000, copyFiles=True)
    prot.setObjLabel(label)
    project.launchProtocol(prot, wait=True)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        raise RuntimeError("%s did not finish: %s" % (label, prot.getErrorMessage()))
    return prot


def classify2d(project, particles, classes: int, iterations: int, mpi: int,
               mask_diameter: float, label: str = "relion 2D", queue: Optional[str] = None,
               seed: Optional[int] = 1):
    """scipion-em-relion's ProtRelionClassify2D on *particles* (a SetOfParticles), on the CPU,
    without CTF (the synthetic particles have none), *mpi* ranks of one thread. With *queue*
    (a cloudexec queue of hosts.conf: a cluster name), its RELION job runs on that cluster.
    *seed*: RELION's ``--random_seed`` (None: RELION picks one from the clock), so that runs
    of the same input with as many MPI ranks give the same classes wherever they run.
    Not launched: ``project.launchProtocol(prot)``."""
    from relion.protocols import ProtRelionClassify2D
    prot = project.newProtocol(ProtRelionClassify2D, numberOfClasses=classes,
                               numberOfIterations=iterations, doCTF=False, doGpu=False,
                               maskDiameterA=mask_diameter, numberOfMpi=mpi, numberOfThreads=1,
                               useParallelDisk=True, pooledParticles=3)
    if seed is not None:
        prot.extraParams.set("--random_seed %d" % seed)
    prot.setObjLabel(label)
    prot.inputParticles.set(particles)
    if queue:
        prot._useQueue.set(True)
        prot.setQueueParams([queue, {"QUEUE_FOR_JOBS": "Y"}])
    return prot


def iteration_files(prot, iterations: int) -> List[str]:
    """The iteration files (0 to *iterations*) of a RELION 2D run that are MISSING."""
    extra = prot._getExtraPath()
    return ["relion_it%03d_%s" % (i, kind) for i in range(iterations + 1)
            for kind in ITERATION_FILES
            if not os.path.exists(os.path.join(extra, "relion_it%03d_%s" % (i, kind)))]


def class_averages(prot) -> Tuple["object", List[int]]:
    """The 2D class averages of a finished run (array K x Y x X, largest class first) and
    their particle counts, read from the project database (outputClasses)."""
    import mrcfile
    import numpy as np
    images, sizes, stacks = [], [], {}
    for cls in prot.outputClasses.iterItems(orderBy="id"):
        index, path = cls.getRepresentative().getLocation()
        path = path.split(":")[0]
        if path not in stacks:
            with mrcfile.open(os.path.join(prot.getProject().path, path)
                              if not os.path.isabs(path) else path, permissive=True) as m:
                stacks[path] = np.array(m.data)
        data = stacks[path]
        images.append(data[index - 1] if data.ndim == 3 else data)
        sizes.append(cls.getSize())
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return np.array([images[i] for i in order]), [sizes[i] for i in order]
