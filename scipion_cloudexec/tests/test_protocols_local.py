"""The plugin's protocols, end to end, in a real Scipion project, run locally.

Headless pyworkflow: ``scipion_env`` points SCIPION_HOME, SCIPION_USER_DATA...
to temporary folders, writes a hosts.conf with an mpirun PARALLEL_COMMAND, and
sets the same values in this process (pyworkflow reads its configuration once,
at import, which has already happened by the time a fixture runs). Protocols
then run as Scipion runs them: each in its own ``pw_protocol_run.py`` process,
with the stock step executors. ``new_project`` creates a project in that
environment; both can be imported by other test modules.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Dict, Iterator

import numpy as np
import pytest

import pyworkflow as pw
from pyworkflow.project import Manager, Project

from scipion_cloudexec.programs import powerspectrum, read_mrc
from scipion_cloudexec.tests.datagen import write_micrographs

pytestmark = pytest.mark.slow  # real protocol processes (mpirun): seconds each

N_MICS = 4
SHAPE = (256, 256)
BOX = 128

HOSTS_CONF = """[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s
"""


@pytest.fixture(scope="module")
def scipion_env(tmp_path_factory) -> Iterator[Dict[str, str]]:
    """A headless Scipion installation in temporary folders; yields its paths.

    Sets the environment (inherited by the protocol processes) and the
    matching ``pyworkflow.Config`` values of this process, and restores both,
    and the working directory, at the end.
    """
    root = tmp_path_factory.mktemp("scipion")
    home, user = root / "home", root / "userdata"
    hosts = home / "config" / "hosts.conf"
    hosts.parent.mkdir(parents=True)
    hosts.write_text(HOSTS_CONF)
    env = {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": str(home),
        "SCIPION_USER_DATA": str(user),
        "SCIPION_HOSTS": str(hosts),
        "SCIPION_CONFIG": str(home / "config" / "scipion.conf"),
        "SCIPION_LOCAL_CONFIG": str(home / "config" / "scipion.conf"),
        "SCIPION_TESTS": str(root / "tests"),
        "SCIPION_LOGS": str(user / "logs"),
        "SCIPION_LOG": str(user / "logs" / "scipion.log"),
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_NOTIFY": "False",
        # OpenMPI refuses root (CI runs as root) and more ranks than cores.
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
            if key.startswith("SCIPION_") and hasattr(pw.Config, key):
                mp.setattr(pw.Config, key, value)
        mp.setattr(pw, "PYTHON", sys.executable)
        yield dict(env, root=str(root))
        os.chdir(cwd)


def new_project(name: str) -> Project:
    """Create project ``name`` in the current Scipion environment and enter it.

    Needs ``scipion_env`` to be active. The working directory becomes the
    project's, as in a protocol process, so relative run paths resolve.
    """
    if pw.Config.SCIPION_DOMAIN != "pwem":
        raise RuntimeError("new_project() needs the scipion_env fixture")
    project = Manager().createProject(name)
    os.chdir(project.getPath())
    return project


def launch(project: Project, prot):
    """Launch ``prot``, wait for it and fail the test with its log if it failed."""
    project.launchProtocol(prot, wait=True)
    if not prot.isFinished():
        log = "".join(prot.getLogsLastLines(40, logFile=0) + prot.getLogsLastLines(40, logFile=1))
        pytest.fail("%s ended %s:\n%s" % (prot.getRunName(), prot.getStatus(), log))
    return prot


def commands(prot) -> list:
    """The command lines that ``runJob`` ran, read from the protocol's run log."""
    with open(prot.getStdoutLog()) as f:
        text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())  # drop colours
    return [line.strip() for line in text.splitlines() if "-m scipion_cloudexec.programs." in line]


@pytest.fixture(scope="module")
def imported(scipion_env):
    """A project with ``N_MICS`` synthetic micrographs imported (copied) into it."""
    data = os.path.join(scipion_env["root"], "data")
    write_micrographs(data, N_MICS, shape=SHAPE, seed=7)
    project = new_project("cloudexec_protocols")
    from pwem.protocols import ProtImportMicrographs
    prot = project.newProtocol(ProtImportMicrographs, filesPath=data,
                               filesPattern="mic_*.mrc", samplingRate=1.25,
                               voltage=300.0, sphericalAberration=2.7,
                               amplitudeContrast=0.1, magnification=50000,
                               copyFiles=True)
    launch(project, prot)
    assert prot.outputMicrographs.getSize() == N_MICS
    return project, prot


def test_plugin_protocols_are_found_by_the_pwem_domain(scipion_env):
    from pwem import Domain
    protocols = Domain.getProtocols()
    for name in ("ProtCloudPowerSpectra", "ProtCloudAverageSpectrum"):
        assert name in protocols
        assert protocols[name]._package.__name__ == "scipion_cloudexec"


