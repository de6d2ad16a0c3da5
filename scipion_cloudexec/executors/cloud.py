"""``CloudStepExecutor``: pyworkflow's steps executor, with ``runJob`` sent to a cluster.

It keeps what pyworkflow's ``ThreadStepExecutor`` does (steps in threads, dependencies, GPU
slots) and changes four things:

* event-driven: a step that ends wakes the loop at once (stock code sleeps 3 s whenever a
  pass launches nothing);
* every step's true end is recorded, also siblings still running when one step failed;
* ``runJob`` runs on the cluster through :class:`~.runner.ClusterRunner`: staged inputs,
  remote MPI job, output into the step's log, outputs gathered, failure raised;
* the desktop's threads bound local work only: a step holds one of them (a *desktop slot*)
  while it runs Python on the desktop, and lends it out while its ``runJob`` waits on the
  cluster, so another step can start. Remote jobs in flight are bounded by the clusters'
  slots (the dispatcher: ``ranks * threads`` each) and by ``jobs`` (queue parameter
  ``CLOUD_JOBS``), not by the form's threads;
* a step gives its cluster slots (and its ``CLOUD_JOBS`` place: it bounds jobs running
  remotely) back as soon as its job has ended there (``run_job``'s ``job_ended``), before
  its outputs are gathered: gathers, which take turns per cluster, never keep a slot idle.
  The slots are taken before the stage-in: the cluster must be chosen (by its free slots)
  before anything is staged to it. A step whose job ended takes a desktop slot back,
  ahead of any new step, once its gather is done and before its code goes on.

The protocol's own Python steps (conversions, ``createOutputStep``) stay local.
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Union

from pyworkflow.protocol.executor import StepThread, ThreadStepExecutor

from ..cluster.errors import cannot_use, cluster_down, first_line, is_infra
from ..cluster.session import executor_client_name
from ..cluster.ssh import HostUnreachable
from ..config import ClusterConfig
from ..scheduling.dispatcher import MultiClusterDispatcher, Slot
from ..scheduling.policy import JobRequest, Policy
from .job_ids import JobIdList
from .runner import ClusterRunner, ProtocolRun
from .slots import DesktopSlots
from .translate import RunJobCall

__all__ = ["CloudStepExecutor", "first_line"]
RECONNECT_PAUSE = 2.0  # seconds between attempts to reach a cluster contact was lost with


def _never_cured(error: BaseException) -> bool:
    """Contact lost for good: no point trying the same cluster again at once (an
    unreachable host is an outage that ends: it is tried again)."""
    return cannot_use(error) and not isinstance(error, HostUnreachable)


logger = logging.getLogger(__name__)


class _WakingStepThread(StepThread):
    """A step thread that wakes the executor's loop when its step ends, and then gives
    back the desktop slot it ends with (*desktop*): a step waiting to come back from its
    cluster gets it at once, not after the loop has written this step's end."""

    def __init__(self, step, lock, ended: threading.Event,
                 desktop: Optional[DesktopSlots] = None):
        super().__init__(step, lock)
        self.ended = ended
        self.desktop = desktop
        self.lends = False  # the step's runJob lends its desktop slot

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.desktop is not None:
                self.desktop.give()  # its code is over (runJob took a slot back)
            self.ended.set()


