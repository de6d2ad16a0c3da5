"""The SLURM scheduler: ``sbatch`` the job script, follow it with one ``squeue`` for all jobs.

A failed query never means "gone". How a job's state is learnt, in order:

1. its ``rc`` file (written by the job script itself): read at every status call (~1 s);
2. one ``squeue -j a,b,c`` for all jobs, at an adaptive interval: 0.5 s right after a
   submit or a state change, slowing to 10 s for jobs that run long, backing off (2 s
   .. 30 s) while SLURM does not answer;
3. ``sacct`` (slurmdbd, which may answer while slurmctld does not) for jobs squeue lacks.

A job is declared LOST only when SLURM answers and does not know it (twice in a row, or
its id now names another job), or after :attr:`SlurmScheduler.lost_after` seconds (default
600, ``$CLOUDEXEC_SLURM_LOST_AFTER``) in which no query told anything about it; such a job
is then ``scancel``'d, retried until SLURM takes the order. Both survive the agent: the
scancels not done yet are kept in the journal (``pending_cancels``) and the next agent
issues them again, and when SLURM last reported a job is in the journal too (``seen``), so
an adopting agent does not start the grace period afresh. An ``sbatch`` that fails for
SLURM's sake (timeout, controller down) raises a *transient* :class:`SubmitError`: the agent
tries again, and the next try first looks the job up by name and working folder, since a
timed-out ``sbatch`` may still have created it.

Every job is submitted held (``sbatch -H``) and released (``scontrol release``) only once
its SLURM id is known here: a timed-out ``sbatch`` that SLURM carries out later (its request
waited in a stalled slurmctld's socket) makes a job nobody releases, so it can never run
beside the retry. Such strays of a job whose ``sbatch`` was in doubt are looked for by name
and folder while that job lives, and ``scancel``'d.

Shipped to the cluster with the agent: standard library only. Over 400 lines: every way
SLURM answers or fails (held submits, strays, squeue, sacct, lost jobs) lives in this one
scheduler, each next to the state it keeps.
"""
from __future__ import annotations

import logging
import os
import pwd
import re
import sqlite3
import subprocess
import time
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from .jobs import JobFiles, JobSpec, JobState
from .journal import PendingCancels
from .schedulers import SLURM_STATES, Scheduler, Status, SubmitError, final_from_rc

log = logging.getLogger("cloudexec.agent")

#: SLURM's words for "I could not reach the controller / database right now"
TRANSIENT = re.compile(r"timed out|Unable to contact|Connection refused|temporarily|try again|"
                       r"Zero Bytes|communication|Socket|not responding|Transport endpoint|"
                       r"Resource temporarily unavailable", re.I)
#: SLURM answered: the id is not (or no longer) known
UNKNOWN_ID = "Invalid job id"
#: exit codes of a command ended by SIGTERM or SIGKILL: cancelled, timed out, or its own end
SIGNALLED = (128 + 15, 128 + 9)


class Entry(NamedTuple):
    """One job as squeue or sacct reports it."""
    state: str
    reason: str
    name: str
    exit_code: Optional[int] = None


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a.rstrip("/") or "/") == os.path.realpath(b.rstrip("/") or "/")


