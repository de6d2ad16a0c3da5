"""``ProtCloudShellSteps``: shell commands as protocol steps, each through ``runJob``.

A plain protocol of the kind any plugin writes (it knows nothing of clusters), used to
check that such protocols behave on a cluster as they do locally, and to measure step
overhead: a chain of dependent steps, then a fan of independent ones.
"""
import os
import shlex

import pyworkflow.protocol.params as params
from pyworkflow.protocol import STEPS_PARALLEL, Protocol
from pyworkflow.protocol.constants import GPU_LIST


class ProtCloudShellSteps(Protocol):
    """Runs shell commands as steps, in the run folder: first the chain (each waits for the
    previous one), then the fan (all independent, after the chain). ``{i}`` in a fan command
    is replaced by the command's number."""
    _label = "shell steps"
    stepsExecutionMode = STEPS_PARALLEL

    # --------------------------- DEFINE param functions ------------------------------
    def _defineParams(self, form):
        form.addSection(label="Commands")
        form.addParam("chain", params.TextParam, default="",
                      label="Dependent commands",
                      help="One shell command per line; each step waits for the previous.")
        form.addParam("fan", params.TextParam, default="",
                      label="Independent commands",
                      help="One shell command per line; they run in parallel after the chain.")
        form.addParam("fanCopies", params.IntParam, default=1,
                      label="Copies of the independent commands",
                      help="Each independent command runs this many times ({i}: copy number).")
        form.addParam("scripts", params.BooleanParam, default=False,
                      label="Write each command to a script first",
                      help="Each step writes its command into extra/scripts/ on the desktop, "
                           "then runs that script (the cluster needs the file the step just "
                           "wrote).")
        form.addParam("gpuSteps", params.BooleanParam, default=False,
                      label="Steps need GPUs",
                      help="Each step then gets GPUs from the list (CUDA_VISIBLE_DEVICES).")
        form.addHidden(GPU_LIST, params.StringParam, default="", label="GPU ids")
        form.addParallelSection(threads=2, mpi=1)

    # --------------------------- INSERT steps functions ------------------------------
    def _insertAllSteps(self):
        previous = []
        lines = self._lines(self.chain.get())
        for n, line in enumerate(lines):
            previous = [self._insert("c%d" % n, line, previous)]
        n = 0
        for line in self._lines(self.fan.get()):
            for _ in range(max(1, self.fanCopies.get())):
                self._insert("f%d" % n, line.replace("{i}", str(n)), previous)
                n += 1

    def _insert(self, name, line, previous):
        if self.scripts.get():
            return self._insertFunctionStep(self.scriptStep, "step_%s.sh" % name, line,
                                            prerequisites=previous, needsGPU=self.gpuSteps.get())
        return self._insertFunctionStep(self.commandStep, line, prerequisites=previous,
                                        needsGPU=self.gpuSteps.get())

    @staticmethod
    def _lines(text):
        return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]

    # --------------------------- STEPS functions -------------------------------------
    def commandStep(self, line):
        # in the run folder, as many programs are run: "extra/x.txt" lands in this run
        self.runJob("/bin/sh", "-c %s" % shlex.quote(line), cwd=self._getPath(),
                    numberOfMpi=self.numberOfMpi.get(), numberOfThreads=1)

    def scriptStep(self, name, line):
        # written here, read there: the step's own file must reach the cluster first
        folder = self._getExtraPath("scripts")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            f.write(line + "\n")
        self.runJob("/bin/sh", os.path.join("extra", "scripts", name), cwd=self._getPath(),
                    numberOfMpi=self.numberOfMpi.get(), numberOfThreads=1)

    # --------------------------- INFO functions --------------------------------------
    def _summary(self):
        return ["%d dependent and %d independent command(s)"
                % (len(self._lines(self.chain.get())),
                   len(self._lines(self.fan.get())) * max(1, self.fanCopies.get()))]