@pytest.fixture(scope="module")
def power_spectra(imported):
    """The power spectra protocol, run once on the imported micrographs with
    3 Scipion threads (2 steps at a time)."""
    project, protImport = imported
    from scipion_cloudexec.protocols import ProtCloudPowerSpectra
    prot = project.newProtocol(ProtCloudPowerSpectra, downsample=2, boxSize=BOX,
                               numberOfThreads=3)
    prot.inputMicrographs.set(protImport.outputMicrographs)
    return launch(project, prot)


def test_power_spectra_registers_downsampled_micrographs(imported, power_spectra):
    protImport, prot = imported[1], power_spectra
    with open(prot.getStdoutLog()) as f:
        assert "ThreadStepExecutor" in f.read()  # the steps ran in parallel
    # ... as they may: no micrograph's step waits for another's (pyworkflow chains steps
    # inserted without prerequisites, one at a time: 3 s each with its executor)
    steps = [s for s in prot.loadSteps() if s.funcName.get() == "powerSpectrumStep"]
    assert len(steps) == N_MICS and not any(s._prerequisites for s in steps)
    inSet, out = protImport.outputMicrographs, prot.outputMicrographs
    assert out.getSize() == N_MICS
    assert out.getSamplingRate() == pytest.approx(2 * inSet.getSamplingRate())
    assert out.getAcquisition().getVoltage() == pytest.approx(300.0)
    assert sorted(m.getMicName() for m in out) == sorted(m.getMicName() for m in inSet)
    for mic in out:
        assert mic.getSamplingRate() == pytest.approx(2.5)
        data, voxel = read_mrc(mic.getFileName())
        assert data.shape == (SHAPE[0] // 2, SHAPE[1] // 2) and data.dtype == np.float32
        assert voxel == pytest.approx(2.5)


def test_power_spectra_are_centrosymmetric_positive_spectra(power_spectra):
    for mic in power_spectra.outputMicrographs:
        psd, voxel = read_mrc(mic.getFileName().replace("_down.mrc", "_psd.mrc"))
        assert psd.shape == (BOX, BOX) and voxel == pytest.approx(1.25)
        assert np.all(np.isfinite(psd)) and psd.min() >= 0.0
        # Centrosymmetric about (BOX/2, BOX/2); row/column 0 is the Nyquist.
        assert np.array_equal(psd[1:, 1:], psd[1:, 1:][::-1, ::-1])
        # The Thon rings make it far from flat.
        assert psd.max() > 5 * np.median(psd)


def test_power_spectra_pass_only_project_relative_paths(imported, power_spectra):
    project = imported[0]
    cmds = commands(power_spectra)
    assert len(cmds) == N_MICS
    for cmd in cmds:
        program, args = cmd.split(" -m ", 1)
        assert program.split()[-1] == sys.executable
        assert args.startswith("scipion_cloudexec.programs.powerspectrum --input Runs/")
        assert project.getPath() not in args and " /" not in args


def test_power_spectra_outputs_match_the_program_run_by_hand(imported, power_spectra, tmp_path):
    mic = imported[1].outputMicrographs.getFirstItem()
    psd, down = str(tmp_path / "psd.mrc"), str(tmp_path / "down.mrc")
    assert powerspectrum.main(["--input", mic.getFileName(), "--psd", psd, "--down", down,
                               "--factor", "2", "--box", str(BOX), "--angpix", "1.25"]) == 0
    first = power_spectra.outputMicrographs.getFirstItem().getFileName()
    with open(down, "rb") as a, open(first, "rb") as b:
        assert a.read() == b.read()
    with open(psd, "rb") as a, open(first.replace("_down", "_psd"), "rb") as b:
        assert a.read() == b.read()


def test_average_spectrum_is_identical_for_1_and_2_mpi_ranks(imported):
    project, protImport = imported
    from scipion_cloudexec.protocols import ProtCloudAverageSpectrum
    results = []
    for nMpi in (1, 2):
        prot = project.newProtocol(ProtCloudAverageSpectrum, boxSize=BOX, numberOfMpi=nMpi)
        prot.inputMicrographs.set(protImport.outputMicrographs)
        launch(project, prot)
        cmds = commands(prot)
        assert len(cmds) == 1 and ("mpirun -np 2" in cmds[0]) == (nMpi == 2)
        assert project.getPath() not in cmds[0].split(" -m ", 1)[1]
        image = prot.outputAverageSpectrum
        assert image.getSamplingRate() == pytest.approx(1.25)
        data, voxel = read_mrc(image.getFileName())
        assert data.shape == (BOX, BOX) and data.dtype == np.float32 and voxel == pytest.approx(1.25)
        stats = prot.getStats()
        assert stats["micrographs"] == N_MICS and stats["tiles"] == N_MICS * 9
        with open(image.getFileName(), "rb") as f1, open(prot._getExtraPath("average_psd.json"), "rb") as f2:
            results.append((f1.read(), f2.read()))
        assert any("4 micrographs" in line for line in prot.summary())
    assert results[0] == results[1]
