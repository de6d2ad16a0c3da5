# **************************************************************************
# * scipion-cloudexec: power spectra and downsampling of micrographs.
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# **************************************************************************
"""Per-micrograph power spectrum and Fourier-cropped downsampling.

An example of a protocol whose heavy work is one external program per
micrograph, run through ``runJob`` with project-relative paths, so that a
remote executor can run the steps on a cluster and get the same bytes back.
"""
import enum
import os

import pyworkflow.utils as pwutils
from pyworkflow.constants import PROD
from pyworkflow.protocol import STEPS_PARALLEL
from pyworkflow.protocol import params

from pwem.objects import SetOfMicrographs
from pwem.protocols import ProtPreprocessMicrographs

from ..programs import program_command, relative_to_project
from .form import addMicrographsAndBox, validateBox


class PowerSpectraOutputs(enum.Enum):
    outputMicrographs = SetOfMicrographs


class ProtCloudPowerSpectra(ProtPreprocessMicrographs):
    """Compute the power spectrum of each micrograph (average periodogram of
    half-overlapping tiles, log-scaled) and a Fourier-cropped, downsampled
    copy. Each micrograph is an independent step, so steps run in parallel
    with several Scipion threads, locally or on a cluster.
    """
    _label = 'power spectra'
    _devStatus = PROD
    _possibleOutputs = PowerSpectraOutputs
    stepsExecutionMode = STEPS_PARALLEL

    # -------------------------- DEFINE param functions -----------------------
    def _defineParams(self, form):
        addMicrographsAndBox(form)
        form.addParam('downsample', params.IntParam, default=2,
                      validators=[params.GE(1)],
                      label='Downsampling factor',
                      help='The output micrographs are Fourier-cropped by this '
                           'factor; their sampling rate is multiplied by it.')
        # Threads here are Scipion threads: how many micrographs at a time.
        form.addParallelSection(threads=2, mpi=0)

    # --------------------------- INSERT steps functions ----------------------
    def _insertAllSteps(self):
        factor, box = self.downsample.get(), self.boxSize.get()
        inputSet = self.inputMicrographs.get()
        angpix = inputSet.getSamplingRate()
        stepIds = []
        # One independent step per micrograph: they run concurrently (prerequisites=[]:
        # without it, pyworkflow makes each step wait for the one inserted before).
        for mic in inputSet.iterItems(orderBy='id'):
            stepIds.append(self._insertFunctionStep(
                self.powerSpectrumStep, mic.getObjId(), mic.getFileName(),
                angpix, factor, box, prerequisites=[], needsGPU=False))
        self._insertFunctionStep(self.createOutputStep, prerequisites=stepIds,
                                 needsGPU=False)

    # --------------------------- STEPS functions -----------------------------
    def powerSpectrumStep(self, micId, micFile, angpix, factor, box):
        """Run the power spectrum program on one micrograph."""
        program, args = program_command('powerspectrum', [
            '--input', relative_to_project(micFile),
            '--psd', self._getPsdFile(micId),
            '--down', self._getDownFile(micId),
            '--factor', str(factor),
            '--box', str(box),
            '--angpix', repr(float(angpix))])
        self.runJob(program, args)

    def createOutputStep(self):
        """Register the downsampled micrographs (and their PSD files)."""
        inputSet = self.inputMicrographs.get()
        factor = self.downsample.get()
        outputSet = self._createSetOfMicrographs()
        outputSet.copyInfo(inputSet)
        outputSet.setSamplingRate(inputSet.getSamplingRate() * factor)
        for mic in inputSet.iterItems(orderBy='id'):
            downFile = self._getDownFile(mic.getObjId())
            if not os.path.exists(downFile):
                raise FileNotFoundError("missing output %s" % downFile)
            newMic = mic.clone()
            newMic.setFileName(downFile)
            newMic.setSamplingRate(outputSet.getSamplingRate())
            outputSet.append(newMic)
        with self._lock:  # the executor may record other steps meanwhile
            self._defineOutputs(**{PowerSpectraOutputs.outputMicrographs.name: outputSet})
            self._defineSourceRelation(self.inputMicrographs, outputSet)

    # --------------------------- INFO functions ------------------------------
    def _validate(self):
        return validateBox(self)

    def _summary(self):
        if not self.hasAttribute(PowerSpectraOutputs.outputMicrographs.name):
            return ['Output not ready yet.']
        out = getattr(self, PowerSpectraOutputs.outputMicrographs.name)
        return ['%d micrographs downsampled by %d to %0.3f Å/px.'
                % (out.getSize(), self.downsample.get(), out.getSamplingRate()),
                'Power spectra (box %d px) are in %s.'
                % (self.boxSize.get(), self._getExtraPath())]

    def _methods(self):
        if not self.hasAttribute(PowerSpectraOutputs.outputMicrographs.name):
            return []
        return ['The power spectra of %d micrographs were estimated by averaging '
                'the periodograms of half-overlapping %d-pixel tiles, and the '
                'micrographs were downsampled by a factor of %d by Fourier '
                'cropping (scipion-cloudexec).'
                % (self.inputMicrographs.get().getSize(), self.boxSize.get(),
                   self.downsample.get())]

    # --------------------------- UTILS functions -----------------------------
    def _getEnviron(self):
        # runJob needs an Environ (not a plain dict): it calls getPrepend() on it
        # and runs the program with exactly this environment.
        return pwutils.Environ(os.environ)

    def _getPsdFile(self, micId):
        return self._getExtraPath('mic_%06d_psd.mrc' % micId)

    def _getDownFile(self, micId):
        return self._getExtraPath('mic_%06d_down.mrc' % micId)