class CloudStepExecutor(ThreadStepExecutor):
    """Runs a protocol's steps with ``nThreads`` workers; ``runJob`` goes to the cluster(s).

    Args:
        hostConfig: pyworkflow's host config (kept for compatibility).
        nThreads: concurrent steps (pyworkflow's threads minus the main one, at least 1).
        cluster: the cluster from the clusters file, or several: each job then goes where the
            scheduling *policy* says, and to another one if its cluster is lost.
        gpuList: GPU slots pyworkflow assigned to the protocol.
        wall_time: SLURM wall time for the jobs, overriding the cluster's ``time``.
        pool_ranks: if > 0, single-rank jobs run on an mpi4py worker pool of that many ranks,
            held on the cluster for the protocol's duration (no ``mpirun`` per step).
        retries: tries of a job after infrastructure failures.
        down_for: seconds a cluster found down gets no work.
        reconnect_for: seconds a job tries to reach its cluster again after losing contact
            (its job goes on there) before it is failed over.
        jobs: at most that many of the protocol's jobs in flight at once (``CLOUD_JOBS``),
            from taking their slots to their end on the cluster (a gather takes none);
            0: as many as the clusters' slots take (``ranks * threads`` each). The desktop's
            *nThreads* bound only steps running on the desktop.
    """

    def __init__(self, hostConfig, nThreads: int,
                 cluster: Union[ClusterConfig, Sequence[ClusterConfig]],
                 gpuList: Optional[List[int]] = None, wall_time: str = "", pool_ranks: int = 0,
                 policy: Optional[Policy] = None, retries: int = 2, down_for: float = 30.0,
                 reconnect_for: float = 30.0, jobs: int = 0):
        super().__init__(hostConfig, max(1, nThreads), gpuList=gpuList)
        if jobs < 0:
            raise ValueError("jobs in flight must be >= 0 (0: the clusters' slots)")
        self.jobs = jobs
        clusters = [cluster] if isinstance(cluster, ClusterConfig) else list(cluster)
        if wall_time:
            clusters = [replace(c, time=wall_time) for c in clusters]
        self.clusters: Dict[str, ClusterConfig] = {c.name: c for c in clusters}
        self.dispatcher = MultiClusterDispatcher([(c.name, c.slots, c.gpus) for c in clusters],
                                                 policy, retries, down_for, self._bytes_in_place,
                                                 max_jobs=jobs)
        self.pool_ranks = pool_ranks
        self.reconnect_for = reconnect_for
        self.runners: Dict[str, ClusterRunner] = {}
        self._run: Optional[ProtocolRun] = None
        self._runner_lock = threading.Lock()
        self._ended = threading.Event()
        self._desktop = DesktopSlots(self.numberOfProcs, self._ended)
        self._flight_lock = threading.Lock()
        self.in_flight = 0  # jobs of this protocol on a cluster now, and the most at once
        self.most_in_flight = 0
        self._job_ids = JobIdList(lambda: self.protocol)
        self._worked: set = set()  # clusters that ran a job of this run

    def __str__(self) -> str:
        return "CloudStepExecutor(cluster%s=%s, threads=%d, jobs=%s)" % (
            "s" if len(self.clusters) > 1 else "", ",".join(self.clusters), self.numberOfProcs,
            self.jobs or "slots")

    # ---- runJob -----------------------------------------------------------------------

    def _protocol_run(self) -> ProtocolRun:
        with self._runner_lock:
            if self._run is None:
                prot = self.protocol
                project = prot.getProject()
                root = project.path if project is not None else os.getcwd()
                name = project.getShortName() if project is not None else "project"
                self._run = ProtocolRun(root, name, prot.getWorkingDir(), prot.getObjId())
            return self._run

    def _runner(self, name: str) -> ClusterRunner:
        run = self._protocol_run()
        with self._runner_lock:
            if name not in self.runners:
                self.runners[name] = ClusterRunner(
                    self.clusters[name], run, inputs=self._input_files,
                    client_name=executor_client_name(run.mirror, run.prot_id),
                    pool_ranks=self.pool_ranks)
            return self.runners[name]

    def _bytes_in_place(self, name: str) -> int:
        runner = self.runners.get(name)  # a plain read: called under the dispatcher's lock
        return runner.bytes_in_place if runner is not None else 0

    def _drop_runner(self, name: str, only: Optional[ClusterRunner] = None) -> None:
        """Forget a lost cluster's connection: the next job there reconnects afresh.
        With *only*, just that connection (not a newer one another thread made)."""
        with self._runner_lock:
            if only is not None and self.runners.get(name) is not only:
                return
            runner = self.runners.pop(name, None)
        if runner is not None:
            try:
                runner.close()
            except Exception as e:
                logger.debug("closing lost runner %s: %s", name, e)

    def _input_files(self) -> List[str]:
        """Files of the protocol's input objects (sets, volumes...), as pwem lists them."""
        files: List[str] = []
        for _name, attr in self.protocol.iterInputAttributes():
            obj = attr.get()
            if obj is not None and hasattr(obj, "getFiles"):
                files.extend(str(f) for f in obj.getFiles())
        return files

    def runJob(self, log, programName, params, numberOfMpi=1, numberOfThreads=1, env=None,
               cwd=None, executable=None):
        thread = threading.current_thread()
        step = getattr(thread, "step", None)  # its index: a streaming step has no id yet
        step_id = (step.getIndex() if step is not None else None) or getattr(thread, "thId", 0) or 0
        gpus = self.getGpuList() if isinstance(thread, StepThread) else (self.gpuList or [])
        say = (log or logger).info
        run = self._protocol_run()
        base_id = run.job_id(step_id)
        earlier = run.latest(base_id)  # Continue: the job an earlier process sent, if any
        call = RunJobCall(programName, params, ranks=numberOfMpi, threads=numberOfThreads,
                          gpus=tuple(gpus), env=env, cwd=cwd)
        request = JobRequest(ranks=max(1, int(numberOfMpi)), threads=max(1, int(numberOfThreads)),
                             gpus=tuple(gpus))
        current = {"id": earlier[0] if earlier else base_id,
                   "cluster": earlier[1] if earlier else None}
        # a step thread of runSteps lends its desktop slot once its job has a cluster's slots
        lend = {"can": isinstance(thread, _WakingStepThread) and thread.lends, "lent": False}

        def renew(name: str) -> str:
            current["id"] = run.next_attempt(base_id)
            run.place(current["id"], name)
            self._track("%s:%s" % (name, current["id"]), add=True)  # Stop cancels it too
            return current["id"]

        def work(slot: Slot) -> dict:
            # Back on a cluster that had an attempt of this step (the same one after a lost
            # contact, or one it left earlier): that attempt again, as Continue does: still
            # running, attached to; done, reused; failed or lost, ``renew`` makes a new one.
            # Elsewhere: a new job.
            name, attempt = slot.cluster, slot.attempt
            if attempt or current["cluster"] not in (None, name):
                current["id"] = run.latest_on(base_id, name) or run.next_attempt(base_id)
            current["cluster"] = name
            if lend["can"] and not lend["lent"]:
                self._desktop.lend()
                lend["lent"] = True
            run.place(current["id"], name)
            ref = "%s:%s" % (name, current["id"])
            flying = {"now": False}

            def job_runs() -> None:  # the step's job runs (again) on the cluster: it holds
                slot.take()         # its slots (a no-op while held) and counts in flight
                if not flying["now"]:
                    self._flying(+1)
                    flying["now"] = True

            def job_ended() -> None:  # before the gather: the cluster is done with the job
                slot.release()
                if flying["now"]:
                    self._flying(-1)
                    flying["now"] = False

            def renew_here(cluster: str) -> str:  # a new job: after job_ended (a reconnect
                job_runs()                         # found it failed), slots again first
                return renew(cluster)

            job_runs()
            self._track(ref, add=True)
            lost_at = 0.0
            try:
                while True:
                    runner = self._runner(name)
                    try:
                        record = runner.run_job(
                            call, step_id=step_id, job_id=current["id"],
                            label="%s step %s" % (self.protocol.getRunName(), step_id),
                            say=say, renew=renew_here, job_ended=job_ended)
                    except BaseException as e:
                        if lost_at and runner.connected_at > lost_at:
                            # contact came back since: this loss is a new outage, with a
                            # CLOUD_RECONNECT of its own (else a second agent restart 90 s
                            # later failed over at once, and the job ran twice)
                            say("cloudexec: in contact with %s again after %.1f s"
                                % (name, runner.connected_at - lost_at))
                            lost_at = 0.0
                        if not self._reconnect(name, runner, e, lost_at, say):
                            raise
                        lost_at = lost_at or time.monotonic()
                        continue
                    self._worked.add(name)
                    if lost_at:
                        say("cloudexec: in contact with %s again after %.1f s"
                            % (name, time.monotonic() - lost_at))
                    return record
            finally:
                job_ended()  # a no-op if it ended already; the dispatcher's release is too
                self._track(ref, add=False)
                if current["id"] != ref.split(":", 1)[1]:
                    self._track("%s:%s" % (name, current["id"]), add=False)

        def failover(name: str, error: BaseException) -> None:
            if not cluster_down(error):
                say("cloudexec: job %s on cluster %s failed for a reason outside the program "
                    "(%s: %s): it is tried again" % (current["id"], name,
                                                             type(error).__name__,
                                                             first_line(error)))
                return
            if len(self.clusters) > 1:
                # its jobs there may run on unseen: stopped, and the mirror emptied, before
                # this run uses that cluster again
                self._protocol_run().sync.abandon(name)
            say("cloudexec: cluster %s failed this job (%s: %s); %s"
                % (name, type(error).__name__, first_line(error),
                   "it goes to another cluster" if len(self.clusters) > 1 else
                   "it is tried there again in %.0f s, attached to if it still runs"
                   % self.dispatcher.down_for))
            self._drop_runner(name)

        def permanent(error: BaseException) -> bool:
            # a cluster that ran jobs of this run and is now unreachable is in an outage
            # (a link down, a host rebooting): waited for, not given up at once
            return cannot_use(error) and not (isinstance(error, HostUnreachable) and
                                              current.get("cluster") in self._worked)

        try:  # CLOUD_JOBS and the slots are waited for with the desktop slot held
            self.dispatcher.run_with_slot(request, work, is_infra, failover,
                                          prefer=earlier[1] if earlier else None,
                                          is_down=cluster_down, is_permanent=permanent)
        finally:
            if lend["lent"]:
                self._desktop.take_back()  # the step's own code goes on: a desktop slot

    def _flying(self, delta: int) -> None:
        with self._flight_lock:
            self.in_flight += delta
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def _reconnect(self, name: str, runner: ClusterRunner, error: BaseException,
                   lost_at: float, say) -> bool:
        """After losing contact with cluster *name*: whether to try it again (its job may
        well go on there: attaching to it again beats running it twice). True, after a
        pause, while within ``reconnect_for`` seconds of the first loss."""
        if not cluster_down(error) or _never_cured(error):
            return False
        if not lost_at and not runner.connected:  # never reached: fail fast, as before
            return False
        now = time.monotonic()
        if now - (lost_at or now) >= self.reconnect_for:
            return False
        if not lost_at:
            say("cloudexec: lost contact with cluster %s (%s: %s); trying to reach it again "
                "for up to %.0f s: its job goes on there meanwhile"
                % (name, type(error).__name__, first_line(error), self.reconnect_for))
        else:
            say("cloudexec: cluster %s still unreachable (%s: %s)"
                % (name, type(error).__name__, first_line(error)))
        self._drop_runner(name, only=runner)
        time.sleep(RECONNECT_PAUSE)
        return True

    def _track(self, ref: str, add: bool) -> None:
        """Keep running jobs in the protocol's job ids, so Scipion's Stop cancels them
        (hosts.conf CANCEL_COMMAND = scipion-cloudexec cancel %_(JOB_ID)s); returns once
        committed (with the changes of other steps that came meanwhile: one commit)."""
        self._job_ids.change(ref, add)

    # ---- steps ------------------------------------------------------------------------

    def runSteps(self, steps, stepStartedCallback, stepFinishedCallback, stepsCheckCallback,
                 stepsCheckSecs=5):
        lock = threading.Lock()
        running: List[_WakingStepThread] = []
        ending: List[_WakingStepThread] = []  # ended steps whose thread may still run
        desktop = self._desktop
        delta = datetime.timedelta(seconds=stepsCheckSecs)
        last_check = datetime.datetime.now()
        stop = False
        ended_as = None
        logger.info("cloudexec: %d desktop thread(s) for steps running here; jobs on the "
                    "cluster(s) at once: %s", desktop.n,
                    self.jobs or "as many as the slots take (%d)"
                    % sum(c.slots for c in self.clusters.values()))
        try:
            while True:
                self._ended.clear()  # before looking: an end after this wakes the wait below
                with lock:
                    done = [t for t in running if not t.step.isRunning()]
                ending = [t for t in ending if t.is_alive()] + done
                for t in done:
                    running.remove(t)
                    step = t.step  # its thread gives its desktop slot back
                    self.freeGpusSlot(step.getObjId())
                    if not stepFinishedCallback(step):
                        if not stop:  # the protocol ends with the first failure's status
                            stop, ended_as = True, self.protocol.lastStatus
                        # a step failed: launch nothing more, record every end
                    if stop:  # a sibling's later end must not turn the protocol "finished"
                        self.protocol.lastStatus = ended_as
                launched = unrecorded = False
                free = desktop.take_free() if not stop else 0
                if free:
                    with lock:
                        # a step that ended since the look above is recorded first: a
                        # step depending on it must not write the database meanwhile
                        unrecorded = any(not t.step.isRunning() for t in running)
                        for step in ([] if unrecorded else self._getRunnable(steps, free)):
                            step.setRunning()
                            stepStartedCallback(step)
                            free -= 1
                            t = _WakingStepThread(step, lock, self._ended, desktop)
                            t.lends = True
                            t.daemon = True
                            running.append(t)
                            t.start()
                            launched = True
                    desktop.give(free)  # those no runnable step took
                if unrecorded:
                    continue
                if not running and not launched and (stop or not self._arePending(steps)):
                    break
                now = datetime.datetime.now()
                if now - last_check > delta:
                    stepsCheckCallback()
                    last_check = now
                if not launched:
                    self._ended.wait(stepsCheckSecs)
            for t in ending:  # their desktop slots given back: none is left held
                t.join()
            stepsCheckCallback()
            if self.most_in_flight:
                logger.info("cloudexec: at most %d job(s) of this protocol ran on the "
                            "cluster(s) at once", self.most_in_flight)
        finally:
            for name in list(self.runners):
                self._drop_runner(name)
