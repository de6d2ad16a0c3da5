"""``ProtCloudShellStream``: a streaming protocol of the usual shape, for tests.

Its generator step (local) watches a folder: each new ``*.txt`` file is copied into
``extra/in/`` and gets a processing step (a shell command through ``runJob``); when the
folder holds ``END``, a last local step merges every step's output. Like any streaming
protocol, steps are inserted while the protocol runs, and local and remote steps share
the run folder.
"""
import os
import shlex
import shutil
import time

import pyworkflow.protocol.params as params
from pyworkflow.protocol import ProtStreamingBase


class ProtCloudShellStream(ProtStreamingBase):
    """Processes ``*.txt`` files as they arrive in a folder, until ``END`` appears there."""
    _label = "shell steps in streaming"

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("watch", params.PathParam, label="Folder to watch",
                      help="New *.txt files there are processed; a file named END ends it.")
        form.addParam("command", params.StringParam,
                      default="tr a-z A-Z < extra/in/{name} > extra/out/{name}",
                      label="Command per file", help="{name}: the file's name (run folder "
                      "is the working directory).")
        form.addParallelSection(threads=3, mpi=1)

    def stepsGeneratorStep(self):
        seen, steps = set(), []
        os.makedirs(self._getExtraPath("in"), exist_ok=True)
        os.makedirs(self._getExtraPath("out"), exist_ok=True)
        while True:
            ended = os.path.exists(os.path.join(self.watch.get(), "END"))
            for name in sorted(os.listdir(self.watch.get())):
                if name.endswith(".txt") and name not in seen:
                    seen.add(name)
                    shutil.copy(os.path.join(self.watch.get(), name), self._getExtraPath("in"))
                    steps.append(self._insertFunctionStep(self.processStep, name,
                                                          prerequisites=[], needsGPU=False))
            if ended:
                break
            time.sleep(0.3)
        self._insertFunctionStep(self.mergeStep, prerequisites=steps, needsGPU=False)

    def processStep(self, name):
        self.runJob("/bin/sh", "-c %s" % shlex.quote(self.command.get().replace("{name}", name)),
                    cwd=self._getPath(), numberOfMpi=1, numberOfThreads=1)

    def mergeStep(self):
        out = self._getExtraPath("out")
        with open(self._getExtraPath("merged.txt"), "w") as f:
            for name in sorted(os.listdir(out)):
                with open(os.path.join(out, name)) as part:
                    f.write(part.read())
