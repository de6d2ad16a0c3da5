# **************************************************************************
# * scipion-cloudexec: average power spectrum of a set of micrographs (MPI).
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# **************************************************************************
"""Average power spectrum of a set of micrographs, computed by an MPI program.

An example of a protocol with a single heavy MPI step: ``runJob`` gets
``numberOfMpi`` and the host's ``PARALLEL_COMMAND`` (mpirun...) wraps the
program, locally or, through a remote executor, on a cluster. The result is
the same bytes for any number of MPI ranks.
"""
import enum
import json
import os

import pyworkflow.utils as pwutils
from pyworkflow.constants import PROD

from pwem.objects import Image
from pwem.protocols import ProtMicrographs

from ..programs import program_command, relative_to_project
from ..programs.average_spectrum import stats_path
from .form import addMicrographsAndBox, validateBox


class AverageSpectrumOutputs(enum.Enum):
    outputAverageSpectrum = Image


class ProtCloudAverageSpectrum(ProtMicrographs):
    """Average the power spectra of all the input micrographs (periodograms of
    half-overlapping tiles), with the micrographs spread over MPI ranks. The
    log-scaled average spectrum is registered as an image, and a JSON file of
    statistics is written beside it.
    """
    _label = 'average power spectrum (MPI)'
    _devStatus = PROD
    _possibleOutputs = AverageSpectrumOutputs

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        addMicrographsAndBox(form)
        form.addParallelSection(threads=1, mpi=2)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.averageSpectrumStep, self.boxSize.get(),
                                 self.numberOfMpi.get(), needsGPU=False)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def averageSpectrumStep(self, box, nMpi):
        """Write the micrograph list, then run the MPI averaging program."""
        inputSet = self.inputMicrographs.get()
        # Relative paths in micrograph id order: the order fixes the sum.
        with open(self._getListFile(), 'w') as f:
            for mic in inputSet.iterItems(orderBy='id'):
                f.write(relative_to_project(mic.getFileName()) + '\n')
        program, args = program_command('average_spectrum', [
            '--list', self._getListFile(),
            '--out', self._getAverageFile(),
            '--box', str(box),
            '--angpix', repr(float(inputSet.getSamplingRate()))])
        self.runJob(program, args, numberOfMpi=nMpi)

    def createOutputStep(self):
        """Register the average spectrum as an Image."""
        avgFile = self._getAverageFile()
        if not os.path.exists(avgFile):
            raise FileNotFoundError("missing output %s" % avgFile)
        image = Image(location=avgFile)
        image.setSamplingRate(self.inputMicrographs.get().getSamplingRate())
        with self._lock:  # the executor may record other steps meanwhile
            self._defineOutputs(**{AverageSpectrumOutputs.outputAverageSpectrum.name: image})
            self._defineSourceRelation(self.inputMicrographs, image)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        return validateBox(self)

    def _summary(self):
        stats = self.getStats()
        if stats is None:
            return ['Output not ready yet.']
        return ['Average spectrum of %d micrographs (%d tiles of %d px) in %s.'
                % (stats['micrographs'], stats['tiles'], stats['box'],
                   self._getAverageFile()),
                'Statistics: %s' % stats_path(self._getAverageFile())]

    def _methods(self):
        stats = self.getStats()
        if stats is None:
            return []
        return ['The average power spectrum of %d micrographs was computed from '
                '%d periodograms of %d-pixel tiles with MPI (scipion-cloudexec).'
                % (stats['micrographs'], stats['tiles'], stats['box'])]

    # --------------------------- UTILS functions -----------------------------
    def getStats(self):
        """The program's statistics (a dict), or None before it has run."""
        path = stats_path(self._getAverageFile())
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _getEnviron(self):
        # runJob needs an Environ (not a plain dict): it calls getPrepend() on it
        # and runs the program with exactly this environment.
        return pwutils.Environ(os.environ)

    def _getListFile(self):
        return self._getExtraPath('mics.txt')

    def _getAverageFile(self):
        return self._getExtraPath('average_psd.mrc')
