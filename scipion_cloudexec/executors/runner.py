"""One protocol's remote work on one cluster: connect once, stage, run, gather, record.

::

    run(step, runJob args)
      translate(RunJobCall) -> JobSpec        (translate.py)
      stage_in(inputs, then the run folder)      inputs: what the cluster lacks; run folder:
                                                 what changed here since the last sync
      submit(job id = project-run-step-n)        the same id on resume: attach, never rerun;
                                                 a failed, cancelled or lost one: a new attempt
      stream output into the step's log          as it comes
      gather(run folder)                         what changed there since the last sync
      provenance line in Runs/<id>/logs/cloudexec.jsonl
      non-zero exit -> raise with the remote stderr

Job ids are derived from the project, the run, a token kept in the run's logs folder (a
restart gets a new one, a resume keeps it), the step and the call's rank within the step;
``.2``, ``.3``... mark later attempts. The sync model is in :mod:`..cluster.sync`; the
cluster itself (SSH, agent, staging) is one :class:`~..cluster.session.ClusterSession`.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from .. import runrecords
from ..cluster.agent_client import JobFuture
from ..cluster.errors import JobError, JobLost, RequestRefused
from ..cluster.local_files import EXTERNAL, StageReport, mirror_path
from ..cluster.session import ClusterSession
from ..cluster.sync import SyncConflict, under
from ..cluster.watch import RunFolderWatch
from ..config import ClusterConfig
from ..progress import TransferProgress
from ..remote.jobs import JobSpec, JobState
from .protocol_run import ProtocolRun
from .translate import PathMapper, RunJobCall, shown, translate

log = logging.getLogger(__name__)
EXCLUDE = ("logs/",)  # pyworkflow writes these locally while the protocol runs
ABANDONED_STOP = 120  # seconds a job left on a lost cluster may take to stop when it is back


__all__ = ["ClusterRunner", "ProtocolRun", "RemoteStepError"]


class RemoteStepError(RuntimeError):
    """A remote job failed; the message carries the cluster, the command and its stderr."""


class ClusterRunner:
    """Runs one protocol's jobs on one cluster. Connects on first use; thread-safe."""

    def __init__(self, cluster: ClusterConfig, run: ProtocolRun,
                 inputs: Callable[[], Iterable[str]] = lambda: (), client_name: str = "",
                 pool_ranks: int = 0):
        self.cluster = cluster
        self.pool_ranks = pool_ranks  # > 0: single-rank jobs go to an mpi4py worker pool
        self.pool: Optional[JobFuture] = None
        self.run = run
        self.inputs = inputs
        self.session = ClusterSession(cluster, client_name=client_name)
        self._pool_nonce = uuid.uuid4().hex[:6]  # a pool restarted after a failover is new
        self.bytes_in_place = 0  # this run's data the cluster holds (sent or already cached)
        self._connect_lock = threading.Lock()
        # the last failed attempt to connect: (when it began, its error)
        self._failed: Optional[Tuple[float, BaseException]] = None
        self._stage_lock = threading.Lock()
        self._record_lock = threading.Lock()  # not the stage lock: a sync may take long
        # when the last stage-in and gather that ended clean began (time.monotonic()): a
        # step waiting for the lock whose need arose before that is already covered
        self._clean: Dict[str, float] = {"in": -1.0, "out": -1.0}
        self._inputs_staged = False
        # this cluster's view of local changes to the run folder: a stage-in looks at what
        # changed since the last one instead of walking the run folder (issue 13)
        self._watch = RunFolderWatch(run.project_root, run.run_dir, self._exclude())
        self.mapper: Optional[PathMapper] = None
        self.connected_at = 0.0  # monotonic time this runner reached its cluster

    def connect(self) -> None:
        """Reach the cluster (once). Steps waiting while another step's attempt fails get
        that failure at once: with the cluster unreachable, n steps would otherwise each
        wait out ``connect_timeout`` in turn before they could fail over.

        Raises:
            InfraError: what :meth:`ClusterSession.start` raised.
        """
        asked = time.monotonic()
        with self._connect_lock:
            if self.mapper is not None:
                return
            if self._failed is not None and self._failed[0] >= asked:
                raise self._failed[1]
            began = time.monotonic()
            try:
                self.session.start(stage=True)  # it stages before every job
            except BaseException as e:
                self._failed = (began, e)
                raise
            root = self.session.mirror_root(self.run.mirror)
            staged = []  # inputs outside the project: the command names their staged copy
            for path in self._relative(self.inputs()):
                rel = mirror_path(self.run.project_root, path)
                if rel.split(os.sep, 1)[0] == EXTERNAL:
                    staged.append((path, "%s/%s" % (root, rel)))
            self.mapper = PathMapper(self.run.project_root, root, self.cluster.python,
                                     self.cluster.path_map, staged=staged)
            self.connected_at = time.monotonic()

    @property
    def connected(self) -> bool:
        """Whether this runner reached its cluster."""
        return self.mapper is not None

    def close(self) -> None:
        """Stop the run's worker pool, disconnect (a job still using this connection
        fails with LinkLost: its siblings fail over too)."""
        if self.pool is not None and not self.pool.done():
            try:  # the protocol is over: its pool goes too
                self.session.cancel(self.pool.job_id)
            except Exception as e:
                log.warning("could not stop worker pool %s: %s", self.pool.job_id, e)
        self._watch.close()
        self.session.close()

    def _pool_name(self, say: Callable[[str], None]) -> str:
        """The run's worker pool, started on first use."""
        with self._connect_lock:
            name = "%s-%d-%s-%s" % (self.run.mirror[:40], self.run.prot_id, self.run.token,
                                    self._pool_nonce)
            if self.pool is None:
                self.pool = self.session.start_pool(name, self.pool_ranks)
                say("cloudexec: worker pool %s of %d rank(s) started on %s (job %s)"
                    % (name, self.pool_ranks, self.cluster.name, self.pool.job_id))
            elif self.pool.done() and self.pool.exception() is not None:
                raise RemoteStepError("the worker pool on %s ended: %s"
                                      % (self.cluster.name, self.pool.exception()))
            return name

    # ---- one job ----------------------------------------------------------------------

    def prepare(self, call: RunJobCall) -> JobSpec:
        """*call* as this cluster runs it (connects first: the mapper needs the mirror)."""
        self.connect()
        assert self.mapper is not None
        return translate(call, project_root=self.run.project_root, mapper=self.mapper,
                         cluster_gpus=self.cluster.gpus)

    def stage_in(self, say: Callable[[str], None], since: Optional[float] = None
                 ) -> StageReport:
        """Inputs of the protocol (first time), then what changed in the run folder since the
        last sync with this cluster. A run this cluster has not seen yet starts there from
        an empty run folder (a Restart, or a mirror left by an earlier run of that id).

        *since* (``time.monotonic()``): the run folder as it was then is what must reach the
        cluster; a stage-in that began after that and ended clean covers it (several steps
        waiting for the lock share one walk: an empty report comes back).

        Raises:
            SyncConflict: a path changed both here and on the cluster since the last sync.
        """
        run, name = self.run, self.cluster.name
        paths: List[str] = [run.run_dir]
        with self._stage_lock:
            if since is not None and self._clean["in"] >= since and run.sync.known(name):
                return StageReport(shared=True)
            began = time.monotonic()  # before the walk: what was written before is seen
            if not self._inputs_staged:
                paths = sorted(set(self._relative(self.inputs()))) + paths
            if not run.sync.known(name):
                self._watch.invalidate()  # the base starts again: a full walk
                if run.sync.abandoned(name):  # jobs of this run went there: never reused
                    self._stop_abandoned(say)
                    run.mirror_reset(name)
                self.session.reset(run.mirror, run.run_dir)
                run.sync.met(name)
            progress = TransferProgress("cloudexec: staging to %s" % name, say=say)
            try:
                report = self.session.stage_in(
                    run.project_root, paths, run.mirror, exclude=self._exclude(),
                    progress=progress, run_dir=run.run_dir, base=run.sync.base(name),
                    watch=self._watch)
            except BaseException:
                self._watch.invalidate()  # the changes it took may not have reached the base
                raise
            finally:
                progress.end()
            run.sync.update(name, report.agreed)
            self._watch.recheck([rel for rel, _why in report.conflicts])
            self._inputs_staged = True
            self.bytes_in_place = max(self.bytes_in_place, report.bytes_total)
            if not report.conflicts:
                self._clean["in"] = began
        if report.conflicts:
            raise SyncConflict(name, report.conflicts)
        return report

    def _stop_abandoned(self, say: Callable[[str], None]) -> None:
        """This run's work left this cluster while jobs ran there, unobserved: stop them
        before the mirror is emptied, so none writes into it afterwards (their steps ran
        again elsewhere, or run again here)."""
        stopping = []
        for job_id in self.run.placed_on(self.cluster.name):
            try:
                state = self.session.cancel(job_id)
            except RequestRefused:  # never reached the cluster
                continue
            if not JobState(state).final:
                stopping.append(job_id)
        for job_id in stopping:
            try:
                self.session.attach(job_id, out_offset=1 << 62, err_offset=1 << 62).result(
                    ABANDONED_STOP)
            except JobError:
                pass
            except concurrent.futures.TimeoutError:
                raise RemoteStepError(
                    "job %s, left on cluster %s when it was lost, did not stop within %d s; "
                    "stop it (scipion-cloudexec cancel %s:%s), then Continue"
                    % (job_id, self.cluster.name, ABANDONED_STOP, self.cluster.name, job_id))
        if stopping:
            say("cloudexec: %d job(s) of this run left on %s when it was lost were stopped: "
                "their steps run again" % (len(stopping), self.cluster.name))

    def _exclude(self) -> List[str]:
        return [os.path.join(self.run.run_dir, e) for e in EXCLUDE]

    def _relative(self, files: Iterable[str]) -> List[str]:
        """Input files as absolute paths, but those the cluster sees through ``path_map``
        (they are not staged: the command names their twin there)."""
        mapped = [os.path.abspath(local) for local, _ in self.cluster.path_map]
        out = []
        for f in files:
            if f and os.path.exists(f):
                path = f if os.path.isabs(f) else os.path.join(self.run.project_root, f)
                if not any(under(os.path.abspath(path), m) for m in mapped):
                    out.append(path)
        return out

    def submit(self, spec: JobSpec, job_id: str, label: str, pool: str = "") -> JobFuture:
        def to_log(stream: str, data: bytes) -> None:
            out = sys.stdout if stream == "stdout" else sys.stderr
            out.write(data.decode(errors="replace"))
            out.flush()
        spec = self.session.for_cluster(replace(spec, job_id=job_id, label=label), pool=pool)
        return self.session.submit(spec, on_output=to_log)

    def stage_out(self, say: Callable[[str], None], since: Optional[float] = None
                  ) -> StageReport:
        """What changed in the cluster's run folder since the last sync, gathered here.

        *since* (``time.monotonic()``): when the job whose outputs are wanted was seen to
        end; a gather that began listing after that and ended clean (no conflict, nothing
        refused, skipped or deferred) brought them (an empty report comes back).

        Raises:
            SyncConflict: a path changed both here and on the cluster since the last sync.
        """
        run, name = self.run, self.cluster.name
        with self._stage_lock:
            if since is not None and self._clean["out"] >= since:
                return StageReport(shared=True)
            began = time.monotonic()  # before the listing: a job ended before is in it
            progress = TransferProgress("cloudexec: gathering from %s" % name, say=say)
            try:
                report = self.session.stage_out(run.project_root, run.mirror, run.run_dir,
                                                 run.sync.base(name), exclude=self._exclude(),
                                                 progress=progress)
            finally:
                progress.end()
            run.sync.update(name, report.agreed)
            self._watch.recheck([rel for rel, _why in report.conflicts])  # unequal to the base
            if not (report.conflicts or report.refused or report.skipped or report.deferred):
                self._clean["out"] = began
        for rel, why in report.refused:
            say("cloudexec: REFUSED %s from %s: %s" % (rel, name, why))
        for rel, kind in report.skipped:
            say("cloudexec: WARNING: %s on %s is a %s: not gathered" % (rel, name, kind))
        for rel in report.deferred:
            say("cloudexec: %s changed on %s while it was gathered: it comes with the next "
                "gather" % (rel, name))
        if report.conflicts:
            raise SyncConflict(name, report.conflicts)
        return report

    def run_job(self, call: RunJobCall, *, step_id: int, job_id: str, label: str,
                say: Callable[[str], None],
                renew: Optional[Callable[[str], str]] = None,
                job_ended: Optional[Callable[[], None]] = None) -> dict:
        """Everything for one runJob; returns its provenance record or raises RemoteStepError.

        *job_id* attaches to the job of that id if an earlier process sent it (finished:
        its result is reused; running: followed). If that job had failed, been cancelled or
        been lost, ``renew(cluster)`` names a new attempt, which runs. ``job_ended()`` is
        called as soon as the job's result is known (it ended, or had ended), before the
        gather: the caller frees the job's cluster slot there."""
        spec = self.prepare(call)
        line = shown(spec)
        t0 = time.time()
        t = time.perf_counter()
        sin = self.stage_in(say, since=time.monotonic())
        phases = {"stage_in": time.perf_counter() - t}  # where a step's overhead goes
        t = time.perf_counter()
        if sin.bytes_sent:
            say("cloudexec: staged %d file(s), %.1f MB sent to %s in %.1f s"
                % (sin.files, sin.bytes_sent / 1e6, self.cluster.name, sin.seconds))
        pool = self._pool_name(say) if self.pool_ranks and spec.ranks == 1 else ""
        if renew is not None and self.run.voided(job_id, self.cluster.name):
            # what it wrote there went with the mirror: it is not attached to again
            old, job_id = job_id, renew(self.cluster.name)
            say("cloudexec: job %s went to %s before its copy of the run folder was emptied "
                "(the run had left it): the step runs again as job %s"
                % (old, self.cluster.name, job_id))
        fut = self.submit(spec, job_id, label, pool)
        if renew is not None and fut.accepted.wait(self.cluster.connect_timeout * 6) and \
                fut.existed and fut.accepted_state in _RUN_AGAIN:
            job_id = renew(self.cluster.name)
            say("cloudexec: job %s had ended %s before: the step runs again as job %s"
                % (fut.job_id, fut.accepted_state, job_id))
            fut = self.submit(spec, job_id, label, pool)
        say("cloudexec: job %s on cluster %s (%s, %d rank(s) x %d thread(s)%s): %s"
            % (fut.job_id, self.cluster.name, "worker pool" if pool else
               "%s launcher" % self.cluster.launcher, spec.ranks, spec.threads,
               ", GPUs %s" % ",".join(map(str, spec.gpus)) if spec.gpus else "", line))
        if fut.accepted.is_set() and fut.accepted_reason.startswith("waiting for"):
            say("cloudexec: job %s is queued on %s behind other protocols' jobs (%s)"
                % (fut.job_id, self.cluster.name, fut.accepted_reason))
        record = {"job_id": fut.job_id, "cluster": self.cluster.name, "host": self.cluster.host,
                  "launcher": "pool" if pool else self.cluster.launcher, "command": line,
                  "ranks": spec.ranks, "threads": spec.threads, "gpus": spec.gpus, "cwd": spec.cwd, "step": step_id,
                  "inputs": dict(sin.hashes), "staged_at": t0}
        runrecords.write_pending(self.run.logs, record)  # Stop completes it (cancel)
        error: Optional[JobError] = None
        phases["submit"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            result = fut.result()
        except JobError as e:
            error, result = e, e.result
        ended = time.monotonic()
        phases["job"] = time.perf_counter() - t
        if job_ended is not None:
            job_ended()  # the cluster is done with it: the gather needs no slot there
        t = time.perf_counter()
        if fut.existed:
            say("cloudexec: job %s had already run on %s: its result is reused"
                % (fut.job_id, self.cluster.name))
        record.update(launcher_id=result.launcher_id, started=result.started, ended=result.ended,
                      state=result.state.value, exit_code=result.exit_code)
        if result.gpus and list(result.gpus) != list(spec.gpus):  # another protocol held those
            record["gpus"] = list(result.gpus)
            say("cloudexec: job %s ran on GPUs %s of %s (%s were in use by another protocol)"
                % (fut.job_id, ",".join(map(str, result.gpus)), self.cluster.name,
                   ",".join(map(str, spec.gpus))))
        sout = self.stage_out(say, since=ended)
        phases["gather"] = time.perf_counter() - t
        record["phases"] = {k: round(v, 4) for k, v in phases.items()}
        record["shared"] = [k for k, r in (("stage_in", sin), ("gather", sout)) if r.shared]
        record["outputs"] = {k: v for k, v in sout.hashes.items() if k in set(sout.fetched)}
        self._record(record)
        say("cloudexec: job %s %s (exit %s) on %s, launcher id %s; %d file(s) gathered"
            % (fut.job_id, result.state.value, result.exit_code, self.cluster.name,
               result.launcher_id, len(sout.fetched)))
        if isinstance(error, JobLost):
            raise error  # the cluster's fault, not the program's: may be retried elsewhere
        if error is not None:
            raise RemoteStepError("command failed on cluster %s (%s, exit code %s): %s\n%s"
                                  % (self.cluster.name, result.state.value, result.exit_code,
                                     line, result.stderr_tail.strip()[-4000:]))
        return record

    def _record(self, record: dict) -> None:
        os.makedirs(self.run.logs, exist_ok=True)
        with self._record_lock, open(os.path.join(self.run.logs, "cloudexec.jsonl"), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        runrecords.drop_pending(self.run.logs, record["job_id"])


_RUN_AGAIN = {s.value for s in (JobState.FAILED, JobState.CANCELLED, JobState.LOST,
                                JobState.TIMEOUT)}