class SlurmScheduler(Scheduler):
    """``sbatch`` the job script; states from the ``rc`` file, ``squeue`` and ``sacct``."""

    poll_interval = 1.0   # status calls at least this often: each reads the rc files
    fast = 0.5            # squeue interval right after a submit or a state change
    slow = 10.0           # squeue interval for jobs quiet for a minute or more
    query_timeout = 30.0  # one squeue/sacct/scontrol/scancel call
    submit_timeout = 60.0
    submit_for = 300.0    # transient sbatch failures are retried this long, then LOST
    sweep_for = 600.0     # strays of a doubtful sbatch are looked for at least this long
    confirm = 2           # answers in a row without a job before it counts as gone

    def __init__(self, lost_after: Optional[float] = None, user: Optional[str] = None):
        self.lost_after = lost_after if lost_after is not None else \
            float(os.environ.get("CLOUDEXEC_SLURM_LOST_AFTER") or 600.0)
        self.user = user or pwd.getpwuid(os.getuid()).pw_name
        self._seen: Dict[str, float] = {}      # SLURM id -> last time a query reported it
        self._missing: Dict[str, int] = {}     # SLURM id -> answers in a row without it
        self._last: Dict[str, str] = {}        # SLURM id -> last SLURM state seen
        self._cancelled: Set[str] = set()      # SLURM ids we were asked to cancel
        self._uncertain: Set[str] = set()      # job ids whose sbatch may have worked anyway
        self._killed: Set[str] = set()         # job ids whose rc says a signal ended them
        # job name -> (the SLURM id kept or None, job folder, until): strays to scancel
        self._sweep: Dict[str, Tuple[Optional[str], str, float]] = {}
        self._scancel: Dict[str, List[str]] = {}  # scancel commands to retry until they work
        self._scancel_at = 0.0                 # when to retry them (backoff)
        self._scancel_failures = 0
        self._changed = time.monotonic()       # last submit or state change
        self._failures = 0                     # squeue calls failed in a row
        self._last_error = ""
        self._next_query = 0.0
        self._sacct = True                     # False once sacct says accounting is off
        self._store: Optional[PendingCancels] = None  # the scancels, kept in the journal

    def restore(self, journal_path: str) -> None:
        """Keep the scancels in the journal, and take up those an earlier agent left."""
        try:
            self._store = PendingCancels(journal_path, "slurm")
            left = self._store.load()
        except sqlite3.Error as e:
            log.warning("cannot keep pending scancels in %s: %s", journal_path, e)
            return
        for key, argv in left.items():
            self._scancel[key] = argv  # scancels, and releases (key "release-<id>")
            if key.isdigit():
                self._cancelled.add(key)
        if left:
            log.info("%d scancel(s) left pending by the previous agent, issued again: %s",
                     len(left), ", ".join(" ".join(a) for a in left.values()))

    def adopt(self, job_id: str, launcher_id: str, seen: float) -> None:
        if seen:  # the grace period goes on from there, not from this agent's start
            self._seen[launcher_id] = time.monotonic() - max(0.0, time.time() - seen)
        else:  # never seen: the agent may have stopped before releasing it (harmless if not)
            self._want_scancel("release-" + launcher_id, ["scontrol", "release", launcher_id])

    def _want_scancel(self, key: str, argv: List[str]) -> None:
        self._scancel[key] = argv
        if self._store is not None:
            try:
                self._store.put(key, argv)
            except sqlite3.Error as e:
                log.warning("cannot record the pending %s: %s", " ".join(argv), e)

    def _scancel_done(self, key: str) -> None:
        del self._scancel[key]
        if self._store is not None:
            try:
                self._store.done(key)
            except sqlite3.Error as e:
                log.warning("cannot record that %s is done: %s", key, e)

    # ---- commands -------------------------------------------------------------------------

    def _run(self, argv: List[str], timeout: float) -> Tuple[int, str, str]:
        """(exit code, stdout, stderr); a timeout or a missing command is exit code -1."""
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout)
            return p.returncode, p.stdout, p.stderr
        except FileNotFoundError:
            return -1, "", ("%s not found on the cluster: is SLURM installed, or does "
                            "env_setup need a 'module load slurm'?" % argv[0])
        except subprocess.TimeoutExpired:
            return -1, "", "%s did not answer within %.0f s (timed out)" % (argv[0], timeout)
        except OSError as e:  # fork/exec failed (EAGAIN, ENOMEM, EMFILE): not SLURM's answer
            return -1, "", "cannot run %s now: %s (try again)" % (argv[0], e)

    def submit(self, spec: JobSpec, files: JobFiles) -> Tuple[str, JobState]:
        name = "cx-" + spec.job_id
        if spec.job_id in self._uncertain:  # an earlier sbatch failed: did it make the job?
            # by name *and* working folder: another agent's job (another workdir, or a job id
            # used again) may bear the same name, and may have ended already
            found = self._named([name], {name: files.dir})
            if found is None:
                raise SubmitError("cannot ask SLURM whether job %s exists" % name,
                                  self._last_error, transient=True)
            if found:  # held, as every sbatch of ours: keep the first, scancel the others
                keep = min(found, key=lambda f: int(f[0]))[0]
                return self._submitted(spec.job_id, name, keep, files.dir), JobState.QUEUED
        argv = ["sbatch", "--parsable", "-H", "-J", name, "-o", files.stdout, "-e", files.stderr,
                "-n", str(spec.ranks), "-c", str(spec.threads), "-D", files.dir]
        for opt, value in (("-p", spec.launcher.partition), ("-A", spec.launcher.account),
                           ("-t", spec.launcher.time)):
            if value:
                argv += [opt, value]
        code, out, err = self._run(argv + [files.script], self.submit_timeout)
        m = re.match(r"^(\d+)", out.strip())
        if code == 0 and m:
            return self._submitted(spec.job_id, name, m.group(1), files.dir), JobState.QUEUED
        if code == -1 or TRANSIENT.search(err):
            self._uncertain.add(spec.job_id)
            raise SubmitError("SLURM did not take the job (sbatch exit %d)" % code, err + out,
                              transient=True)
        raise SubmitError("sbatch refused the job (exit %d)" % code, err + out)

    def _submitted(self, job_id: str, name: str, lid: str, folder: str) -> str:
        """*lid* is the job: release it; if its sbatch was in doubt, sweep for strays."""
        if job_id in self._uncertain:
            self._uncertain.discard(job_id)
            self._sweep[name] = (lid, folder, time.monotonic() + self.sweep_for)
            self._sweep_strays()
        self._want_scancel("release-" + lid, ["scontrol", "release", lid])
        self._retry_scancels(force=True)
        self._changed = time.monotonic()
        self._next_query = min(self._next_query, self._changed + self.fast)
        return lid

    def abandon(self, job_id: str, files: JobFiles) -> None:
        """A job whose sbatch outcome is unknown was given up: it was submitted held, so
        nothing of it runs; what SLURM made of it (name and folder match) is scancel'd."""
        self._uncertain.discard(job_id)
        self._sweep["cx-" + job_id] = (None, files.dir, time.monotonic() + self.sweep_for)
        self._sweep_strays()

    def _named(self, names: List[str], folders: Dict[str, str]
               ) -> Optional[List[Tuple[str, str, str]]]:
        """[(SLURM id, name, state)] of this user's jobs named *names* in their folder
        (another agent's job may bear the same name), or None when SLURM did not answer."""
        code, out, err = self._run(["squeue", "-h", "-t", "all", "-u", self.user, "-n",
                                    ",".join(names), "-o", "%i|%j|%T|%Z"], self.query_timeout)
        if code != 0:
            self._last_error = "squeue: " + (err.strip() or "exit %d" % code)
            return None
        found = []
        for line in out.splitlines():
            lid, name, state, folder = (line.strip().split("|", 3) + ["", "", ""])[:4]
            if lid.isdigit() and name in folders and _same_dir(folder, folders[name]):
                found.append((lid, name, state))
        return found

    def _sweep_strays(self) -> None:
        """scancel the jobs a doubtful sbatch may have made besides the one kept."""
        now = time.monotonic()
        for name, (keep, _, until) in list(self._sweep.items()):
            if now > until and (keep is None or keep not in self._seen):
                del self._sweep[name]
        if not self._sweep:
            return
        found = self._named(list(self._sweep), {n: v[1] for n, v in self._sweep.items()})
        for lid, name, state in found or ():
            final = SLURM_STATES.get(state, JobState.RUNNING).final
            if lid != self._sweep[name][0] and not final and lid not in self._cancelled:
                log.warning("job %s: SLURM job %s was made by an sbatch that timed out; "
                            "cancelled (it never ran: it was held)", name[3:], lid)
                self._cancelled.add(lid)
                self._want_scancel(lid, ["scancel", lid])
        self._retry_scancels(force=True)

    def cancel(self, launcher_id: str, files: JobFiles) -> None:
        self._cancelled.add(launcher_id)
        self._want_scancel(launcher_id, ["scancel", launcher_id])
        self._retry_scancels(force=True)
        self._changed = time.monotonic()  # its end should be seen soon
        self._next_query = 0.0

    def _retry_scancels(self, force: bool = False) -> None:
        """Run the scancels not done yet; after a failure, again in 2 s .. 60 s."""
        if not force and time.monotonic() < self._scancel_at:
            return
        for key, argv in list(self._scancel.items()):
            code, _, err = self._run(argv, self.query_timeout)
            released = key.startswith("release-") and code != -1 and not TRANSIENT.search(err)
            if code == 0 or UNKNOWN_ID in err or released:  # released: or ended already
                self._scancel_done(key)
                self._scancel_failures = 0
            else:  # SLURM does not answer: the others would hang the same way
                self._scancel_failures += 1
                self._scancel_at = time.monotonic() + min(60.0, 2.0 ** self._scancel_failures)
                log.warning("%s failed, will retry: %s", " ".join(argv), err.strip())
                return

    def pending_work(self) -> bool:
        return bool(self._scancel or self._sweep)

    # ---- states ---------------------------------------------------------------------------

    def next_poll(self) -> float:
        now = time.monotonic()
        due = self._next_query if not self._scancel else min(self._next_query, self._scancel_at)
        return max(0.1, min(self.poll_interval, due - now))  # 0.1: never a busy loop

    def status(self, jobs: Dict[str, Tuple[str, JobFiles]]) -> Dict[str, Status]:
        if self._scancel:
            self._retry_scancels()
        result: Dict[str, Status] = {}
        open_jobs: Dict[str, Tuple[str, JobFiles]] = {}
        killed: Dict[str, int] = {}  # job id -> its rc, when a signal ended its command
        for job_id, (lid, files) in jobs.items():
            rc = files.read_rc()
            if rc in SIGNALLED and lid in self._cancelled:  # our own scancel: no need to ask
                result[job_id] = Status(JobState.CANCELLED, None, "")
                self._killed.discard(job_id)
                self._forget(lid)
            elif rc in SIGNALLED:  # another's scancel, or SLURM itself: SLURM says which
                if job_id not in self._killed:
                    self._killed.add(job_id)
                    self._next_query = 0.0
                killed[job_id] = rc
                open_jobs[job_id] = (lid, files)
            elif rc is not None:  # the job script's own word: it has ended
                result[job_id] = final_from_rc(rc)
                self._forget(lid)
            else:
                open_jobs[job_id] = (lid, files)
        now = time.monotonic()
        if not open_jobs or now < self._next_query:
            return result
        lids = [lid for lid, _ in open_jobs.values()]
        queued = self._squeue(lids)
        absent = lids if queued is None else [lid for lid in lids if lid not in queued]
        accounted = self._sacct_query(absent) if absent else {}
        now = time.monotonic()  # the answer's time: a hung squeue may have taken 20 s
        for job_id, (lid, files) in open_jobs.items():
            st = self._judge(job_id, lid, queued, accounted, now)
            if job_id in killed:
                if st is None or not st.state.final:  # SLURM has not settled it (or is mute)
                    st = final_from_rc(killed[job_id]) if queued is None else None
                elif st.state in (JobState.DONE, JobState.FAILED):
                    st = final_from_rc(killed[job_id])
                if st is not None:
                    self._killed.discard(job_id)
            if st is not None:
                result[job_id] = st
                if st.state.final:
                    self._forget(lid)
        if queued is None:
            self._failures += 1
            delay = min(30.0, 2.0 ** min(self._failures, 5))
        else:
            self._failures = 0
            if self._sweep:
                self._sweep_strays()
            delay = min(self.slow, max(self.fast, (time.monotonic() - self._changed) / 6.0))
            if any(lid in self._cancelled for lid, _ in open_jobs.values()):
                delay = self.fast  # a Stop waits on it: show its end as soon as SLURM does
        self._next_query = time.monotonic() + delay
        return result

    def _judge(self, job_id: str, lid: str, queued: Optional[Dict[str, Entry]],
               accounted: Dict[str, Entry], now: float) -> Optional[Status]:
        """One job's status from the answers (None: nothing new)."""
        self._seen.setdefault(lid, now)  # the grace runs from the first look
        name = "cx-" + job_id
        entry = (queued or {}).get(lid) or accounted.get(lid)
        if entry is not None and entry.name != name:  # SLURM forgot ours and reused the id
            return Status(JobState.LOST, None, "SLURM job id %s now belongs to another job "
                          "(%s): SLURM forgot this one, which left no exit code"
                          % (lid, entry.name))
        if entry is not None:
            self._seen[lid] = now
            self._missing.pop(lid, None)
            st = self._from_entry(lid, entry)
            return st._replace(seen=time.time()) if st is not None else None
        if queued is not None:  # SLURM answered and does not know the job
            self._missing[lid] = self._missing.get(lid, 0) + 1
            self._changed = now  # confirm soon
            if self._missing[lid] >= self.confirm:
                return Status(JobState.LOST, None, "SLURM no longer knows job %s (not in "
                              "squeue%s) and it left no exit code"
                              % (lid, "" if not self._sacct else " nor sacct"))
            return None
        silent = now - self._seen[lid]
        if silent > self.lost_after:
            self._cancelled.add(lid)
            self._want_scancel(lid, ["scancel", lid])
            return Status(JobState.LOST, None, "SLURM did not answer about job %s for %.0f s "
                          "(%s); given up and scancel'd" % (lid, silent, self._last_error))
        return None

    def _from_entry(self, lid: str, entry: Entry) -> Optional[Status]:
        if self._last.get(lid) != entry.state:
            self._last[lid] = entry.state
            self._changed = time.monotonic()
        ours = SLURM_STATES.get(entry.state, JobState.RUNNING)
        if not ours.final:
            return Status(ours, None, "" if entry.reason in ("None", "") else entry.reason)
        code = entry.exit_code if entry.exit_code is not None else self._exit_code(lid)
        if ours == JobState.CANCELLED:
            reason = ("" if lid in self._cancelled else "SLURM job %s was cancelled outside "
                      "cloudexec (scancel by the user or an administrator)" % lid)
            return Status(ours, None, reason)
        return Status(ours, code, "" if ours == JobState.DONE else "SLURM state %s" % entry.state)

    def _squeue(self, lids: List[str]) -> Optional[Dict[str, Entry]]:
        """{SLURM id: entry} of those SLURM knows, or None when it did not answer."""
        code, out, err = self._run(["squeue", "-h", "-t", "all", "-j", ",".join(lids),
                                    "-o", "%i|%T|%r|%j"], self.query_timeout)
        if code != 0:
            if UNKNOWN_ID in err:  # an answer: none of these ids exists any more
                return {}
            self._last_error = "squeue: " + (err.strip() or "exit %d" % code)
            log.warning("SLURM did not answer (%d in a row): %s", self._failures + 1,
                        self._last_error)
            return None
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|", 3)
            if len(parts) == 4:
                found[parts[0]] = Entry(parts[1], parts[2], parts[3])
        return found

    def _sacct_query(self, lids: List[str]) -> Dict[str, Entry]:
        """Accounting's view of *lids* ({} when unavailable): it may answer while
        slurmctld does not, and it knows jobs squeue has purged."""
        if not self._sacct:
            return {}
        code, out, err = self._run(["sacct", "-n", "-X", "-P", "-j", ",".join(lids), "-o",
                                    "JobIDRaw,State,ExitCode,JobName"], self.query_timeout)
        if code != 0:
            if "disabled" in err or "not configured" in err:
                self._sacct = False  # no accounting on this cluster: stop asking
            return {}
        found = {}
        for line in out.splitlines():
            parts = line.strip().split("|", 3)
            if len(parts) == 4 and parts[1]:
                rc = parts[2].split(":")[0]
                found[parts[0]] = Entry(parts[1].split()[0], "", parts[3],
                                        int(rc) if rc.isdigit() else None)
        return found

    def _exit_code(self, lid: str) -> Optional[int]:
        code, out, _ = self._run(["scontrol", "-o", "show", "job", lid], self.query_timeout)
        m = re.search(r"ExitCode=(\d+):(\d+)", out) if code == 0 else None
        return int(m.group(1)) if m else None

    def _forget(self, lid: str) -> None:
        for d in (self._seen, self._missing, self._last):
            d.pop(lid, None)  # type: ignore[attr-defined]
        self._cancelled.discard(lid)
